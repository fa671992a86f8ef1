"""What every family added after the first five must do (the first five have their own, deeper
files: tests/test_families.py, tests/test_flow_families.py). The registry is enumerated, so a new
family is tested here as soon as its line is in `slider_cn/families/__init__.py`:

- `slider-cn targets --family F --model tiny --json` lists slider targets, none on a text,
  context or cross-attention path;
- the tiny model is deterministic and its prompt encoding tells captions apart;
- the objective inverts: the target and the clean/noise estimates recover what was noised, and
  one sampler step on the exact prediction lands on the forward process;
- a tiny run trains in each mode the family has and resumes to the uninterrupted run's losses;
- a fresh ControlNet's zero-initialised projections receive gradients in ControlNet mode;
- each example config under configs/ passes a dry run on `tiny`.

Reloading into the family's own pipeline, exports and `slider-cn validate` are in
tests/test_family_outputs.py, which enumerates the registry too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slider_cn.cli import main
from slider_cn.config import TrainConfig, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.families import family_card, family_names, get_family
from slider_cn.train import train
from tests.test_targets import text_or_cross

pytestmark = pytest.mark.slow

ORIGINAL = ("sd1x", "sdxl", "sd3", "flux", "zimage")
NEW = tuple(f for f in family_names() if f not in ORIGINAL)
CASES = [
    (f, m) for f in NEW for m in ("lora", "controlnet") if m == "lora" or family_card(f).controlnet
]
CN_NEW = tuple(f for f in NEW if family_card(f).controlnet)
CONFIGS = Path(__file__).parents[1] / "configs"
PROMPT = "a large circle"


def make_config(root: Path, family: str, **overrides) -> TrainConfig:
    paths = write_demo_dataset(root, images_per_group=2, resolution=64, conditioning="folders")
    values = {
        "model_family": family,
        "max_train_steps": "2",
        "checkpointing_steps": "100",
        "learning_rate": "1e-2",
        **{k: str(v) for k, v in overrides.items()},
    }
    return load_config(paths["config"], values)


def losses(output_dir: str | Path) -> list[float]:
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize("family", NEW)
def test_targets_cli_lists_slider_targets_and_no_text_path(family, capsys):
    assert main(["targets", "--family", family, "--model", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == family and report["slider"]
    assert report["adapted"], "no slider target matched the tiny model"
    assert not [n for n in report["adapted"] if text_or_cross(n)]


@pytest.mark.parametrize("family", NEW)
def test_tiny_is_deterministic_and_its_encoder_tells_captions_apart(family):
    fam = get_family(TrainConfig(model_family=family))
    first, second = fam.load_components(), fam.load_components()
    for (name, a), (_, b) in zip(
        first.denoiser.state_dict().items(), second.denoiser.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    cond = fam.encode_prompts(first, ["a red circle", "a blue square"])
    main_key = next(iter(cond))
    assert not torch.allclose(cond[main_key][0].float(), cond[main_key][1].float())


@pytest.mark.parametrize("family", NEW)
def test_the_objective_inverts_and_a_sampler_step_lands_on_the_forward_process(family):
    fam = get_family(TrainConfig(model_family=family))
    components = fam.load_components()
    generator = torch.Generator().manual_seed(0)
    noise = fam.initial_noise(components, 2, 64, generator)
    clean = torch.randn(noise.shape, generator=generator)
    grid = fam.sampling_timesteps(components, 10, noise)
    assert bool((grid[1:] <= grid[:-1]).all()) and grid[-1] <= grid[0] * 0.01
    for i in (1, 4, 8):
        t, t_next = grid[i].expand(2), grid[i + 1].expand(2)
        noisy = fam.noise_latents(components, clean, noise, t)
        exact = fam.training_target(components, clean, noise, t)
        torch.testing.assert_close(
            fam.clean_latent_estimate(components, noisy, t, exact).float(),
            clean,
            rtol=1e-4,
            atol=1e-4,
        )
        stepped = fam.denoise_step(components, noisy, t, t_next, exact)
        expected = fam.noise_latents(components, clean, noise, t_next)
        torch.testing.assert_close(stepped.float(), expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_a_tiny_run_trains_and_resumes_to_the_same_losses(tmp_path, family, mode):
    full = make_config(tmp_path / "full", family, training_mode=mode, max_train_steps=4)
    result = train(full)
    assert len(losses(full.output_dir)) == 4
    assert all(torch.isfinite(torch.tensor(losses(full.output_dir))))
    assert any(p.abs().sum() > 0 for p in result.adapter.trainable_parameters())
    part = make_config(
        tmp_path / "part", family, training_mode=mode, max_train_steps=2, checkpointing_steps=2
    )
    train(part)
    resumed = load_config(
        Path(part.data_backend_config).parent / "config.json",
        {
            "model_family": family,
            "training_mode": mode,
            "learning_rate": "1e-2",
            "max_train_steps": "4",
            "checkpointing_steps": "2",
            "resume_from_checkpoint": "latest",
            "output_dir": part.output_dir,
        },
    )
    train(resumed)
    assert losses(part.output_dir) == pytest.approx(losses(full.output_dir), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("family", CN_NEW)
def test_a_fresh_controlnet_trains_its_zero_projections(tmp_path, family):
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.step import SliderStep, StepInputs
    from slider_cn.targets import controlnet_output_projections, resolve_targets

    config = make_config(tmp_path / "run", family, training_mode="controlnet")
    fam = get_family(config)
    components = fam.load_components()
    controlnet = components.controlnet
    assert components.controlnet_is_fresh
    names = resolve_targets(
        controlnet, fam.name, side="controlnet", exclude_shared_with=components.denoiser
    ).names
    adapter = attach_slider_adapter(controlnet, names, config)
    modules = dict(controlnet.named_modules())
    projections = [
        p
        for n in controlnet_output_projections(controlnet, fam.name)
        for p in modules[n].parameters()
    ]
    assert projections and all(p.abs().sum() == 0 for p in projections)  # zero-initialised
    for p in projections:
        p.requires_grad_(True)
    step = SliderStep(
        fam,
        components,
        adapter,
        training_mode="controlnet",
        neutral_mode="preserve",
        max_strength=0.5,
    )
    inputs = StepInputs(
        latents=fam.initial_noise(components, 1, 64, torch.Generator().manual_seed(1)),
        cond=fam.encode_prompts(components, [PROMPT]),
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
    for name, p in components.denoiser.named_parameters():
        assert p.grad is None, name


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_each_mode_has_an_example_config_that_passes_a_dry_run(tmp_path, capsys, family, mode):
    examples = [
        c
        for c in sorted(CONFIGS.glob(f"{family}-*.json"))
        if json.loads(c.read_text()).get("training_mode", "lora") == mode
    ]
    assert examples, f"no configs/{family}-*.json in {mode} mode"
    paths = write_demo_dataset(tmp_path, images_per_group=2, resolution=64, conditioning="folders")
    for path in examples:
        args = ["train", "--config", str(path), "--dry-run"]
        args += ["--pretrained_model_name_or_path", "tiny"]
        args += ["--controlnet_model_name_or_path", "none"]
        args += ["--data_backend_config", str(paths["dataloader"]), "--resolution", "64"]
        args += ["--output_dir", str(tmp_path / path.stem)]
        assert main(args) == 0, path.name
        assert json.loads(capsys.readouterr().out)["model_family"] == family


@pytest.mark.parametrize("name", ["stable_cascade", "wan"])
def test_architectures_that_cannot_be_trained_say_why(name):
    with pytest.raises(Exception, match="cannot be trained: .*(two models|video)"):
        TrainConfig(model_family=name)
