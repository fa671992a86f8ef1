"""SimpleTuner's training configs as they are (config.json / config.toml / config.env), its
machinery keys, and the training keys its users rely on: model_type, optimizers, loss_type,
caption dropout, EMA, validation size and guidance rescale, num_train_epochs 0."""

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from slider_cn.config import ConfigError, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.ema import ema_decay_at
from slider_cn.families import get_family
from slider_cn.losses import denoising_loss
from slider_cn.train import train

# a SimpleTuner config.json as its examples write it (machinery keys included)
SIMPLETUNER = {
    "--model_type": "lora",
    "--model_family": "sd1x",
    "--pretrained_model_name_or_path": "tiny",
    "--data_backend_config": "multidatabackend.json",
    "--output_dir": "output",
    "--resolution": 64,
    "--lora_rank": 4,
    "--num_train_epochs": 0,
    "--max_train_steps": 2,
    "--optimizer": "adamw_bf16",
    "--learning_rate": 1e-3,
    "--seed": 0,
    "--hub_model_id": "my-slider",
    "--push_to_hub": False,
    "--push_checkpoints_to_hub": False,
    "--disable_benchmark": False,
    "--validation_torch_compile": False,
    "--tracker_project_name": "lora-training",
    "--tracker_run_name": "example",
    "--use_ema": False,
    "--validation_guidance_rescale": 0.0,
    "--validation_resolution": "64x64",
    "--vae_batch_size": 1,
    "--grad_clip_method": "value",
    "--caption_dropout_probability": 0.1,
}
NOT_USED = [
    "disable_benchmark",
    "hub_model_id",
    "push_checkpoints_to_hub",
    "push_to_hub",
    "tracker_project_name",
    "tracker_run_name",
    "vae_batch_size",
    "validation_torch_compile",
]


def _toml(values: dict) -> str:
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    return "".join(f'"{k}" = {value(v)}\n' for k, v in values.items())


def test_json_toml_and_env_configs_read_alike_and_list_the_unused_keys_once(tmp_path, caplog):
    paths = write_demo_dataset(tmp_path, images_per_group=2)
    (tmp_path / "config.json").write_text(json.dumps(SIMPLETUNER))
    # TOML with and without the `--`
    plain = {
        k.removeprefix("--") if i % 2 else k: v for i, (k, v) in enumerate(SIMPLETUNER.items())
    }
    (tmp_path / "config.toml").write_text(_toml(plain))
    (tmp_path / "config.env").write_text(
        "# SimpleTuner's config.env\n"
        "export MODEL_TYPE='lora'\n"
        "export MODEL_FAMILY=sd1x\n"
        'export MODEL_NAME="tiny"\n'
        "export DATALOADER_CONFIG=multidatabackend.json\n"
        "export OUTPUT_DIR=output\n"
        "export RESOLUTION=64\n"
        "export NUM_EPOCHS=0\n"
        "export MAX_NUM_STEPS=2  # two steps\n"
        "export OPTIMIZER=adamw_bf16\n"
        "export LEARNING_RATE=1e-3\n"
        "export TRAINING_SEED=0\n"
        "export HUB_MODEL_NAME=my-slider\n"
        "export PUSH_TO_HUB=false\n"
        "export PUSH_CHECKPOINTS=false\n"
        "export USE_EMA=false\n"
        "export TRACKER_PROJECT_NAME=lora-training\n"
        "export TRACKER_RUN_NAME=example\n"
        "export VALIDATION_TORCH_COMPILE=false\n"
        "export VALIDATION_GUIDANCE_RESCALE=0.0\n"
        "export VALIDATION_RESOLUTION=64x64\n"
        "export CAPTION_DROPOUT_PROBABILITY=0.1\n"
        "export TRAINING_NUM_PROCESSES=1\n"
        "export ACCELERATE_EXTRA_ARGS=\n"
        'export TRAINER_EXTRA_ARGS="--lora_rank=4 --disable_benchmark"\n'
        'export TRAINER_EXTRA_ARGS="${TRAINER_EXTRA_ARGS} --vae_batch_size=1"\n'
        "TRAINER_EXTRA_ARGS+=' --grad_clip_method value'\n"
    )
    configs = {}
    for name in ("config.json", "config.toml", "config.env"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="slider_cn.config"):
            configs[name] = load_config(tmp_path / name)
        lines = [
            r.getMessage() for r in caplog.records if "not used by slider-cn" in r.getMessage()
        ]
        # config.env: also its launcher's variables (TRAINING_NUM_PROCESSES is num_processes)
        extra = ["ACCELERATE_EXTRA_ARGS", "num_processes"] if name == "config.env" else []
        assert lines == [f"not used by slider-cn: {', '.join(sorted(NOT_USED + extra))}"], name
    dumps = {name: config.model_dump() for name, config in configs.items()}
    assert dumps["config.toml"] == dumps["config.json"] == dumps["config.env"]
    config = configs["config.json"]
    assert config.optimizer == "adamw" and config.model_type == "lora"
    assert config.num_train_epochs == 0 and config.max_train_steps == 2
    assert config.grad_clip_method == "value" and config.lora_rank == 4
    assert config.data_backend_config == str(paths["dataloader"].resolve())
    # and it trains, as it is: num_train_epochs 0 means max_train_steps
    result = train(configs["config.env"])
    assert result.steps == 2 and len(_log(configs["config.env"])) == 2


def test_env_file_is_read_never_run(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "config.env").write_text(
        f"export MODEL_NAME=$(touch {marker})\n"
        f"export VALIDATION_PROMPT=`touch {marker}`\n"
        "export LORA=4\n"
        "export LORA_RANK=${LORA}\n"
        "export SLIDER_NEUTRAL_MODE='regular'  # a key of ours, in capitals\n"
    )
    config = load_config(tmp_path / "config.env", {"pretrained_model_name_or_path": "tiny"})
    assert not marker.exists()
    assert config.validation_prompt == f"`touch {marker}`"
    assert config.lora_rank == 4 and config.slider_neutral_mode == "regular"
    (tmp_path / "command.env").write_text("export LEARNING_RATE=1e-4\nrm -rf /\n")
    with pytest.raises(ConfigError, match="expected `export NAME=value`"):
        load_config(tmp_path / "command.env")
    (tmp_path / "misspelt.env").write_text("export LEARNING_RAT=1e-4\nexport WANDB_MODE=offline\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "misspelt.env")
    assert str(err.value).endswith(
        "unknown variable 'LEARNING_RAT' (did you mean 'LEARNING_RATE'?)"
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model_type": "full"}, "model_type 'full' (a full fine-tune) is not supported"),
        ({"push_to_hub": True}, "key 'push_to_hub' = true is not supported by slider-cn"),
        ({"optimizer": "lion"}, "optimizer 'lion' is not supported by slider-cn"),
        ({"snr_gamma": 5}, "key 'snr_gamma' = 5 is not supported by slider-cn"),
        ({"num_train_epochs": 0}, "num_train_epochs 0 means 'train for max_train_steps'"),
        ({"num_train_epochs": 0, "max_train_steps": 0}, "but max_train_steps is unset"),
        ({"learning_rat": 1e-4}, "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"hub_model_di": "x"}, "unknown key 'hub_model_di' (did you mean 'hub_model_id'?)"),
        ({"validation_resolution": "1020x768"}, "multiples of 8"),
        ({"optimizer_beta1": 0.8, "adam_beta1": 0.9}, "SimpleTuner's name of 'adam_beta1'"),
    ],
)
def test_keys_that_would_change_training_are_clear_errors(tmp_path, values, message):
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "config.json")
    assert message in str(err.value)


def test_simpletuner_spellings_and_off_values_are_accepted(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "optimizer": "adamw8bit",
                "optimizer_beta2": 0.99,
                "checkpoint_step_interval": 7,
                "snr_gamma": None,
                "use_dora": False,
                "lora_init_type": "default",
                "max_train_steps": 0,
                "validation_resolution": "96x64, 128",
            }
        )
    )
    config = load_config(tmp_path / "config.json")
    assert config.optimizer == "adamw_8bit" and config.adam_beta2 == 0.99
    assert config.checkpointing_steps == 7 and config.max_train_steps is None
    assert config.validation_size == (96, 64)


# --- losses ----------------------------------------------------------------------------------


def _pseudo_huber(d, c):
    return 2 * c * (torch.sqrt(d**2 + c**2) - c)


def test_huber_and_smooth_l1_are_simpletuners_pseudo_huber(tmp_path):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    components = SimpleNamespace(noise_scheduler=scheduler)
    l2 = get_family(load_config(None)).loss(components, pred, target, timesteps)
    assert l2 == torch.nn.functional.mse_loss(pred, target)
    ac = scheduler.alphas_cumprod[timesteps]
    snr_c = (1 - 0.1) / (1 + ((1 - ac) / ac).sqrt()) ** 2 + 0.1  # SimpleTuner's `snr` schedule
    expected = {
        ("huber", "snr"): _pseudo_huber(pred - target, snr_c.view(-1, 1, 1, 1)).mean(),
        ("huber", "constant"): _pseudo_huber(pred - target, 0.1).mean(),
        ("smooth_l1", "constant"): (_pseudo_huber(pred - target, 0.1) / 0.1).mean(),
        ("huber", "exponential"): _pseudo_huber(
            pred - target, (0.1 ** (timesteps / 1000)).view(-1, 1, 1, 1)
        ).mean(),
    }
    for (loss_type, schedule), value in expected.items():
        config = load_config(None, {"loss_type": loss_type, "huber_schedule": schedule})
        loss = get_family(config).loss(components, pred, target, timesteps)
        assert loss == pytest.approx(value.item(), rel=1e-5), (loss_type, schedule)
        assert not math.isclose(loss.item(), l2.item(), rel_tol=1e-3)
    # small errors: pseudo-Huber ~ squared error; large: ~ 2c|d|
    small = denoising_loss(torch.tensor([1e-3]), torch.zeros(1), "huber", 0.1)
    large = denoising_loss(torch.tensor([100.0]), torch.zeros(1), "huber", 0.1)
    assert small == pytest.approx(1e-6, rel=1e-3) and large == pytest.approx(19.98, rel=1e-3)


def test_flow_loss_composes_loss_type_with_flow_loss_weighting():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([100.0, 800.0])
    components = SimpleNamespace(noise_scheduler=FlowMatchEulerDiscreteScheduler())
    config = load_config(
        None,
        {
            "model_family": "sd3",
            "loss_type": "huber",
            "huber_schedule": "snr",
            "flow_loss_weighting": "sigma_sqrt",
        },
    )
    loss = get_family(config).loss(components, pred, target, timesteps)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    c = (1 - 0.1) / (1 + sigma / (1 - sigma)) ** 2 + 0.1  # noise over signal: sigma / (1 - sigma)
    weights = compute_loss_weighting_for_sd3("sigma_sqrt", sigma)
    assert loss == pytest.approx(
        (weights * _pseudo_huber(pred - target, c)).mean().item(), rel=1e-5
    )


# --- validation size and guidance rescale ----------------------------------------------------


def test_validation_renders_at_validation_resolution_with_guidance_rescale(caplog):
    config = load_config(
        None, {"validation_resolution": "96x64,128", "validation_guidance_rescale": "0.7"}
    )
    kwargs = get_family(config).validation_call_kwargs("a cat", None, config)
    assert (kwargs["width"], kwargs["height"]) == (96, 64)
    assert kwargs["guidance_rescale"] == 0.7  # StableDiffusionPipeline takes it
    flux = load_config(None, {"model_family": "flux", "validation_guidance_rescale": "0.7"})
    with caplog.at_level(logging.WARNING, logger="slider_cn.validate"):
        for _ in range(2):
            kwargs = get_family(flux).validation_call_kwargs("a cat", None, flux)
    assert "guidance_rescale" not in kwargs and (kwargs["width"], kwargs["height"]) == (64, 64)
    warnings = [r for r in caplog.records if "validation_guidance_rescale" in r.getMessage()]
    assert len(warnings) == 1 and "FluxPipeline" in warnings[0].getMessage()


# --- training: EMA, caption dropout, resume, prodigy ------------------------------------------


def _run(root: Path, **values):
    paths = write_demo_dataset(root, images_per_group=2)
    return load_config(paths["config"], {k: str(v) for k, v in values.items()})


def _log(config) -> list[dict]:
    lines = (Path(config.output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


EMA_RUN = dict(
    use_ema="true",
    ema_decay="0.6",
    caption_dropout_probability="0.3",
    loss_type="huber",
    checkpointing_steps=1,
)


def test_ema_is_the_recurrence_of_the_weights_and_is_written_beside_the_slider(tmp_path):
    config = _run(tmp_path / "full", max_train_steps=3, **EMA_RUN)
    train(config)
    out = Path(config.output_dir)
    steps = [load_file(str(out / f"checkpoint-{s}" / "trainable.safetensors")) for s in range(1, 4)]
    expected = {k: v.clone() for k, v in steps[0].items()}  # the first update copies
    for n, weights in enumerate(steps[1:], start=1):
        d = ema_decay_at(n, 0.6)
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * weights[k]
    ema = load_file(str(out / "checkpoint-3" / "ema.safetensors"))
    assert ema.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(ema[k], expected[k])

    main = load_file(str(out / "pytorch_lora_weights.safetensors"))
    averaged = load_file(str(out / "pytorch_lora_weights_ema.safetensors"))
    assert main.keys() == averaged.keys()
    for key, value in averaged.items():  # unet.<module> <- adapter.<module> (alpha = rank)
        torch.testing.assert_close(value, expected["adapter." + key.removeprefix("unet.")])
    assert any(not torch.equal(main[k], averaged[k]) for k in main if "lora_B" in k)
    with safe_open(str(out / "pytorch_lora_weights_ema.safetensors"), framework="pt") as handle:
        assert handle.metadata()["slider_cn.ema"] == "true"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "base")
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_ema.safetensors")
    assert any("lora_A" in name for name, _ in pipe.unet.named_parameters())

    # caption dropout at 0.3 drew for every image caption and dropped some, not all
    dropped = [record["dropped_captions"] for record in _log(config)]
    assert len(dropped) == 3 and 0 < sum(dropped) < 3

    # resume: the same losses, dropped captions and EMA as the uninterrupted run
    part = _run(tmp_path / "part", max_train_steps=2, **EMA_RUN)
    train(part)
    resumed = load_config(
        Path(part.data_backend_config).parent / "config.json",
        {
            "resume_from_checkpoint": "latest",
            "output_dir": part.output_dir,
            "max_train_steps": "3",
            **{k: str(v) for k, v in EMA_RUN.items()},
        },
    )
    train(resumed)
    full_log, part_log = _log(config), _log(part)
    assert [r["dropped_captions"] for r in part_log] == dropped
    assert [r["loss"] for r in part_log] == pytest.approx([r["loss"] for r in full_log], rel=1e-5)
    resumed_ema = load_file(str(Path(part.output_dir) / "checkpoint-3" / "ema.safetensors"))
    for k in expected:
        torch.testing.assert_close(resumed_ema[k], ema[k])


def test_caption_dropout_draws_at_its_rate_from_the_run_generator():
    from slider_cn.recipe import SliderRecipe

    def dropper(p, seed=0):
        recipe = SimpleNamespace(
            config=SimpleNamespace(caption_dropout_probability=p),
            generator=torch.Generator().manual_seed(seed),
        )
        return lambda captions: SliderRecipe._drop_captions(recipe, captions)

    drop = dropper(0.3)
    kept = drop(["a circle"] * 4000)
    assert set(kept) == {"", "a circle"}
    assert kept.count("") / 4000 == pytest.approx(0.3, abs=0.03)
    assert dropper(0.3)(["a circle"] * 4000) == kept  # the same generator state, the same draw
    untouched = dropper(0.0)
    assert untouched(["a circle"] * 10) == ["a circle"] * 10


def test_prodigy_trains_or_says_how_to_install_it(tmp_path, monkeypatch):
    pytest.importorskip("prodigyopt")
    config = _run(
        tmp_path / "run",
        max_train_steps=1,
        optimizer="prodigy",
        learning_rate=1.0,
        optimizer_config="d_coef=0.5,use_bias_correction=true",
    )
    result = train(config)
    state = torch.load(Path(config.output_dir) / "checkpoint-1" / "optimizer.pt", weights_only=True)
    group = state["param_groups"][0]
    assert group["d_coef"] == 0.5 and group["use_bias_correction"] is True and "d" in group
    assert result.steps == 1

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "prodigyopt" else real(name, *a),
    )
    other = _run(tmp_path / "other", max_train_steps=1, optimizer="prodigy")
    with pytest.raises(ConfigError, match="pip install prodigyopt"):
        train(other)


def test_config_reference_lists_simpletuners_accepted_keys():
    from slider_cn import simpletuner

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    reference = readme[readme.index("## Config reference") :]
    for key in (*simpletuner.IGNORED_KEYS, *simpletuner.OFF_ONLY_KEYS, *simpletuner.KEY_ALIASES):
        assert f"`{key}`" in reference, key
    assert "## Coming from SimpleTuner" in readme and "**Dataloader keys.**" in readme
