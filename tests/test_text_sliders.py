"""Text sliders (`slider_prompts`): entries, their place in the sampler, the step's forwards and
its target, and short runs on every family in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from slider_cn.cli import main
from slider_cn.config import ConfigError, TrainConfig, load_config
from slider_cn.data.backends import build_backends
from slider_cn.data.prompts import PromptTask
from slider_cn.data.sampler import SliderSampler
from slider_cn.demo_data import write_demo_dataset
from slider_cn.train import train

ENTRY = {
    "id": "rb",
    "target": "a circle",
    "positive": "a red circle",
    "negative": "a blue circle",
    "neutral": ["a square"],
    "denoising_steps": 3,
    "conditioning_data": "neutral-folders",
}


def make_config(root: Path, entries=None, **overrides) -> TrainConfig:
    """The demo dataset (image backends with edge maps) plus one text slider on its edges."""
    paths = write_demo_dataset(root, images_per_group=2, resolution=64, conditioning="folders")
    prompts = root / "slider_prompts.json"
    prompts.write_text(json.dumps(entries if entries is not None else [ENTRY]))
    values = {
        "slider_prompts": str(prompts),
        "max_train_steps": "3",
        "checkpointing_steps": "100",
        **{k: str(v) for k, v in overrides.items()},
    }
    return load_config(paths["config"], values)


def log_lines(output_dir: Path) -> list[dict]:
    text = (Path(output_dir) / "train_log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


# --- entries -----------------------------------------------------------------------------
def test_an_entry_becomes_plus_minus_and_neutral_backends_beside_the_images(tmp_path):
    config = make_config(tmp_path)
    backends = {b.id: b for b in build_backends(config)}
    assert {"rb:+", "rb:-", "rb:neutral", "circle-plus", "circle-minus"} <= set(backends)
    plus, minus, neutral = backends["rb:+"], backends["rb:-"], backends["rb:neutral"]
    assert (plus.slider_strength, minus.slider_strength, neutral.slider_strength) == (1, -1, 0)
    assert plus.prompt.kind == minus.prompt.kind == "pair"
    assert neutral.prompt.kind == "neutral"
    # one sample per conditioning image, the same count in every group of the entry
    edges = sorted((tmp_path / "data" / "neutral_edges").glob("*.png"))
    assert [s.conditioning for s in plus.samples] == edges
    assert len(minus.samples) == len(neutral.samples) == len(edges)
    assert {s.caption for s in neutral.samples} == {"a square"}
    assert all(s.path is None for s in plus.samples)


def test_every_anchor_is_drawn_each_epoch(tmp_path):
    entry = {**ENTRY, "neutral": ["a square", "a triangle", "a star"]}
    config = make_config(tmp_path, entries=[entry])  # two conditioning images
    neutral = {b.id: b for b in build_backends(config)}["rb:neutral"]
    assert sorted(s.caption for s in neutral.samples) == ["a square", "a star", "a triangle"]
    assert {s.conditioning for s in neutral.samples} == {
        s.conditioning for s in {b.id: b for b in build_backends(config)}["rb:+"].samples
    }
    assert len({s.key for s in neutral.samples}) == 3
    inline = {k: v for k, v in entry.items() if k != "conditioning_data"}
    config = TrainConfig(slider_prompts=[inline], train_batch_size=2)
    neutral = {b.id: b for b in build_backends(config)}["rb:neutral"]
    # whole batches of 2: the three anchors and one more turn
    assert [s.caption for s in neutral.samples] == ["a square", "a triangle", "a star", "a square"]


def test_entries_without_a_dataloader_say_what_is_missing():
    entry = dict(ENTRY)  # names a conditioning backend
    with pytest.raises(
        ConfigError, match="names a backend of data_backend_config, but none is set"
    ):
        build_backends(TrainConfig(slider_prompts=[entry]))
    with pytest.raises(ConfigError, match="every entry is disabled"):
        build_backends(TrainConfig(slider_prompts=[{**entry, "disabled": True}]))


def test_inline_entries_without_conditioning_need_no_dataloader(tmp_path):
    entry = {k: v for k, v in ENTRY.items() if k != "conditioning_data"}
    config = TrainConfig(
        slider_prompts=[entry], train_batch_size=2, output_dir=str(tmp_path / "out")
    )
    backends = build_backends(config, world_size=2)
    # one global batch (2 per rank x 2 ranks) per pass
    assert [len(b.samples) for b in backends] == [4, 4, 4]
    assert all(s.conditioning is None for b in backends for s in b.samples)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"unconditional": "x"}, "Concept Sliders' `unconditional` is `negative`"),
        ({"negativ": "x"}, "did you mean 'negative'"),
        ({"slider_strength": -1}, "it is a magnitude"),
        ({"negative": "a red circle"}, "positive and negative are the same prompt"),
        ({"action": "boost"}, "key 'action'"),
        ({"conditioning_data": "nope"}, "'nope' is not an enabled conditioning backend"),
        ({"target": " "}, "key 'target' is empty"),
    ],
)
def test_bad_entries_name_the_file_the_entry_and_the_key(tmp_path, change, message):
    config = make_config(tmp_path, entries=[{**ENTRY, **change}])
    with pytest.raises(ConfigError, match=message) as caught:
        build_backends(config)
    assert "rb" in str(caught.value)


def test_a_controlnet_in_the_loop_needs_conditioning_for_every_entry(tmp_path):
    entry = {k: v for k, v in ENTRY.items() if k != "conditioning_data"}
    config = make_config(tmp_path, entries=[entry], training_mode="controlnet")
    with pytest.raises(ConfigError, match="entry rb: a ControlNet in the loop needs conditioning"):
        train(config)
    assert not (Path(config.output_dir) / "train_log.jsonl").exists()  # before any model


def test_plan_shows_the_prompts_and_conditioning_of_each_micro_batch(tmp_path, capsys):
    config = make_config(tmp_path)
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(config.model_dump(exclude_none=True)))
    assert main(["train", "--config", str(config_file), "--plan", "12"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["sign"] for line in lines[:6]] == ["+", "-", "0", "+", "-", "0"]
    prompt_lines = [line for line in lines if "prompts" in line]
    image_lines = [line for line in lines if "prompts" not in line]
    assert prompt_lines and image_lines  # one run mixes images and prompts
    pair = next(line for line in prompt_lines if line["prompts"]["kind"] == "pair")
    assert pair["prompts"]["positive"] == "a red circle"
    assert all("neutral_edges" in f for f in pair["files"])
    anchors = next(line for line in prompt_lines if line["prompts"]["kind"] == "neutral")
    assert anchors["prompts"]["neutral"] == ["a square"]


def test_the_sampler_cycles_prompt_backends_like_image_backends(tmp_path):
    config = make_config(tmp_path)
    backends = build_backends(config)
    sampler = SliderSampler(backends, batch_size=1, seed=0)
    plans = [sampler.plan_at(0, i) for i in range(len(sampler))]
    # every sample of every backend once per epoch; prompt plans carry their task
    for backend in backends:
        drawn = [p for p in plans if p.backend == backend.id]
        assert len(drawn) == len(backend.samples)
        assert all(p.prompt is backend.prompt for p in drawn)
    signs = [p.sign for p in plans]
    assert signs[:3] == ["+", "-", "0"]


# --- the step ----------------------------------------------------------------------------
def _step_setup(mode: str, *, guidance_scale=2.0, action="enhance"):
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.families import get_family
    from slider_cn.targets import resolve_targets
    from slider_cn.text_step import TextSliderStep

    config = TrainConfig(resolution=64, training_mode=mode, lora_rank=4, slider_lora_target=True)
    family = get_family(config)
    components = family.load_components(with_controlnet=True)
    side = "controlnet" if mode == "controlnet" else "denoiser"
    trainable = components.controlnet if side == "controlnet" else components.denoiser
    targets = resolve_targets(
        trainable,
        family.name,
        side=side,
        slider=True,
        exclude_shared_with=components.denoiser if side == "controlnet" else None,
    )
    adapter = attach_slider_adapter(trainable, targets.names, config)
    with torch.no_grad():  # a slider that already does something, so every path is visible
        for p in adapter.trainable_parameters():
            p.normal_(0.0, 0.05)
    if components.controlnet_is_fresh:  # zero output projections would hide the residuals
        with torch.no_grad():
            for name, p in components.controlnet.named_parameters():
                if "controlnet_" in name and "lora" not in name:
                    p.normal_(0.0, 0.02)
    step = TextSliderStep(family, components, adapter, training_mode=mode, max_strength=1.0)
    task = PromptTask(
        entry="rb",
        kind="pair",
        target="a circle",
        positive="a red circle",
        negative="a blue circle",
        guidance_scale=guidance_scale,
        action=action,
        denoising_steps=6,
    )
    return family, components, adapter, step, task


def _inputs(family, components, task, batch=2, strength=1.0):
    from slider_cn.text_step import TextStepInputs

    prompts = [task.target] * batch + [task.positive] * batch + [task.negative] * batch
    return TextStepInputs(
        task=task,
        cond=family.encode_prompts(components, prompts),
        batch_size=batch,
        resolution=64,
        slider_strength=strength,
        conditioning_pixels=torch.rand(batch, 3, 64, 64),
    )


class Recorder:
    """Every forward of a module: its batch, text rows, grad mode and the slider multiplier."""

    def __init__(self, module, adapter):
        self.calls: list[dict] = []
        self.adapter = adapter
        self.handles = [
            module.register_forward_pre_hook(self.before, with_kwargs=True),
            module.register_forward_hook(self.after),
        ]

    def before(self, module, args, kwargs):
        self.calls.append(
            {
                "batch": args[0].shape[0],
                "text": kwargs["encoder_hidden_states"].detach().clone(),
                "grad": torch.is_grad_enabled(),
                "multiplier": self.adapter.get_multiplier(),
            }
        )

    def after(self, module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        if isinstance(first, torch.Tensor):
            self.calls[-1]["output"] = first.detach().clone()

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("mode", ["lora", "controlnet"])
def test_frozen_predictions_once_per_micro_batch_and_the_slider_sees_only_the_target(mode):
    family, components, adapter, step, task = _step_setup(mode)
    inputs = _inputs(family, components, task)
    b = inputs.batch_size
    unet = Recorder(components.denoiser, adapter)
    controlnet = Recorder(components.controlnet, adapter)
    result = step(inputs, torch.Generator().manual_seed(1), backward=lambda loss: loss.backward())
    unet.close()
    controlnet.close()
    k = result.denoising_steps
    assert 1 <= k < task.denoising_steps
    target, positive, negative = inputs.cond["encoder_hidden_states"].split(b)

    def rows_are(text, prompt_rows):
        return torch.equal(text, prompt_rows)

    # k partial-denoising forwards, one batched frozen forward, one adapted forward
    assert [c["batch"] for c in unet.calls] == [b] * k + [3 * b, b]
    frozen = unet.calls[k]
    assert rows_are(frozen["text"], inputs.cond["encoder_hidden_states"])
    for call in unet.calls[: k + 1]:
        assert call["multiplier"] == 0.0 and not call["grad"]
    for call in unet.calls[:k]:
        assert rows_are(call["text"], target)  # x_t is made on the target prompt
    adapted = unet.calls[-1]
    assert adapted["grad"] and adapted["multiplier"] == 1.0
    assert rows_are(adapted["text"], target)
    # the ControlNet gets every forward's structure; in LoRA-only mode the adapted forward
    # reuses the frozen residuals, in ControlNet mode the slider's ControlNet runs with grad
    cn_batches = [c["batch"] for c in controlnet.calls]
    if mode == "lora":
        assert cn_batches == [b] * k + [3 * b]
    else:
        assert cn_batches == [b] * k + [3 * b, b]
        assert controlnet.calls[-1]["grad"] and controlnet.calls[-1]["multiplier"] == 1.0
        assert rows_are(controlnet.calls[-1]["text"], target)
    # positive and negative prompts reach no forward in which the slider is on
    for call in unet.calls + controlnet.calls:
        if call["multiplier"] != 0.0:
            assert rows_are(call["text"], target)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable_parameters()
    )


@pytest.mark.parametrize(
    "strength,action,sign", [(1.0, "enhance", 1.0), (-1.0, "enhance", -1.0), (1.0, "erase", -1.0)]
)
def test_the_adapted_prediction_is_pulled_along_the_guidance_difference(strength, action, sign):
    family, components, adapter, step, task = _step_setup("lora", action=action, guidance_scale=8.0)
    inputs = _inputs(family, components, task, strength=strength)
    unet = Recorder(components.denoiser, adapter)
    result = step(inputs, torch.Generator().manual_seed(2))
    unet.close()
    eps_t, eps_p, eps_n = unet.calls[-2]["output"].float().chunk(3)
    direction = eps_p - eps_n
    assert direction.abs().mean() > 1e-3  # the prompts differ: the sign matters below
    expected_target = eps_t + sign * task.guidance_scale * direction
    adapted = unet.calls[-1]["output"].float()
    assert result.loss.item() == pytest.approx(
        F.mse_loss(adapted, expected_target).item(), rel=1e-5
    )
    wrong_sign = eps_t - sign * task.guidance_scale * direction
    # the check tells the signs apart: the opposite target gives another loss
    assert F.mse_loss(adapted, wrong_sign).item() != pytest.approx(result.loss.item(), rel=1e-3)
    assert result.strength == strength


def test_neutral_anchors_keep_the_frozen_prediction_at_either_end():
    family, components, adapter, step, task = _step_setup("lora")
    from dataclasses import replace

    from slider_cn.text_step import TextStepInputs

    anchor = replace(task, kind="neutral")
    inputs = TextStepInputs(
        task=anchor,
        cond=family.encode_prompts(components, ["a square", "a square"]),
        batch_size=2,
        resolution=64,
        slider_strength=0.0,
        conditioning_pixels=torch.rand(2, 3, 64, 64),
    )
    unet = Recorder(components.denoiser, adapter)
    result = step(inputs, torch.Generator().manual_seed(3))
    unet.close()
    frozen, adapted = unet.calls[-2], unet.calls[-1]
    assert frozen["multiplier"] == 0.0 and frozen["batch"] == 2
    assert abs(adapted["multiplier"]) == 1.0
    expected = F.mse_loss(adapted["output"].float(), frozen["output"].float()).item()
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)


# --- runs --------------------------------------------------------------------------------
FAMILIES = ("sd1x", "sdxl", "sd3", "flux", "zimage")


@pytest.mark.parametrize("family_name", [*FAMILIES, "sd1x-v"])
def test_a_sampler_step_on_the_exact_prediction_lands_on_the_forward_process(family_name):
    """x_t comes from the family's own sampler steps: given the true prediction for (x0, noise),
    a step from t to t' must give exactly x0 and noise mixed at t' (DDIM / Euler), and the
    schedule must run from pure noise down to clean."""
    from diffusers import DDPMScheduler

    from slider_cn.families import get_family

    family = get_family(TrainConfig(model_family=family_name.removesuffix("-v")))
    components = family.load_components()
    if family_name.endswith("-v"):
        components.noise_scheduler = DDPMScheduler(
            beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
        )
    generator = torch.Generator().manual_seed(0)
    noise = family.initial_noise(components, 2, 64, generator)
    assert noise.shape == (2, components.vae.config.latent_channels, 8, 8)
    grid = family.sampling_timesteps(components, 10, noise)
    total = components.noise_scheduler.config.num_train_timesteps
    assert grid[0] >= total * 0.99 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    clean = torch.randn(noise.shape, generator=generator)
    for i in (1, 4, 8):
        t, t_next = grid[i].expand(2), grid[i + 1].expand(2)
        noisy = family.noise_latents(components, clean, noise, t)
        exact = family.training_target(components, clean, noise, t)
        stepped = family.denoise_step(components, noisy, t, t_next, exact)
        expected = family.noise_latents(components, clean, noise, t_next)
        torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lora", "controlnet"])
def test_text_slider_trains_beside_images_on_every_family(tmp_path, family, mode):
    """Both modes on every family, with the family's ControlNet in every forward, mixed with
    image backends in one run; the written slider is non-zero and names its prompts."""
    edge = tmp_path / "data" / "neutral_edges" / "neutral_000.png"  # written by make_config
    config = make_config(
        tmp_path,
        model_family=family,
        training_mode=mode,
        max_train_steps=6,
        learning_rate=1e-2,
        # validation during the run, on the entry's target (no prompt library given)
        validation_steps=6,
        validation_num_inference_steps=2,
        validation_conditioning_image=edge,
    )
    result = train(config)
    assert (Path(config.output_dir) / "validation" / "step-000006" / "rb_sweep.png").is_file()
    lines = log_lines(config.output_dir)
    backends = [line["backend"] for line in lines]
    assert {"rb:+", "rb:-", "rb:neutral"} <= set(backends)
    assert {"circle-plus", "circle-minus"} & set(backends)
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    weights = result.files["diffusers" if mode == "lora" else "controlnet_lora"]
    with safe_open(str(weights), framework="pt") as handle:
        meta = handle.metadata()
        assert any(handle.get_tensor(k).abs().sum() > 0 for k in handle.keys() if "lora_B" in k)
    assert json.loads(meta["slider_cn.prompts"])["rb"]["positive"] == "a red circle"


def test_text_slider_resume_reproduces_the_uninterrupted_run(tmp_path):
    entry = {**ENTRY, "denoising_steps": 5}
    whole = make_config(tmp_path / "whole", entries=[entry], max_train_steps=6)
    train(whole)
    part = make_config(tmp_path / "part", entries=[entry], max_train_steps=3, checkpointing_steps=3)
    train(part)
    resumed = part.model_copy(update={"max_train_steps": 6, "resume_from_checkpoint": "latest"})
    train(resumed)
    a, b = log_lines(whole.output_dir), log_lines(part.output_dir)
    assert [line["backend"] for line in a] == [line["backend"] for line in b]
    assert [line["loss"] for line in a] == pytest.approx([line["loss"] for line in b], rel=1e-5)
