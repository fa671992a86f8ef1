"""Memory of the frozen base by `base_model_precision`, against bf16, on CPU.

    python bench/memory.py [--models transformer,unet] [--steps 3]

For each precision (bf16 = `no` under bf16 mixed precision, then fp8 and int8; fp32 for
reference) a fresh process builds the model, attaches the slider (PEFT LoRA rank 16 on the
slider targets), stores the frozen weights as slider_cn.precision does in training, and runs
--steps training steps (bf16 autocast, the slider at +1, MSE, backward, AdamW). It reports:

- frozen-weight bytes: the base's parameters and buffers as stored, adapter excluded;
- step peak: the process's peak resident memory during the steps (VmHWM, reset after setup,
  once freed heap pages are handed back with malloc_trim, so the weights that quantization
  replaced are not counted);
- model + step: that peak minus the process's memory before the model was built (imports).

Each process measures one precision, so no allocator state carries over. Goal (issue #18):
frozen-weight bytes int8 <= 0.55x and fp8 <= 0.55x of bf16 on the transformer.

Models: ``transformer``: SD3Transformer2DModel, 8 joint blocks, 512 wide (the flow families
are almost all Linear layers); ``unet``: bench/common.py's medium UNet (SD1.5's layout at 1/10
width), whose convolutions torchao's weight-only schemes leave in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "fp8", "int8")
GOAL = 0.55

TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=8,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=512,
    caption_projection_dim=512,
    pooled_projection_dim=256,
    out_channels=16,
    pos_embed_max_size=64,
)


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size


def _trim() -> None:
    """Return freed heap pages to the OS (glibc), so resident memory shows what is live."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_one(model_name: str, precision: str, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.config import TrainConfig
    from slider_cn.precision import store, weight_bytes
    from slider_cn.targets import resolve_targets

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import common  # before the baseline: its imports are not the model's memory

    baseline = _status("VmRSS")
    torch.manual_seed(0)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    if model_name == "transformer":
        from diffusers import SD3Transformer2DModel

        model, arch = SD3Transformer2DModel(**TRANSFORMER), "sd3"
    else:
        model, arch = common.build_unet("medium", torch.device("cpu")), "sd1x"
    model.requires_grad_(False)
    model.to(dtype)
    config = TrainConfig(
        model_family=arch, lora_rank=16, slider_lora_target=True, mixed_precision="bf16"
    )
    adapter = attach_slider_adapter(
        model, resolve_targets(model, arch, side="denoiser", slider=True).names, config
    )
    params = adapter.trainable_parameters()
    for p in params:
        p.data = p.data.float()
    adapter_ids = {id(p) for p in params}
    if precision in ("fp8", "int8"):
        store(model, precision, dtype)
    frozen = weight_bytes([model]) - sum(
        p.numel() * p.element_size() for p in model.parameters() if id(p) in adapter_ids
    )
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    if model_name == "transformer":
        inputs = dict(
            hidden_states=torch.randn(2, 16, 32, 32, generator=generator),
            encoder_hidden_states=torch.randn(2, 77, 512, generator=generator),
            pooled_projections=torch.randn(2, 256, generator=generator),
            timestep=torch.tensor([300.0, 700.0]),
        )
        shape = (2, 16, 32, 32)
    else:
        inputs = dict(
            sample=torch.randn(2, 4, 16, 16, generator=generator),
            encoder_hidden_states=torch.randn(2, 77, 32, generator=generator),
            timestep=torch.tensor([300, 700]),
        )
        shape = (2, 4, 16, 16)
    target = torch.randn(shape, generator=generator)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    import gc

    gc.collect()
    _trim()  # the bf16 weights that quantization replaced go back to the OS
    _reset_peak()
    before_step = _status("VmRSS")
    started = time.perf_counter()
    for _ in range(steps):
        with adapter.multiplier(1.0), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / steps
    peak = _status("VmHWM")
    return {
        "model": model_name,
        "precision": precision,
        "parameters": sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids),
        "frozen_bytes": frozen,
        "step_peak": peak,
        "model_and_step": peak - baseline,
        "before_step": before_step,
        "seconds_per_step": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer,unet")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.one[1], args.steps)))
        return

    started = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    print(
        "frozen base by base_model_precision, CPU, bf16 autocast, slider rank 16; ratios "
        "against bf16; one fresh process per row"
    )
    failed = False
    for model in args.models.split(","):
        rows = {}
        for precision in PRECISIONS:
            done = subprocess.run(
                [sys.executable, __file__, "--one", model, precision, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            rows[precision] = json.loads(done.stdout.strip().splitlines()[-1])
        base = rows["bf16"]
        mib = 2**20
        print(f"\n{model}: {base['parameters'] / 1e6:.1f} M frozen parameters")
        print(f"{'precision':<10}{'frozen':>12}{'ratio':>8}{'step peak':>12}{'ratio':>8}"
              f"{'model+step':>12}{'ratio':>8}{'s/step':>8}")  # fmt: skip
        for precision, r in rows.items():
            ratio = r["frozen_bytes"] / base["frozen_bytes"]
            print(
                f"{precision:<10}{r['frozen_bytes'] / mib:>10.1f}Mi{ratio:>8.3f}"
                f"{r['step_peak'] / mib:>10.0f}Mi{r['step_peak'] / base['step_peak']:>8.3f}"
                f"{r['model_and_step'] / mib:>10.0f}Mi"
                f"{r['model_and_step'] / base['model_and_step']:>8.3f}"
                f"{r['seconds_per_step']:>8.2f}"
            )
        if model == "transformer":
            for precision in ("fp8", "int8"):
                ratio = rows[precision]["frozen_bytes"] / base["frozen_bytes"]
                ok = ratio <= GOAL
                failed |= not ok
                print(
                    f"goal {precision} frozen <= {GOAL} x bf16: {ratio:.3f} {'ok' if ok else 'OVER'}"
                )
    print(f"total {time.perf_counter() - started:.0f}s")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
