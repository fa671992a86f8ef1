"""base_model_precision / text_encoder_precision: frozen weights stored in fp8 or int8 (torchao),
the slider untouched, its files the same, and the base's prediction close to the unquantized."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slider_cn.config import ConfigError, TrainConfig, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.families import get_family
from slider_cn.precision import store, weight_bytes
from slider_cn.train import train

pytest.importorskip("torchao")

# Relative error (norm of the difference over the norm) of the base's prediction at multiplier
# 0, measured on the tiny models (random weights, 32-wide layers: harder than a real model's):
# fp8 0.018-0.048, int8 0.003-0.010 across the five families.
TOLERANCE = {"fp8": 0.08, "int8": 0.02}
QUANTIZED = {"fp8": "Float8Tensor", "int8": "Int8Tensor"}


def frozen_linears(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the Linear layers that are not adapter layers."""
    return {
        name: layer.weight
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and "lora_" not in name
    }


def run(root: Path, **overrides):
    """A short run; LoRA-only runs get a frozen ControlNet from disk in the loop."""
    paths = write_demo_dataset(root, images_per_group=2, resolution=64, conditioning="folders")
    values = {"max_train_steps": "3", "checkpointing_steps": "100", **overrides}
    if values.get("training_mode", "lora") == "lora":
        family = get_family(TrainConfig(seed=0))
        folder = root / "frozen_controlnet"
        family.fresh_controlnet(family.load_components().denoiser).save_pretrained(str(folder))
        values["controlnet_model_name_or_path"] = folder
    config = load_config(paths["config"], {k: str(v) for k, v in values.items()})
    return config, train(config)


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    runs = {}

    def get(mode: str):
        if mode not in runs:
            runs[mode] = run(tmp_path_factory.mktemp(f"plain-{mode}"), training_mode=mode)
        return runs[mode]

    return get


def keys_of(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("mode", ["lora", "controlnet"])
def test_quantized_frozen_base_trains_and_writes_the_same_slider(
    tmp_path, plain_runs, precision, mode
):
    config, result = run(
        tmp_path,
        training_mode=mode,
        base_model_precision=precision,
        text_encoder_precision=precision,
    )
    components = result.components
    kind = QUANTIZED[precision]
    # the frozen denoiser and text encoder are stored quantized, Linear by Linear
    for module in (components.denoiser, components.text_encoders[0]):
        weights = frozen_linears(module)
        assert weights and all(type(w).__name__ == kind for w in weights.values())
    # the ControlNet is frozen (quantized) only in LoRA-only mode; in ControlNet mode it
    # carries the slider and stays as it is
    controlnet_kinds = {type(w).__name__ for w in frozen_linears(components.controlnet).values()}
    assert controlnet_kinds == ({kind} if mode == "lora" else {"Parameter"})
    # the slider itself is plain fp32 and trained
    params = result.adapter.trainable_parameters()
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in params)
    name = "diffusers" if mode == "lora" else "controlnet_lora"
    plain_config, plain = plain_runs(mode)
    assert keys_of(result.files[name]) == keys_of(plain.files[name])
    with safe_open(str(result.files[name]), framework="pt") as handle:
        assert any(handle.get_tensor(k).abs().sum() > 0 for k in handle.keys() if "lora_B" in k)
    if mode == "lora":
        # it loads into an unquantized pipeline, as any slider does
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(result.files["base"]))
        pipe.load_lora_weights(str(config.output_dir))
        assert pipe.unet.peft_config
    else:
        # the saved fresh ControlNet (never quantized) plus the slider file reproduce the
        # trained ControlNet at strength 1
        from diffusers import ControlNetModel

        out = Path(config.output_dir)
        reloaded = ControlNetModel.from_pretrained(str(out / "controlnet"))
        reloaded.load_lora_adapter(
            str(out / "controlnet_slider.safetensors"), prefix=None, adapter_name="slider"
        )
        family = get_family(config)
        text = family.encode_prompts(components, ["a circle"])["encoder_hidden_states"]
        generator = torch.Generator().manual_seed(0)
        args = (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500]), text)
        pixels = torch.rand(1, 3, 64, 64, generator=generator)
        with torch.no_grad(), result.adapter.multiplier(1.0):
            expected = components.controlnet(*args, controlnet_cond=pixels, return_dict=False)
        with torch.no_grad():
            got = reloaded(*args, controlnet_cond=pixels, return_dict=False)
        for a, b in zip(got[0], expected[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family_name", ["sd1x", "sdxl", "sd3", "flux", "zimage"])
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_base_predicts_close_to_the_full_precision_base(family_name, precision):
    family = get_family(TrainConfig(model_family=family_name, resolution=64))
    components = family.load_components()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    cond = family.encode_prompts(components, ["a large circle", "a small square"])
    noisy, _, timesteps = family.add_noise(components, latents, generator)
    with torch.no_grad():
        reference = family.predict(components, noisy, timesteps, cond).float()
    quantized = copy.deepcopy(components)
    before = weight_bytes([quantized.denoiser])
    store(quantized.denoiser, precision, torch.float32)
    with torch.no_grad():
        out = family.predict(quantized, noisy, timesteps, cond).float()
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error <= TOLERANCE[precision], error
    # one byte per Linear weight instead of four (plus scales; convolutions stay)
    assert weight_bytes([quantized.denoiser]) < 0.85 * before


def test_simpletuner_spellings_map_to_ours():
    config = TrainConfig(base_model_precision="int8-quanto", text_encoder_precision="fp8-torchao")
    assert (config.base_model_precision, config.text_encoder_precision) == ("int8", "fp8")
    assert TrainConfig(base_model_precision="nf4-bnb").base_model_precision == "nf4"
    with pytest.raises(ValueError, match="base_model_precision"):
        TrainConfig(base_model_precision="int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_nf4_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="'nf4' needs a CUDA GPU"):
        run(tmp_path, base_model_precision="nf4")


def test_lycoris_with_a_quantized_base_is_refused(tmp_path):
    lokr = Path(__file__).parents[1] / "configs" / "lycoris_config.json"
    with pytest.raises(ConfigError, match="lora_type 'standard'"):
        run(tmp_path, base_model_precision="int8", lora_type="lycoris", lycoris_config=lokr)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_backward_keeps_the_stored_weight_not_a_dequantized_copy(precision):
    """Through a frozen quantized layer the gradient reaches the input (the slider layers
    below it) exactly as through its dequantized weight, and what autograd keeps for the
    backward is the quantized weight: a dense copy per layer would undo the saving."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    model.requires_grad_(False)
    store(model, precision, torch.float32)
    dense = [layer.weight.dequantize() for layer in (model[0], model[2])]
    x = torch.randn(8, 64, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.square().sum().backward()
    assert {type(t).__name__ for t in saved} >= {QUANTIZED[precision]}
    weight_shapes = {tuple(w.shape) for w in dense}
    assert not [t for t in saved if type(t) is torch.Tensor and tuple(t.shape) in weight_shapes]
    x_ref = x.detach().clone().requires_grad_(True)
    hidden = torch.nn.functional.gelu(x_ref @ dense[0].T + model[0].bias)
    (hidden @ dense[1].T + model[2].bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_offloaded_text_encoders_run_only_inside_their_onload_scope(tmp_path, monkeypatch):
    """offload_text_encoders: every text-encoder forward of a run (the cache's misses, the
    validation images) happens while they are onloaded, they are parked in between, and the
    training is unchanged."""
    from slider_cn import offload

    placements: list[offload.TextEncoderPlacement] = []
    depth_at_call: list[int] = []
    original_init = offload.TextEncoderPlacement.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        placements.append(self)
        for encoder in self.encoders:
            encoder.register_forward_pre_hook(lambda *_: depth_at_call.append(self.depth))

    monkeypatch.setattr(offload.TextEncoderPlacement, "__init__", recording_init)
    edge = tmp_path / "off" / "data" / "neutral_edges" / "neutral_000.png"
    common = dict(
        training_mode="controlnet",
        validation_prompt="a circle",
        validation_num_inference_steps=2,
        validation_conditioning_image=edge,
    )
    run(tmp_path / "off", offload_text_encoders=True, validation_steps=3, **common)
    placement = placements[-1]
    assert placement.enabled is False  # handed back on the device at the end
    assert placement.onloads >= 2  # the cache's misses, and the validation at step 3
    assert depth_at_call and all(depth >= 1 for depth in depth_at_call), depth_at_call
    run(tmp_path / "plain", **common)

    def losses(root: Path) -> list[float]:
        lines = (root / "output" / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses(tmp_path / "off") == losses(tmp_path / "plain")


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_modules_shared_by_denoiser_and_controlnet_are_quantized_once(precision):
    """Z-Image's ControlNet shares the denoiser's embedders and refiners: in LoRA-only mode both
    are frozen and stored quantized, and the shared layers must not be quantized twice."""
    from slider_cn.precision import apply_frozen_precision

    config = TrainConfig(
        model_family="zimage", resolution=64, training_mode="lora", base_model_precision=precision
    )
    family = get_family(config)
    components = family.load_components(with_controlnet=True)
    apply_frozen_precision(components, config, torch.float32)
    weights = frozen_linears(components.controlnet)
    # quantized, except the zero-initialised output projections of this fresh ControlNet
    for name, weight in weights.items():
        zero_rows = (
            bool((weight.abs().amax(dim=1) == 0).any())
            if type(weight) is torch.nn.Parameter
            else False
        )
        assert type(weight).__name__ == ("Parameter" if zero_rows else QUANTIZED[precision]), name
    assert any(type(w).__name__ == QUANTIZED[precision] for w in weights.values())
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    cond = family.encode_prompts(components, ["a circle"])
    noisy, _, timesteps = family.add_noise(components, latents, generator)
    pixels = torch.rand(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        residuals = family.controlnet_residuals(components, noisy, timesteps, cond, pixels, 1.0)
        assert torch.isfinite(family.predict(components, noisy, timesteps, cond, residuals)).all()


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_layers_compute_in_the_autocast_dtype(precision):
    """Under bf16 mixed precision training stores the frozen weights in bf16 and quantizes
    those; an fp32 input (latents, an fp32 norm's output) must still compute in bf16."""
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16)
    layer.requires_grad_(False)
    store(layer, precision, torch.bfloat16)
    x = torch.randn(2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        assert layer(x.detach()).dtype == torch.bfloat16


@pytest.mark.slow
def test_two_process_run_with_a_quantized_base(tmp_path):
    """DDP broadcasts parameters at setup; quantized frozen weights are left out of it."""
    import os
    import subprocess
    import sys

    paths = write_demo_dataset(tmp_path / "run", images_per_group=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29519", "-m", "slider_cn.cli", "train", "--config",
           str(paths["config"]), "--max_train_steps", "2", "--base_model_precision", "int8"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "run" / "output" / "train_log.rank1.jsonl").read_text().splitlines()
    assert len(lines) == 2
