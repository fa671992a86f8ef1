import json
import subprocess
import sys

from slider_cn.cli import main


def test_dry_run_prints_resolved_config(demo, capsys):
    assert (
        main(["train", "--config", str(demo["config"]), "--dry-run", "--learning_rate", "3e-4"])
        == 0
    )
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["learning_rate"] == 3e-4
    assert resolved["data_backend_config"] == str(demo["dataloader"])


def test_unknown_key_exits_2_with_suggestion(demo, capsys):
    assert main(["train", "--config", str(demo["config"]), "--not_a_key", "1"]) == 2
    assert "unknown key 'not_a_key'" in capsys.readouterr().err
    assert main(["train", "--config", str(demo["config"]), "--lora_rnk", "4"]) == 2
    assert "did you mean 'lora_rank'" in capsys.readouterr().err


def test_dry_run_requires_dataloader_config(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text("{}")
    assert main(["train", "--config", str(config), "--dry-run"]) == 2
    assert "data_backend_config is required" in capsys.readouterr().err


def test_bad_dataloader_config_names_backend(demo, capsys):
    demo["dataloader"].write_text(
        json.dumps([{"id": "x", "instance_data_dir": "data/plus", "slider_strenght": 1}])
    )
    assert main(["train", "--config", str(demo["config"]), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "backend #0 ('x')" in err and "did you mean 'slider_strength'" in err


def test_console_script_help_lists_every_key():
    out = subprocess.run(
        [sys.executable, "-m", "slider_cn.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    from slider_cn.config import KNOWN_KEYS

    for key in KNOWN_KEYS:
        assert f"--{key}" in out


def test_readme_documents_every_key():
    from pathlib import Path

    from slider_cn.config import KNOWN_KEYS
    from slider_cn.data.config import BACKEND_KEYS
    from slider_cn.data.prompts import ENTRY_KEYS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quickstart = readme.index("## Quickstart")
    assert readme.index("make demo") > quickstart and readme.index("make test") > quickstart
    from slider_cn.data.config import IGNORED_BACKEND_KEYS, UNSUPPORTED_BACKEND_KEYS

    for key in (*KNOWN_KEYS, *BACKEND_KEYS, *ENTRY_KEYS, *IGNORED_BACKEND_KEYS):
        assert f"| `{key}` |" in readme, key
    for key in UNSUPPORTED_BACKEND_KEYS:
        assert f"| `{key}` |" in readme, key


def _dry_run_and_train_messages(config_path, capsys, *overrides):
    """The exit code and message of a dry run, and of a real run, of the same command."""
    args = ["train", "--config", str(config_path), *overrides]
    dry = main([*args, "--dry-run"])
    dry_err = capsys.readouterr().err
    real = main(args)
    real_err = capsys.readouterr().err
    return dry, dry_err, real, real_err


def _last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.startswith("slider-cn:")][-1]


def test_dry_run_refuses_what_training_refuses(demo, capsys):
    """--dry-run exit 0 means the run will start: each refusal training makes comes first,
    with the same message."""
    from pathlib import Path

    cases = [
        ("--training_mode", "controlnet"),  # no conditioning images
        ("--validation_steps", "1"),  # validation without a prompt
        ("--report_to", "wandb"),  # its package is not installed
    ]
    for overrides in cases:
        dry, dry_err, real, real_err = _dry_run_and_train_messages(
            demo["config"], capsys, *overrides
        )
        assert dry == real == 2, (overrides, dry_err, real_err)
        assert _last_line(dry_err) == _last_line(real_err), overrides
    # a corrupt image: decoded by the dry run, met by training at its first batch
    bad = sorted(Path(demo["dataloader"]).parent.glob("data/plus/*.png"))[0]
    bad.write_bytes(b"not an image")
    dry = main(["train", "--config", str(demo["config"]), "--dry-run"])
    err = capsys.readouterr().err
    assert dry == 2 and bad.name in err and "cannot be read" in err


def test_dataloader_problems_are_reported_together(demo, capsys):
    demo["dataloader"].write_text(
        json.dumps(
            [
                {"id": "a", "instance_data_dir": "data/plus", "slider_strenght": 1},
                {"id": "b", "instance_data_dir": "data/minus", "crop_stile": "x", "repeats": -1},
            ]
        )
    )
    assert main(["train", "--config", str(demo["config"]), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "backend #0 ('a'): unknown key 'slider_strenght'" in err
    assert "backend #1 ('b'): unknown key 'crop_stile'" in err
    assert "backend #1 ('b'): key 'repeats'" in err


def test_library_version_notes_are_quiet_unless_verbose(capsys):
    """torch's and diffusers' import-time notes about torchao's version are not shown on every
    run; --verbose shows them."""
    import logging

    from slider_cn.cli import _LIBRARY_VERSION_NOTES

    def levels() -> set[int]:
        return {logging.getLogger(name).level for name in _LIBRARY_VERSION_NOTES}

    try:
        for name in _LIBRARY_VERSION_NOTES:
            logging.getLogger(name).setLevel(logging.NOTSET)
        main(["--verbose", "targets", "--list-families"])
        assert levels() == {logging.NOTSET}
        main(["targets", "--list-families"])
        assert levels() == {logging.ERROR}
    finally:
        for name in _LIBRARY_VERSION_NOTES:
            logging.getLogger(name).setLevel(logging.NOTSET)
    capsys.readouterr()
