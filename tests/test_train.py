"""End-to-end training on tiny models: modes, adapter types, outputs, resume, faults."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slider_cn.cli import main
from slider_cn.config import ConfigError, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.train import TrainingError, train

LOKR = Path(__file__).parents[1] / "configs" / "lycoris_config.json"


def make_config(root: Path, *, conditioning=None, images=2, **overrides):
    paths = write_demo_dataset(
        root, images_per_group=images, resolution=64, conditioning=conditioning
    )
    values = {
        "max_train_steps": "3",
        "checkpointing_steps": "100",
        **{k: str(v) for k, v in overrides.items()},
    }
    return load_config(paths["config"], values)


def resume_config(run, **values: str):
    """The config of ``run`` (made by make_config) resuming its latest checkpoint."""
    return load_config(
        Path(run.data_backend_config).parent / "config.json",
        {"resume_from_checkpoint": "latest", "output_dir": run.output_dir, **values},
    )


def losses(output_dir: Path) -> list[float]:
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def lycoris_file(tmp_path: Path, algo: str) -> Path:
    if algo == "lokr":
        return LOKR
    path = tmp_path / f"{algo}.json"
    path.write_text(json.dumps({"algo": algo}))
    return path


CASES = [
    pytest.param(family, mode, kind, marks=pytest.mark.slow if family == "sdxl" else ())
    for family in ("sd1x", "sdxl")
    for mode in ("lora", "controlnet")
    for kind in ("standard", "lokr", "full")
]


@pytest.mark.parametrize("family,mode,kind", CASES)
def test_modes_and_adapter_types_train_and_save(tmp_path, family, mode, kind):
    extra = (
        {}
        if kind == "standard"
        else {"lora_type": "lycoris", "lycoris_config": lycoris_file(tmp_path, kind)}
    )
    config = make_config(
        tmp_path / "run",
        conditioning="folders",
        model_family=family,
        training_mode=mode,
        max_train_steps=2,
        **extra,
    )
    result = train(config)
    out = Path(config.output_dir)
    assert result.steps == 2 and len(losses(out)) == 2
    assert all(torch.isfinite(torch.tensor(losses(out))))
    if kind != "standard":
        main_file = out / "slider_lycoris.safetensors"
    elif mode == "lora":
        main_file = out / "pytorch_lora_weights.safetensors"
        assert (out / "slider_kohya.safetensors").is_file()
    else:
        main_file = out / "controlnet_slider.safetensors"
    with safe_open(str(main_file), framework="pt") as handle:
        metadata = handle.metadata()
        assert len(list(handle.keys())) > 0
    assert metadata["slider_cn.family"] == family
    assert metadata["slider_cn.training_mode"] == mode
    assert json.loads(metadata["slider_cn.strengths"]) == {"circle-plus": 0.5, "circle-minus": -0.5}
    if mode == "controlnet":
        assert (out / "controlnet" / "config.json").is_file()
    assert (out / "base" / "model_index.json").is_file()  # tiny runs keep their base model


def test_base_lora_loads_with_diffusers_and_kohya_keeps_true_alpha(tmp_path):
    config = make_config(tmp_path / "run", lora_rank=4, lora_alpha=2, max_train_steps=2)
    train(config)
    out = Path(config.output_dir)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "base")
    pipe.load_lora_weights(out)
    assert any("lora_A" in name for name, _ in pipe.unet.named_parameters())
    with safe_open(str(out / "slider_kohya.safetensors"), framework="pt") as handle:
        alphas = {handle.get_tensor(k).item() for k in handle.keys() if k.endswith(".alpha")}
    assert alphas == {2.0}


def test_fresh_controlnet_learns_through_its_output_projections(tmp_path):
    """docs/design.md §8.1: the zero-initialised projections are trained, so residuals and then the
    adapter get gradient; with them frozen the adapter would never receive any."""
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.families import get_family
    from slider_cn.step import SliderStep, StepInputs
    from slider_cn.targets import controlnet_output_projections, resolve_targets

    config = make_config(tmp_path / "run", training_mode="controlnet", slider_lora_target="true")
    family = get_family(config)
    components = family.load_components()
    controlnet = components.controlnet
    names = resolve_targets(
        controlnet, family.name, side="controlnet", exclude_shared_with=components.denoiser
    ).names
    adapter = attach_slider_adapter(controlnet, names, config)
    projections = [
        p
        for n in controlnet_output_projections(controlnet, family.name)
        for p in dict(controlnet.named_modules())[n].parameters()
    ]
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
        cond=family.encode_prompts(components, ["a large circle"]),
        slider_strength=0.5,
        sign="+",
        conditioning_pixels=torch.rand(1, 3, 64, 64),
    )
    optimizer = torch.optim.SGD(adapter.trainable_parameters() + projections, lr=1.0)
    step(inputs, torch.Generator().manual_seed(0), backward=lambda loss: loss.backward())
    assert sum(p.grad.abs().sum() for p in projections) > 0  # first step: the projections learn
    optimizer.step()
    optimizer.zero_grad()
    step(inputs, torch.Generator().manual_seed(0), backward=lambda loss: loss.backward())
    adapter_grad = sum(
        p.grad.abs().sum() for p in adapter.trainable_parameters() if p.grad is not None
    )
    assert adapter_grad > 0  # then the slider itself gets gradient through them


def test_train_reports_fresh_controlnet_gradients_in_the_run(tmp_path):
    config = make_config(
        tmp_path / "run", conditioning="folders", training_mode="controlnet", max_train_steps=3
    )
    result = train(config)
    # after training, the adapter's LoRA-B weights moved away from their zero start
    moved = [v for k, v in result.adapter.state_dict().items() if "lora_B" in k]
    assert moved and any(v.abs().sum() > 0 for v in moved)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = make_config(tmp_path / "full", max_train_steps=6, checkpointing_steps=3)
    train(full)
    reference = losses(full.output_dir)

    part = make_config(tmp_path / "part", max_train_steps=3, checkpointing_steps=3)
    train(part)
    train(resume_config(part, max_train_steps="6", checkpointing_steps="3"))
    assert losses(part.output_dir) == pytest.approx(reference, rel=1e-5, abs=1e-7)


def test_resume_with_other_resolved_settings_says_so(tmp_path, caplog):
    # resolution (per family when unset), mixed_precision (auto) and slider_lora_target have
    # defaults that may differ from the ones a checkpoint was trained with
    part = make_config(tmp_path / "part", max_train_steps=2)
    train(part)
    with caplog.at_level("WARNING", logger="slider_cn"):
        train(resume_config(part, max_train_steps="3", resolution="32"))
    assert "other settings than it was trained with: resolution 64 -> 32" in caplog.text


def test_output_dir_with_another_runs_checkpoints_is_refused(tmp_path):
    config = make_config(tmp_path / "run", max_train_steps=1)
    train(config)
    with pytest.raises(
        ConfigError, match="already holds checkpoints.*resume_from_checkpoint latest"
    ):
        train(config)


def test_controlnet_mode_without_conditioning_fails_before_loading_models(tmp_path, monkeypatch):
    from slider_cn.families import get_family

    def boom(*args, **kwargs):
        raise AssertionError("models were loaded")

    config = make_config(tmp_path / "run", training_mode="controlnet")
    monkeypatch.setattr(type(get_family(config)), "load_components", boom)
    with pytest.raises(ConfigError, match="needs conditioning images.*circle-plus"):
        train(config)


def _poison(monkeypatch, at_call, how):
    from slider_cn import step as step_module

    original = step_module.SliderStep.__call__
    calls = {"n": 0}

    def poisoned(self, inputs, generator, backward=None):
        calls["n"] += 1
        if calls["n"] == at_call and how == "inputs":
            inputs.latents = torch.full_like(inputs.latents, float("nan"))
        result = original(self, inputs, generator, backward)
        if calls["n"] == at_call and how == "grad":
            param = self.adapter.trainable_parameters()[0]
            param.grad = torch.full_like(param, float("nan"))  # finite loss, NaN gradient
        return result

    monkeypatch.setattr(step_module.SliderStep, "__call__", poisoned)


def test_non_finite_loss_stops_with_batch_details_and_a_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, 2, "inputs")
    config = make_config(tmp_path / "run", max_train_steps=4)
    with pytest.raises(
        TrainingError,
        match=r"non-finite loss or gradients at step 2 .*backend 'circle-minus', files \[.*minus_00",
    ) as info:
        train(config)
    assert "checkpoint-1" in str(info.value)
    assert (Path(config.output_dir) / "checkpoint-1" / "state.json").is_file()


def test_non_finite_gradient_is_never_applied_nor_saved(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _poison(monkeypatch, 2, "grad")
    config = make_config(tmp_path / "run", max_train_steps=4)
    with pytest.raises(TrainingError, match="step 2"):
        train(config)
    saved = load_file(str(Path(config.output_dir) / "checkpoint-1" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_ctrl_c_finishes_the_step_then_saves_a_matching_checkpoint(tmp_path, monkeypatch, capsys):
    import signal

    from slider_cn import step as step_module

    original = step_module.SliderStep.__call__
    calls = {"n": 0}

    def signalled(self, inputs, generator, backward=None):
        calls["n"] += 1
        result = original(self, inputs, generator, backward)
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # lands mid-step, before the optimizer step
        return result

    monkeypatch.setattr(step_module.SliderStep, "__call__", signalled)
    paths = write_demo_dataset(tmp_path / "run", images_per_group=2)
    assert main(["train", "--config", str(paths["config"]), "--max_train_steps", "5"]) == 130
    folder = tmp_path / "run" / "output" / "checkpoint-3"
    assert json.loads((folder / "state.json").read_text())["step"] == 3
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert {s["step"].item() for s in optimizer["state"].values()} == {
        3.0
    }  # weights match the step


def test_accumulation_across_epoch_ends_reaches_the_planned_steps(tmp_path):
    # one image per group: 3 micro-batches an epoch, accumulation 2 does not divide it
    config = make_config(
        tmp_path / "run", images=1, max_train_steps=4, gradient_accumulation_steps=2
    )
    assert train(config).steps == 4
    assert len(losses(config.output_dir)) == 8
    by_epochs = make_config(
        tmp_path / "epochs",
        images=1,
        num_train_epochs=3,
        gradient_accumulation_steps=2,
        max_train_steps="none",
    )
    assert train(by_epochs).steps == 4  # 9 micro-batches: 4 whole optimizer steps


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    from slider_cn import step as step_module

    original = step_module.SliderStep.__call__
    calls = {"n": 0}

    def interrupted(self, inputs, generator, backward=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, inputs, generator, backward)

    monkeypatch.setattr(step_module.SliderStep, "__call__", interrupted)
    paths = write_demo_dataset(tmp_path / "run", images_per_group=2)
    assert main(["train", "--config", str(paths["config"]), "--max_train_steps", "5"]) == 130
    state = json.loads((tmp_path / "run" / "output" / "checkpoint-2" / "state.json").read_text())
    assert state["step"] == 2


def test_checkpoints_total_limit_prunes(tmp_path):
    config = make_config(
        tmp_path / "run", max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2
    )
    train(config)
    names = sorted(p.name for p in Path(config.output_dir).glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-5"]


def _shifted_latents(monkeypatch, delta):
    """Make positive latents shift by +delta and negative by -delta, as the cache returns them."""
    from slider_cn.data.cache import EncodedCache

    original = EncodedCache.latents
    signs = {"+": 1.0, "-": -1.0, "0": 0.0}

    def shifted(self, batch):
        return original(self, batch) + signs[batch.sign] * delta.to(original(self, batch))

    monkeypatch.setattr(EncodedCache, "latents", shifted)


@pytest.mark.slow
def test_slider_slides_along_the_contrast(tmp_path, monkeypatch):
    """Positive latents shifted one way, negative the other: after a few dozen steps the
    slider's +1 vs -1 clean-latent estimates point from negative to positive."""
    from slider_cn.data.cache import EncodedCache
    from slider_cn.data.loading import load_batch
    from slider_cn.data.sampler import SliderSampler
    from slider_cn.effect import slider_effect_cosine

    paths = write_demo_dataset(tmp_path / "run", images_per_group=4)
    contrast = json.loads(paths["dataloader"].read_text())[:2]  # the positive and negative backends
    paths["dataloader"].write_text(json.dumps(contrast))
    config = load_config(
        paths["config"],
        {"max_train_steps": "45", "learning_rate": "1e-2", "lora_rank": "4", "lora_alpha": "4"},
    )
    # a per-channel shift: one direction in latent space, the same at every position
    delta = torch.tensor([1.0, -1.0, 0.5, -0.5]).view(4, 1, 1).expand(4, 8, 8)
    _shifted_latents(monkeypatch, delta)
    result = train(config)

    cache = EncodedCache(config.cache_path, result.family, result.components)
    from slider_cn.data.backends import training_backends

    latents = {
        plan.sign: cache.latents(load_batch(plan, pixels=False))  # shifted, as trained on
        for plan in SliderSampler(training_backends(config), batch_size=4, seed=0)
    }
    cosine = slider_effect_cosine(
        result.family,
        result.components,
        result.adapter,
        positive=latents["+"],
        negative=latents["-"],
        start=torch.cat([latents["+"], latents["-"]]),
        cond=result.family.encode_prompts(result.components, ["a circle"] * 8),
    )
    assert cosine > 0.5


def _neutral_setup(tmp_path):
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.families import get_family
    from slider_cn.step import SliderStep, StepInputs
    from slider_cn.targets import resolve_targets

    config = make_config(tmp_path / "run", slider_lora_target="true", lora_rank=4)
    family = get_family(config)
    components = family.load_components()
    unet = components.denoiser
    adapter = attach_slider_adapter(unet, resolve_targets(unet, family.name).names, config)
    torch.manual_seed(0)
    for p in adapter.trainable_parameters():
        p.data.normal_(0, 0.1)  # a slider that already changes things
    inputs = StepInputs(
        latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
        cond=family.encode_prompts(components, ["a square"] * 2),
        slider_strength=0.0,
        sign="0",
    )
    return family, components, adapter, inputs, SliderStep, unet


def test_preserve_neutral_keeps_the_base_and_pulls_the_slider_toward_it(tmp_path):
    family, components, adapter, inputs, SliderStep, unet = _neutral_setup(tmp_path)
    step = SliderStep(
        family, components, adapter, training_mode="lora", neutral_mode="preserve", max_strength=0.5
    )
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300, 700])

    @torch.no_grad()
    def gap():
        with adapter.multiplier(0.0):
            base = family.predict(components, noisy, t, inputs.cond)
        total = 0.0
        for s in (0.5, -0.5):
            with adapter.multiplier(s):
                total += (
                    (family.predict(components, noisy, t, inputs.cond) - base).pow(2).mean().item()
                )
        return base, total

    base_before, gap_before = gap()
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(15):
        step(inputs, generator, backward=lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad()
    base_after, gap_after = gap()
    assert torch.equal(base_before, base_after)  # multiplier 0 is the untouched base
    assert (
        gap_after < 0.5 * gap_before
    )  # the slider is pulled toward "no change" on neutral content


def test_regular_neutral_trains_at_strength_one(tmp_path):
    family, components, adapter, inputs, SliderStep, unet = _neutral_setup(tmp_path)
    step = SliderStep(
        family, components, adapter, training_mode="lora", neutral_mode="regular", max_strength=0.5
    )
    assert step(inputs, torch.Generator().manual_seed(0)).strength == 1.0


def test_gradient_checkpointing_gives_the_gradients_of_the_batch_strength(tmp_path):
    """With checkpointing, backward recomputes the forward: it must see the same multiplier."""
    family, components, adapter, inputs, SliderStep, unet = _neutral_setup(tmp_path)
    inputs.sign, inputs.slider_strength = "-", -0.5
    step = SliderStep(
        family, components, adapter, training_mode="lora", neutral_mode="preserve", max_strength=0.5
    )
    unet.train()

    def grads():
        step(inputs, torch.Generator().manual_seed(5), backward=lambda loss: loss.backward())
        out = [p.grad.clone() for p in adapter.trainable_parameters()]
        for p in adapter.trainable_parameters():
            p.grad = None
        return out

    plain = grads()
    unet.enable_gradient_checkpointing()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_assistant_adapter_is_untouched_by_training(tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from slider_cn.families import get_family

    config = make_config(tmp_path / "run", max_train_steps=3)
    unet = get_family(config).load_components().denoiser
    assert isinstance(unet, UNet2DConditionModel)
    unet.add_adapter(
        LoraConfig(
            r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False
        )
    )
    unet.save_lora_adapter(tmp_path / "assistant")
    assistant_file = next((tmp_path / "assistant").glob("*.safetensors"))

    config = make_config(
        tmp_path / "run2",
        max_train_steps=3,
        assistant_lora_path=assistant_file,
        assistant_lora_strength=0.7,
    )
    result = train(config)
    trained = dict(result.components.denoiser.named_parameters())
    reference = {
        k.replace(".default.", ".assistant."): v for k, v in unet.named_parameters() if "lora_" in k
    }
    assistant = {k: v for k, v in trained.items() if ".assistant." in k}
    assert assistant and set(assistant) == set(reference)
    for key, value in assistant.items():
        assert torch.equal(value, reference[key]), key
        assert not value.requires_grad
    # nor is it saved with the slider
    from safetensors.torch import load_file

    saved = load_file(str(Path(config.output_dir) / "pytorch_lora_weights.safetensors"))
    assert saved and not any("assistant" in k for k in saved)
    assert len(saved) == len(result.adapter.state_dict())


@pytest.mark.slow
def test_two_process_cpu_run_shares_signs_and_splits_files(tmp_path):
    import os
    import subprocess
    import sys

    paths = write_demo_dataset(tmp_path / "run", images_per_group=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "slider_cn.cli",
        "train",
        "--config",
        str(paths["config"]),
        "--max_train_steps",
        "2",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run" / "output"
    ranks = [
        [json.loads(line) for line in (out / name).read_text().splitlines()]
        for name in ("train_log.jsonl", "train_log.rank1.jsonl")
    ]
    assert [r["sign"] for r in ranks[0]] == [r["sign"] for r in ranks[1]] == ["+", "-"]
    for a, b in zip(*ranks, strict=True):
        assert a["backend"] == b["backend"] and not set(a["files"]) & set(b["files"])


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    config = make_config(tmp_path / "run", max_train_steps=2, gradient_accumulation_steps=2)
    result = train(config)
    lines = [
        json.loads(line)
        for line in (Path(config.output_dir) / "train_log.jsonl").read_text().splitlines()
    ]
    assert result.steps == 2
    assert [line["step"] for line in lines] == [1, 1, 2, 2]  # two micro-batches per step
