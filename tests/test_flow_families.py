"""The flow-matching families (sd3, flux, zimage) on tiny instances of the real diffusers
classes: the objective, both modes, fresh-ControlNet gradients, assistant adapters, outputs that
reload into the family's diffusers pipeline, validation calls, and the slider effect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from slider_cn.config import ConfigError, TrainConfig, load_config
from slider_cn.data.loading import conditioning_pixels
from slider_cn.demo_data import write_demo_dataset
from slider_cn.families import get_family
from slider_cn.train import train

FAMILIES = ("sd3", "flux", "zimage")
MODES = ("lora", "controlnet")
PROMPT = "a large circle"
STRENGTH = 0.7
# Guidance values that make each pipeline run exactly one conditional forward, as training does.
PIPELINE_GUIDANCE = {"sd3": 1.0, "flux": 1.0, "zimage": 0.0}


def make_config(root: Path, family: str, **overrides) -> TrainConfig:
    paths = write_demo_dataset(root, images_per_group=2, resolution=64, conditioning="folders")
    values = {
        "model_family": family,
        "max_train_steps": "3",
        "checkpointing_steps": "100",
        # large enough that three steps move the slider visibly (reproduction is not vacuous)
        "learning_rate": "1e-2",
        **{k: str(v) for k, v in overrides.items()},
    }
    return load_config(paths["config"], values)


def losses(output_dir: Path) -> list[float]:
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per (family, mode), shared by the tests that inspect its results."""
    runs: dict[tuple[str, str], tuple] = {}

    def run(family: str, mode: str):
        if (family, mode) not in runs:
            root = tmp_path_factory.mktemp(f"{family}-{mode}")
            config = make_config(root, family, training_mode=mode)
            runs[(family, mode)] = (config, train(config), root)
        return runs[(family, mode)]

    return run


# --- building, encoding, reloading ----------------------------------------------------------
@pytest.mark.parametrize("family_name", FAMILIES)
def test_tiny_is_deterministic_and_its_encoders_tell_captions_apart(family_name):
    first = get_family(TrainConfig(model_family=family_name, seed=3)).load_components()
    again = get_family(TrainConfig(model_family=family_name, seed=3)).load_components()
    for key, tensor in first.denoiser.state_dict().items():
        assert torch.equal(tensor, again.denoiser.state_dict()[key]), key
    family = get_family(TrainConfig(model_family=family_name, seed=3))
    cond = family.encode_prompts(first, ["a large circle", "a small circle"])
    assert all(v.shape[0] == 2 for v in cond.values())
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    latents = family.encode_images(first, torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_saved_tiny_reloads_from_its_diffusers_folder(tmp_path, family_name):
    family = get_family(TrainConfig(model_family=family_name))
    components = family.load_components()
    family.save_pretrained(components, tmp_path / "base")
    reloaded_family = get_family(
        TrainConfig(model_family=family_name, pretrained_model_name_or_path=str(tmp_path / "base"))
    )
    reloaded = reloaded_family.load_components()
    assert type(reloaded.denoiser) is type(components.denoiser)
    # a folder is a real model: prompts are encoded at the pipeline's default length
    assert reloaded_family.max_sequence_length == family.max_sequence_length_default
    # (T5 sees its padding, so both encode at the tiny length to compare the encoders)
    a = family.encode_prompts(components, [PROMPT])
    b = family.encode_prompts(reloaded, [PROMPT])
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    for key, tensor in components.denoiser.state_dict().items():
        assert torch.equal(tensor, reloaded.denoiser.state_dict()[key]), key


# --- the objective -------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", FAMILIES)
def test_velocity_target_and_clean_estimate_invert_the_noising(family_name):
    config = TrainConfig(model_family=family_name)
    family = get_family(config)
    components = family.load_components()
    latents = torch.randn(3, 4, 8, 8)
    noisy, noise, timesteps = family.add_noise(
        components, latents, torch.Generator().manual_seed(0)
    )
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    target = family.training_target(components, latents, noise, timesteps)
    torch.testing.assert_close(target, noise - latents)
    # an exact velocity gives back the clean latents
    estimate = family.clean_latent_estimate(components, noisy, timesteps, target)
    torch.testing.assert_close(estimate, latents, atol=1e-5, rtol=1e-5)


def _sigmas(family_name: str, n: int = 4000, **overrides) -> torch.Tensor:
    family = get_family(TrainConfig(model_family=family_name, **overrides))
    components = family.load_components()
    latents = torch.zeros(n, 4, 8, 8)
    _, _, timesteps = family.add_noise(components, latents, torch.Generator().manual_seed(1))
    return timesteps / 1000


def test_sigma_sampling_follows_the_scheduler_shift_and_the_options():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # uniform u without a shift is uniform
    plain = _sigmas("sd3", flow_use_uniform_schedule=True, flow_schedule_shift=1.0)
    assert abs(plain.mean().item() - 0.5) < 0.02 and plain.min() < 0.01 and plain.max() > 0.99
    # SD3's static shift 3 moves mass to high noise: median of 3u/(1+2u) at u=0.5 is 0.75
    shifted = _sigmas("sd3", flow_use_uniform_schedule=True)
    assert abs(shifted.median().item() - 0.75) < 0.02
    # logit-normal concentrates around the middle before the shift
    logit = _sigmas("sd3", flow_schedule_shift=1.0)
    assert abs(logit.median().item() - 0.5) < 0.02
    assert (logit.sub(0.5).abs() < 0.25).float().mean() > (
        plain.sub(0.5).abs() < 0.25
    ).float().mean()
    # Flux: the resolution-dependent shift of its scheduler (mu from 16 latent tokens)
    flux = _sigmas("flux", flow_use_uniform_schedule=True)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    expected_median = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1)
    assert abs(flux.median().item() - expected_median.item()) < 0.02
    # a static shift forced on Flux replaces the dynamic one
    forced = _sigmas("flux", flow_use_uniform_schedule=True, flow_schedule_shift=3.0)
    assert abs(forced.median().item() - 0.75) < 0.02
    # and the resolution-dependent shift can be asked of a static-shift scheduler
    auto = _sigmas("sd3", flow_use_uniform_schedule=True, flow_schedule_auto_shift=True)
    assert abs(auto.median().item() - expected_median.item()) < 0.02


def test_loss_weighting_schemes():
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    components = SimpleNamespace(noise_scheduler=FlowMatchEulerDiscreteScheduler())
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([250.0, 800.0])
    plain = get_family(TrainConfig(model_family="sd3"))
    assert torch.allclose(
        plain.loss(components, prediction, target, timesteps), ((prediction - target) ** 2).mean()
    )
    for scheme in ("sigma_sqrt", "cosmap"):
        family = get_family(TrainConfig(model_family="flux", flow_loss_weighting=scheme))
        weights = compute_loss_weighting_for_sd3(scheme, (timesteps / 1000).view(-1, 1, 1, 1))
        expected = (weights * (prediction - target) ** 2).mean()
        assert torch.allclose(family.loss(components, prediction, target, timesteps), expected)


def test_flux_packing_round_trips_in_the_pipelines_layout():
    from diffusers import FluxPipeline

    from slider_cn.families.flux import pack, unpack

    latents = torch.randn(2, 4, 8, 6)
    packed = pack(latents)
    assert packed.shape == (2, 4 * 3, 16)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    torch.testing.assert_close(unpack(packed, 8, 6), latents)


# --- both modes train and save -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_both_modes_train_a_few_steps_and_save(trained, family, mode):
    config, result, _ = trained(family, mode)
    out = Path(config.output_dir)
    assert result.steps == 3 and len(losses(out)) == 3
    assert all(torch.isfinite(torch.tensor(losses(out))))
    main_file = out / (
        "pytorch_lora_weights.safetensors" if mode == "lora" else "controlnet_slider.safetensors"
    )
    with safe_open(str(main_file), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert keys and metadata["slider_cn.family"] == family
    assert metadata["slider_cn.training_mode"] == mode
    if mode == "lora":
        assert all(k.startswith("transformer.") for k in keys)  # diffusers' transformer layout
        assert not (out / "slider_kohya.safetensors").exists()  # kohya export: UNets only
    else:
        assert (out / "controlnet" / "config.json").is_file()
    assert (out / "base" / "model_index.json").is_file()
    # the slider moved away from its identity start
    assert any(v.abs().sum() > 0 for k, v in result.adapter.state_dict().items() if "lora_B" in k)


# --- outputs reload into diffusers and reproduce the training-time prediction ----------------
def _pipeline_for(family, out: Path, mode: str, strength: float, controlnet_path=None):
    if mode == "lora" and controlnet_path is None:
        pipe = family.pipeline_class.from_pretrained(out / "base")
    else:
        controlnet = family.controlnet_model_class.from_pretrained(
            controlnet_path or out / "controlnet"
        )
        if mode == "controlnet":
            controlnet.load_lora_adapter(
                str(out / "controlnet_slider.safetensors"), prefix=None, adapter_name="slider"
            )
            controlnet.set_adapters(["slider"], [strength])
        pipe = family.controlnet_pipeline_class.from_pretrained(out / "base", controlnet=controlnet)
    if mode == "lora":
        pipe.load_lora_weights(out, adapter_name="slider")
        pipe.set_adapters(["slider"], [strength])
    return pipe


def _pipeline_step(family, pipe, latents, sigma, control=None):
    """One Euler step of the pipeline from ``latents`` at ``sigma``: x - sigma' * v."""
    from slider_cn.families.flux import pack, unpack

    kwargs = dict(
        prompt=PROMPT,
        num_inference_steps=1,
        sigmas=[sigma],
        height=64,
        width=64,
        output_type="latent",
        guidance_scale=PIPELINE_GUIDANCE[family.name],
        max_sequence_length=family.max_sequence_length,
        latents=pack(latents) if family.name == "flux" else latents,
    )
    if control is not None:
        kwargs.update(control_image=control, controlnet_conditioning_scale=1.0)
    out = pipe(**kwargs).images
    if family.name == "flux":
        out = unpack(out, 8, 8)
    return out, pipe.scheduler.sigmas[0].item()


def _training_step(family, components, adapter, latents, sigma, strength, pixels, mode):
    """x - sigma * v with v as the slider step computes it: in lora mode the (frozen) ControlNet's
    residuals are prepared once outside the multiplier's scope, in controlnet mode inside."""
    cond = family.encode_prompts(components, [PROMPT])
    timesteps = torch.tensor([sigma * 1000.0])

    def residuals():
        if pixels is None:
            return None
        return family.controlnet_residuals(components, latents, timesteps, cond, pixels, 1.0)

    with torch.no_grad():
        frozen = residuals() if mode == "lora" else None
        with adapter.multiplier(strength):
            fed = frozen if mode == "lora" else residuals()
            velocity = family.predict(components, latents, timesteps, cond, fed)
    return latents - sigma * velocity


def _check_reproduction(config, result, root, mode, controlnet_path=None):
    family = result.family
    components = result.components
    for module in components.modules().values():
        module.eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    pixels = None
    control = None
    if mode == "controlnet" or controlnet_path is not None:
        data = root / "data"
        pixels = conditioning_pixels(
            data / "plus_edges" / "plus_000.png", data / "plus" / "plus_000.png", 64
        ).unsqueeze(0)
        control = pixels * 2 - 1  # a tensor control image skips the pipeline's preprocessing
    pipe = _pipeline_for(family, Path(config.output_dir), mode, STRENGTH, controlnet_path)
    pipe.set_progress_bar_config(disable=True)
    got, sigma = _pipeline_step(family, pipe, latents, 0.6, control)
    assert 0.6 < sigma < 1.0  # the scheduler's shift was applied
    expected = _training_step(
        family, components, result.adapter, latents, sigma, STRENGTH, pixels, mode
    )
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # not vacuous: the slider changes this prediction by far more than the tolerance
    off = _training_step(family, components, result.adapter, latents, sigma, 0.0, pixels, mode)
    assert (expected - off).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_outputs_reload_and_reproduce_the_training_prediction(trained, family, mode):
    config, result, root = trained(family, mode)
    _check_reproduction(config, result, root, mode)


def test_zimage_lora_mode_with_a_frozen_controlnet_reproduces_the_pipeline(tmp_path):
    """Z-Image's ControlNet runs the transformer's own refiners and embedders, which carry the
    slider: its hints must see the slider at the batch strength, as a pipeline's do."""
    family = get_family(TrainConfig(model_family="zimage", training_mode="controlnet"))
    components = family.load_components()
    controlnet = components.controlnet
    with torch.no_grad():  # a ControlNet that does something: non-zero output projections
        for name, p in controlnet.named_parameters():
            if "before_proj" in name or "after_proj" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    folder = tmp_path / "zimage-controlnet"
    controlnet.save_pretrained(str(folder))
    config = make_config(
        tmp_path / "run", "zimage", training_mode="lora", controlnet_model_name_or_path=folder
    )
    result = train(config)
    # the loaded ControlNet shares the transformer's refiners, and the slider sits on them
    shared = result.components.controlnet.noise_refiner
    assert shared is result.components.denoiser.noise_refiner
    assert any("lora_A" in name for name, _ in shared.named_parameters())
    _check_reproduction(config, result, tmp_path / "run", "lora", controlnet_path=folder)


@pytest.mark.parametrize("family_name,mode", [("flux", "lora"), ("zimage", "controlnet")])
def test_lycoris_sliders_train_on_flow_families(tmp_path, family_name, mode):
    lycoris = tmp_path / "lokr.json"
    lycoris.write_text(
        json.dumps({"algo": "lokr", "linear_dim": 4, "linear_alpha": 1, "factor": 4})
    )
    config = make_config(
        tmp_path / "run",
        family_name,
        training_mode=mode,
        slider_lora_target="true",
        lora_type="lycoris",
        lycoris_config=lycoris,
    )
    result = train(config)
    out = Path(config.output_dir)
    assert all(torch.isfinite(torch.tensor(losses(out))))
    with safe_open(str(out / "slider_lycoris.safetensors"), framework="pt") as handle:
        assert handle.metadata()["slider_cn.family"] == family_name
        assert len(list(handle.keys())) > 0
    if family_name == "zimage":  # never the modules the ControlNet shares with the transformer
        assert all(n.startswith("control_") for n in result.adapter.target_names)


def test_flow_run_resumes_exactly(tmp_path):
    """Noise levels are drawn from the run's own generator, so a resumed run continues the
    uninterrupted one's losses."""
    full = make_config(tmp_path / "full", "flux", max_train_steps=6, checkpointing_steps=3)
    train(full)
    part = make_config(tmp_path / "part", "flux", max_train_steps=3, checkpointing_steps=3)
    train(part)
    resumed = load_config(
        Path(part.data_backend_config).parent / "config.json",
        {
            "model_family": "flux",
            "learning_rate": "1e-2",
            "max_train_steps": "6",
            "checkpointing_steps": "3",
            "resume_from_checkpoint": "latest",
            "output_dir": part.output_dir,
        },
    )
    train(resumed)
    assert losses(part.output_dir) == pytest.approx(losses(full.output_dir), rel=1e-5, abs=1e-7)


# --- fresh ControlNets learn --------------------------------------------------------------
@pytest.mark.parametrize("family_name", FAMILIES)
def test_fresh_controlnet_gradients_reach_the_trainable_parameters(tmp_path, family_name):
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.step import SliderStep, StepInputs
    from slider_cn.targets import controlnet_output_projections, resolve_targets

    config = make_config(
        tmp_path / "run", family_name, training_mode="controlnet", slider_lora_target="true"
    )
    family = get_family(config)
    components = family.load_components()
    controlnet = components.controlnet
    assert components.controlnet_is_fresh
    names = resolve_targets(
        controlnet, family.name, side="controlnet", exclude_shared_with=components.denoiser
    ).names
    adapter = attach_slider_adapter(controlnet, names, config)
    modules = dict(controlnet.named_modules())
    projections = [
        p
        for n in controlnet_output_projections(controlnet, family.name)
        for p in modules[n].parameters()
    ]
    assert projections and all(p.abs().sum() == 0 for p in projections)  # zero-initialised
    for p in projections:
        p.requires_grad_(True)
    step = SliderStep(
        family,
        components,
        adapter,
        training_mode="controlnet",
        neutral_mode="preserve",
        max_strength=0.5,
    )
    inputs = StepInputs(
        latents=torch.randn(1, 4, 8, 8),
        cond=family.encode_prompts(components, [PROMPT]),
        slider_strength=0.5,
        sign="+",
        conditioning_pixels=torch.rand(1, 3, 64, 64),
    )
    optimizer = torch.optim.SGD(adapter.trainable_parameters() + projections, lr=1.0)
    step(inputs, torch.Generator().manual_seed(0), backward=lambda loss: loss.backward())
    assert sum(p.grad.abs().sum() for p in projections if p.grad is not None) > 0
    optimizer.step()
    optimizer.zero_grad()
    step(inputs, torch.Generator().manual_seed(0), backward=lambda loss: loss.backward())
    grads = [p.grad for p in adapter.trainable_parameters()]
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    # nothing of the base, shared modules included, takes gradient
    for name, p in components.denoiser.named_parameters():
        assert p.grad is None, name


def test_sd3_fresh_controlnet_leaves_the_transformer_config_alone():
    family = get_family(TrainConfig(model_family="sd3", training_mode="controlnet"))
    components = family.load_components()
    assert components.denoiser.config.num_layers == 2
    assert "extra_conditioning_channels" not in components.denoiser.config
    assert components.controlnet.config.force_zeros_for_pooled_projection is False


def test_zimage_controlnet_shares_modules_and_the_slider_skips_them():
    from slider_cn.targets import resolve_targets

    family = get_family(TrainConfig(model_family="zimage", training_mode="controlnet"))
    components = family.load_components()
    controlnet, denoiser = components.controlnet, components.denoiser
    assert controlnet.noise_refiner is denoiser.noise_refiner
    assert controlnet.t_embedder is denoiser.t_embedder
    resolution = resolve_targets(
        controlnet, "zimage", side="controlnet", exclude_shared_with=denoiser
    )
    assert resolution.names and all(n.startswith("control_") for n in resolution.names)
    # the control blocks start as copies of the layers they feed
    torch.testing.assert_close(
        controlnet.control_layers[1].attention.to_q.weight, denoiser.layers[1].attention.to_q.weight
    )


# --- assistant adapters -------------------------------------------------------------------
def _assistant_file(folder: Path, family_name: str) -> Path:
    from peft import LoraConfig

    family = get_family(TrainConfig(model_family=family_name))
    source = family.build_tiny(seed=0).denoiser
    # to_q / to_k / to_v everywhere: on Z-Image this includes the refiners a ControlNet shares
    source.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    source.save_lora_adapter(str(folder))
    return folder


@pytest.mark.parametrize(
    "family_name,mode",
    [("sd3", "lora"), ("flux", "lora"), ("zimage", "lora"), ("zimage", "controlnet")],
)
def test_the_slider_multiplier_never_touches_the_assistant(tmp_path, family_name, mode):
    from slider_cn.adapters import ASSISTANT_ADAPTER, load_assistant_adapter

    assistant_dir = _assistant_file(tmp_path / "assistant", family_name)
    strength = 0.8
    config = make_config(
        tmp_path / "run",
        family_name,
        training_mode=mode,
        assistant_lora_path=assistant_dir,
        assistant_lora_strength=strength,
    )
    result = train(config)
    denoiser = result.components.denoiser
    # a reference model with only the assistant: its scales and weights as loaded
    reference = get_family(config).build_tiny(config.seed).denoiser
    reference_assistant = load_assistant_adapter(
        reference, assistant_dir, strength, family=get_family(config)
    )
    expected_scales = [layer.scaling[ASSISTANT_ADAPTER] for layer in reference_assistant.layers]
    layers = dict(denoiser.named_modules())
    trained_layers = [
        layers[name]
        for name, layer in reference.named_modules()
        if layer in reference_assistant.layers
    ]
    assert len(trained_layers) == len(expected_scales) > 0

    def check_assistant():
        for layer, scale in zip(trained_layers, expected_scales, strict=True):
            assert layer.scaling[ASSISTANT_ADAPTER] == scale
            assert ASSISTANT_ADAPTER in layer.active_adapters  # still applied
            assert not layer.lora_A[ASSISTANT_ADAPTER].weight.requires_grad

    check_assistant()
    for s in (-1.0, 0.5, 2.0):
        with result.adapter.multiplier(s):
            check_assistant()
    check_assistant()
    # its weights are the file's, untouched by three optimizer steps
    saved = load_file(str(assistant_dir / "pytorch_lora_weights.safetensors"))
    state = {name: p for name, p in denoiser.named_parameters() if f".{ASSISTANT_ADAPTER}." in name}
    assert len(state) == len(saved)
    for key, value in saved.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        param = state[f"{module}.lora_{kind.split('.')[0]}.{ASSISTANT_ADAPTER}.weight"]
        torch.testing.assert_close(param.detach(), value)
    # and the slider's saved weights do not include it
    slider_file = Path(config.output_dir) / (
        "pytorch_lora_weights.safetensors" if mode == "lora" else "controlnet_slider.safetensors"
    )
    assert not any(ASSISTANT_ADAPTER in k for k in load_file(str(slider_file)))


# --- validation pipelines -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_validation_pipeline_renders_with_the_validation_call(trained, family, mode):
    from PIL import Image

    config, result, root = trained(family, mode)
    pipe = result.family.validation_pipeline(result.components)
    pipe.set_progress_bar_config(disable=True)
    # the very trained modules, and a scheduler of its own (pipelines mutate theirs)
    assert pipe.transformer is result.components.denoiser
    assert pipe.scheduler is not result.components.noise_scheduler
    assert dict(pipe.scheduler.config) == dict(result.components.noise_scheduler.config)
    control = None
    if mode == "controlnet":
        assert type(pipe) is result.family.controlnet_pipeline_class
        control = Image.open(root / "data" / "plus_edges" / "plus_000.png").convert("RGB")
    kwargs = result.family.validation_call_kwargs(PROMPT, control, config)
    kwargs.update(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    image = pipe(**kwargs).images[0]
    assert image.size == (64, 64)


# --- example configs ----------------------------------------------------------------------
CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.json"))
EXAMPLES = [c for c in CONFIGS if c.name.split("-")[0] in FAMILIES]


def test_every_flow_family_and_mode_has_an_example_config():
    seen = {
        (json.loads(c.read_text())["model_family"], json.loads(c.read_text())["training_mode"])
        for c in EXAMPLES
    }
    assert seen == {(f, m) for f in FAMILIES for m in MODES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_pass_a_dry_run_on_tiny(tmp_path, capsys, path):
    """Each example config is valid as written; with `tiny` and the demo data in place of the
    hub models and a real dataset it passes `train --dry-run` (components built)."""
    from slider_cn.cli import main

    paths = write_demo_dataset(tmp_path, images_per_group=2, resolution=64, conditioning="folders")
    args = ["train", "--config", str(path), "--dry-run"]
    args += ["--pretrained_model_name_or_path", "tiny", "--controlnet_model_name_or_path", "none"]
    args += ["--data_backend_config", str(paths["dataloader"]), "--resolution", "64"]
    args += ["--output_dir", str(tmp_path / "out")]
    assert main(args) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model_family"] == path.name.split("-")[0]


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", FAMILIES)
def test_a_missing_model_folder_is_a_config_error(tmp_path, family_name):
    config = TrainConfig(
        model_family=family_name, pretrained_model_name_or_path=str(tmp_path / "nothing")
    )
    with pytest.raises(ConfigError, match="could not load"):
        get_family(config).load_components()


def test_flux_union_controlnets_are_refused(tmp_path):
    from diffusers import FluxControlNetModel

    family = get_family(TrainConfig(model_family="flux"))
    transformer = family.build_tiny(0).denoiser
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config.update(num_layers=1, num_single_layers=1, num_mode=3)
    FluxControlNetModel.from_config(config).save_pretrained(str(tmp_path / "union"))
    with pytest.raises(ConfigError, match="ControlNet-Union"):
        family.load_controlnet(str(tmp_path / "union"))


# --- the slider slides ----------------------------------------------------------------------
@pytest.mark.parametrize("family_name", FAMILIES)
def test_flow_slider_effect_after_a_few_dozen_steps(family_name):
    """Positive latents shifted one way, negative the other (a global, per-channel shift, like a
    brightness or size concept): after 30 slider steps x0(+1) - x0(-1) points from the negative
    examples to the positive ones."""
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.effect import slider_effect_cosine
    from slider_cn.step import SliderStep, StepInputs
    from slider_cn.targets import resolve_targets

    config = TrainConfig(model_family=family_name, slider_lora_target=True, lora_rank=4, seed=0)
    family = get_family(config)
    components = family.load_components()
    denoiser = components.denoiser
    torch.manual_seed(0)
    adapter = attach_slider_adapter(denoiser, resolve_targets(denoiser, family_name).names, config)
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 8, 8, generator=generator)
    direction = torch.randn(1, 4, 1, 1, generator=generator).expand(1, 4, 8, 8)
    positive, negative = base + direction, base - direction
    cond = family.encode_prompts(components, ["a circle", "a circle"])
    step = SliderStep(
        family, components, adapter, training_mode="lora", neutral_mode="preserve", max_strength=1.0
    )
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)

    def effect() -> float:
        return slider_effect_cosine(
            family, components, adapter, positive=positive, negative=negative, start=base, cond=cond
        )

    assert abs(effect()) < 0.2  # the slider starts as the identity: no effect
    for i in range(30):
        latents, strength, sign = (positive, 1.0, "+") if i % 2 == 0 else (negative, -1.0, "-")
        inputs = StepInputs(latents=latents, cond=cond, slider_strength=strength, sign=sign)
        step(inputs, generator, backward=lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad()
    assert effect() > 0.5


def test_every_flow_matching_family_is_tested_here():
    from slider_cn.families import family_class, family_names
    from slider_cn.families.flow import FlowMatchingFamily
    from tests.test_family_contract import NEW

    # the first three are tested in depth here; later ones by tests/test_family_contract.py
    registered = {n for n in family_names() if issubclass(family_class(n), FlowMatchingFamily)}
    assert registered - set(NEW) == set(FAMILIES)
