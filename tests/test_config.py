import json

import pytest
import torch

from slider_cn.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text, name="config.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, json.dumps({"learning_rate": 1e-3}))
    overrides = parse_overrides(
        [
            "--slider_lora_target",
            "true",
            "--learning_rate",
            "1e-4",
            "--train_batch_size=2",
            "--assistant_lora_strength",
            "-0.5",
        ]
    )
    config = load_config(path, overrides)
    assert config.slider_lora_target is True
    assert config.learning_rate == pytest.approx(1e-4)
    assert config.train_batch_size == 2
    assert config.assistant_lora_strength == -0.5
    assert config.model_family == "sd1x" and config.is_tiny


def test_bare_flag_means_true_and_none_clears():
    assert parse_overrides(["--gradient_checkpointing"]) == {"gradient_checkpointing": "true"}
    config = load_config(None, {"max_train_steps": "none", "lora_alpha": "null"})
    assert config.max_train_steps is None and config.lora_alpha is None


def test_unknown_key_in_file_suggests(tmp_path):
    path = write(tmp_path, json.dumps({"learning_rat": 1}))
    with pytest.raises(
        ConfigError, match=r"unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"
    ):
        load_config(path)


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match="command line: unknown key 'not_a_key'"):
        load_config(None, {"not_a_key": "1"})


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, json.dumps({"train_batch_size": "two"}))
    with pytest.raises(ConfigError, match=r"key 'train_batch_size'.*integer"):
        load_config(path)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("train_batch_size", 0, "greater than or equal to 1"),
        ("learning_rate", -1.0, "greater than 0"),
        ("resolution", 100, "multiple of 8"),
        ("lora_dropout", 1.5, "less than 1"),
        ("training_mode", "full", "'lora' or 'controlnet'"),
        ("model_family", "sd15", "unknown model family 'sd15'"),
    ],
)
def test_out_of_range(tmp_path, key, value, pattern):
    path = write(tmp_path, json.dumps({key: value}))
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)


def test_malformed_json_gives_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "seed": 1,\n  "lora_rank": ,\n}')
    with pytest.raises(ConfigError, match="line 3, column 16"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.json")


def test_missing_referenced_file(tmp_path):
    path = write(tmp_path, json.dumps({"data_backend_config": "nowhere.json"}))
    with pytest.raises(ConfigError, match="data_backend_config': file not found: .*nowhere.json"):
        load_config(path)


def test_relative_paths_resolve_against_config_folder(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "data.json").write_text("[]")
    path = write(sub, json.dumps({"data_backend_config": "data.json", "output_dir": "out"}))
    config = load_config(path)
    assert config.data_backend_config == str(sub / "data.json")
    assert config.output_dir == str(sub / "out")


def test_simpletuner_spellings(tmp_path):
    path = write(tmp_path, json.dumps({"--controlnet": True, "--lora_rank": 8}))
    config = load_config(path)
    assert config.training_mode == "controlnet"
    assert config.lora_rank == 8


def test_lycoris_needs_its_config():
    with pytest.raises(ConfigError, match="lycoris_config"):
        load_config(None, {"lora_type": "lycoris"})


def test_top_level_must_be_object(tmp_path):
    path = write(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(path)


def test_every_problem_is_reported_in_one_run(tmp_path, capsys):
    """Five unknown keys and one bad value: one run of the CLI prints all six, exit 2."""
    from slider_cn.cli import main

    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "learning_rat": 1e-4,
                "use_emma": True,
                "hub_modelid": "x",
                "lora_rnk": 4,
                "push_to_hubb": False,
                "train_batch_size": 0,
                "max_train_steps": 2,
            }
        )
    )
    assert main(["train", "--config", str(path), "--dry-run", "--seeed", "1"]) == 2
    err = capsys.readouterr().err
    for key in ("learning_rat", "use_emma", "hub_modelid", "lora_rnk", "push_to_hubb", "seeed"):
        assert f"unknown key '{key}'" in err, key
    assert "did you mean 'learning_rate'" in err and "did you mean 'lora_rank'" in err
    # SimpleTuner's accepted keys are did-you-mean targets only when none of ours is close
    assert "did you mean 'use_ema'" in err and "did you mean 'hub_model_id'" in err
    assert "key 'train_batch_size'" in err


def test_defaults_follow_the_family_and_the_model(caplog):
    from slider_cn.config import TINY_RESOLUTION, TrainConfig

    assert TrainConfig().slider_lora_target is True  # the slider rule, not cross-attention
    assert TrainConfig(slider_lora_target=False).slider_lora_target is False
    assert TrainConfig().resolution == TINY_RESOLUTION
    assert TrainConfig(pretrained_model_name_or_path="org/sd15").resolution == 512
    for family in ("sdxl", "sd3", "flux", "zimage"):
        config = TrainConfig(model_family=family, pretrained_model_name_or_path="org/model")
        assert config.resolution == 1024, family
    assert TrainConfig(pretrained_model_name_or_path="shapes").resolution == 32
    assert TrainConfig(model_family="sdxl", resolution=768).resolution == 768

    def guidance(family: str, model: str) -> float:
        return TrainConfig(
            model_family=family, pretrained_model_name_or_path=model
        ).validation_guidance

    assert guidance("sd1x", "org/sd15") == 7.5
    assert guidance("flux", "black-forest-labs/FLUX.1-dev") == 3.5
    assert guidance("zimage", "Tongyi-MAI/Z-Image-Turbo") == 0.0
    assert guidance("zimage", "Tongyi-MAI/Z-Image") == 5.0
    assert TrainConfig(model_family="flux", validation_guidance=2.0).validation_guidance == 2.0

    # `auto` is resolved where the device is known; without a GPU it is no autocast
    from slider_cn.precision import autocast_precision

    assert TrainConfig().mixed_precision == "auto"
    if not torch.cuda.is_available():
        assert autocast_precision(TrainConfig()) == "no"
    assert autocast_precision(TrainConfig(mixed_precision="bf16")) == "bf16"

    with caplog.at_level("WARNING", logger="slider_cn.config"):
        TrainConfig(model_family="sd1x", flow_schedule_shift=3.0)
    assert "flow_schedule_shift" in caplog.text and "sd1x ignores it" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="slider_cn.config"):
        TrainConfig(model_family="sd3", flow_schedule_shift=3.0)
        TrainConfig(model_family="flux", flux_guidance_value=3.5)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="slider_cn.config"):
        TrainConfig(model_family="sd3", flux_guidance_value=3.5)
    assert "flux_guidance_value" in caplog.text


def test_reading_a_config_imports_no_model_library():
    """`--plan`, the dry run's checks and the web UI read configs: per-family defaults come from
    the registry's lines, so that costs no torch / diffusers / transformers import."""
    import subprocess
    import sys

    code = (
        "import sys; from slider_cn.config import load_config; "
        "c = load_config(None, {'model_family': 'zimage', 'pretrained_model_name_or_path': "
        "'Tongyi-MAI/Z-Image-Turbo'}); "
        "assert (c.resolution, c.validation_guidance) == (1024, 0.0), c; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
