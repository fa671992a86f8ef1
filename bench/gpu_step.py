"""Seconds per step and peak memory of slider-cn's training step and a plain diffusers + peft
loop on an SD1.5-sized UNet (the real config, random weights) on a CUDA GPU.

    python bench/gpu_step.py --cases a,b,c --impl slider,plain --checkpointing off,on \\
        --out rows.jsonl                     # one row per (case, checkpointing, impl)
    python bench/gpu_step.py --table rows.jsonl   # print the collected rows as a table

Cases: a = LoRA-only (slider targets on the UNet), b = the same with a frozen ControlNet
(ControlNetModel.from_unet), c = ControlNet mode (slider LoRA on the ControlNet, UNet frozen).
bench/common.py builds both sides (SliderRunner: the training recipe's own `train_micro_batch`,
slider_cn/recipe.py; PlainRunner: the hand-written loop); both get the same weights, LoRA modules and rank, AdamW,
precision and inputs. Each row builds its models afresh after the previous row's are freed,
so the peak memory (torch.cuda.max_memory_allocated, counted from the built models on) is that
row's alone: weights, optimizer state and activations.

Speed-ups, as flags applying to every row of the call: --compile BACKEND (torch.compile of the
trained model's forward), --channels-last, --no-fused (foreach AdamW instead of fused),
--vae-per-step (no cached latents: the SD VAE encoder and the CLIP-L text encoder run every
step, to show what the cache saves), --data sequential|prefetch (slider side only: the real
per-micro-batch data path of the recipe on a warm cache, conditioning images decoded per step,
without or with prefetch_batches). --device cpu --model tiny runs the same code on a CPU
(bench/gpu.sh --cpu) to check it without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CASE_NAMES = {"a": "lora", "b": "lora+cn", "c": "controlnet"}

# runwayml/stable-diffusion-v1-5 vae/config.json and text_encoder/config.json (CLIP ViT-L/14).
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


class Encoders:
    """The SD1.5 VAE encoder and text encoder, run every step (what the cache avoids)."""

    def __init__(self, model: str, resolution: int, batch: int, device, dtype):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        vae_config = dict(SD15_VAE)
        text_config = dict(SD15_TEXT)
        if model != "sd15":  # dry runs: small, same code
            vae_config.update(block_out_channels=[8, 16, 16, 16], norm_num_groups=8)
            text_config.update(
                hidden_size=common.UNETS[model]["cross_attention_dim"],
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=1000,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        with torch.device(device):
            self.vae = AutoencoderKL(**vae_config).to(dtype).eval().requires_grad_(False)
            self.text = (
                CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype).eval().requires_grad_(False)
            )
        g = torch.Generator().manual_seed(0)
        self.pixels = (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(
            device, dtype
        )
        self.ids = torch.randint(0, text_config["vocab_size"], (batch, 77), generator=g).to(device)

    @torch.no_grad()
    def encode(self, inputs: common.Inputs) -> common.Inputs:
        latents = self.vae.encode(self.pixels).latent_dist.sample() * 0.18215
        hidden = self.text(self.ids)[0]
        return common.Inputs(
            latents=latents.float(),
            encoder_hidden_states=hidden.float(),
            conditioning_pixels=inputs.conditioning_pixels,
            slider_strength=inputs.slider_strength,
            sign=inputs.sign,
        )


def run_row(args, case: str, checkpointing: bool, impl: str, tmp: Path) -> dict:
    device = torch.device(args.device)
    common.release()
    options = common.Options(
        rank=args.rank,
        precision=args.precision,
        gradient_checkpointing=checkpointing,
        channels_last=args.channels_last,
        compile=args.compile,
        fused=False if args.no_fused else None,
        base_precision=args.base_precision,
    )
    runner_class = common.SliderRunner if impl == "slider" else common.PlainRunner
    runner = runner_class(case, args.model, device, options)
    inputs = common.case_inputs(case, args.model, args.resolution, args.batch, device)
    encoders = (
        Encoders(args.model, args.resolution, args.batch, device, options.dtype)
        if args.vae_per_step
        else None
    )
    feed = None
    if args.data != "none" and impl == "slider":
        feed = common.DataFeed(
            tmp / f"data-{case}",
            args.resolution,
            args.batch,
            device,
            conditioning=case != "lora",
            prefetch=args.data == "prefetch",
            context=inputs.encoder_hidden_states[:1],
        )
    # The peak counts from here: the models as they train (weights in bf16, not the fp32 they
    # were initialised in), then optimizer state and activations.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    signs = ["+", "-"]

    def one_step(i: int) -> None:
        step_inputs = feed.next() if feed is not None else inputs
        if feed is None:  # the multiplier changes every step, as in training
            step_inputs.sign = signs[i % 2]
            step_inputs.slider_strength = 0.5 if step_inputs.sign == "+" else -0.5
        if encoders is not None:
            step_inputs = encoders.encode(step_inputs)
        if args.channels_last:
            step_inputs.latents = step_inputs.latents.contiguous(memory_format=torch.channels_last)
        runner.step(step_inputs)

    for i in range(args.warmup):
        one_step(i)
    times = []
    for i in range(args.steps):
        common.cuda_sync(device)
        start = time.perf_counter()
        one_step(i)
        common.cuda_sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    runner.close()
    flags = [
        name
        for name, on in (
            (f"compile={args.compile}", args.compile),
            ("channels-last", args.channels_last),
            ("no-fused", args.no_fused),
            ("vae-per-step", args.vae_per_step),
            (f"data={args.data}", args.data != "none" and impl == "slider"),
            (f"base={args.base_precision}", args.base_precision != "no"),
        )
        if on
    ]
    row = {
        "impl": "slider-cn" if impl == "slider" else "plain",
        "case": case,
        "checkpointing": checkpointing,
        "flags": " ".join(flags) or "-",
        "s_per_step": statistics.median(times),
        "peak_gib": peak,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "resolution": args.resolution,
        "precision": args.precision,
    }
    return row  # its models go with this frame; the next row's release() frees them


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no rows")
        return
    first = rows[0]
    print(
        f"{first['model']} UNet, {first['resolution']}x{first['resolution']}, batch 1, "
        f"{first['precision']}, LoRA rank 16 on the slider targets; device: {first['device']}"
    )
    print(f"{'case':<12}{'ckpt':<6}{'impl':<11}{'flags':<26}{'s/step':>9}{'peak GiB':>10}"
          f"{'vs plain':>10}")  # fmt: skip
    plain = {
        (r["case"], r["checkpointing"], r["flags"]): r["s_per_step"]
        for r in rows
        if r["impl"] == "plain"
    }
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        base = plain.get((r["case"], r["checkpointing"], r["flags"]))
        if base is None and r["flags"].startswith("data="):
            base = plain.get((r["case"], r["checkpointing"], "-"))
        ratio = "" if r["impl"] == "plain" or base is None else f"{r['s_per_step'] / base:.3f}"
        ckpt = "on" if r["checkpointing"] else "off"
        print(
            f"{r['case']:<12}{ckpt:<6}{r['impl']:<11}{r['flags']:<26}"
            f"{r['s_per_step']:>9.4f}{peak:>10}{ratio:>10}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="sd15", choices=sorted(common.UNETS))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cases", default="a,b,c", help="a (LoRA), b (+ frozen ControlNet), c")
    parser.add_argument("--impl", default="slider,plain")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", default=None, metavar="BACKEND")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-fused", action="store_true")
    parser.add_argument("--vae-per-step", action="store_true")
    parser.add_argument("--data", default="none", choices=["none", "sequential", "prefetch"])
    parser.add_argument(
        "--base-precision",
        default="no",
        choices=["no", "fp8", "int8", "nf4"],
        help="base_model_precision of the frozen modules (slider-cn side only)",
    )
    parser.add_argument("--out", type=Path, help="append the rows to this JSON-lines file")
    parser.add_argument("--table", type=Path, help="only print the rows of this file")
    args = parser.parse_args()

    if args.table is not None:
        lines = args.table.read_text().splitlines() if args.table.is_file() else []
        print_table([json.loads(line) for line in lines if line.strip()])
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device; for a dry run use --device cpu --model tiny")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for letter in args.cases.split(","):
            case = CASE_NAMES[letter] if letter in CASE_NAMES else letter
            for ckpt in args.checkpointing.split(","):
                for impl in args.impl.split(","):
                    row = run_row(args, case, ckpt == "on", impl, Path(tmp))
                    rows.append(row)
                    peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
                    print(
                        f"{row['case']:<11} ckpt {ckpt:<3} {row['impl']:<9} {row['flags']:<24} "
                        f"{row['s_per_step']:.4f} s/step  peak {peak}",
                        flush=True,
                    )
                    if args.out is not None:
                        with args.out.open("a", encoding="utf-8") as handle:
                            handle.write(json.dumps(row) + "\n")
    if args.out is None:
        print_table(rows)


if __name__ == "__main__":
    main()
