"""Bad input found by a review pass: each is one clear line and exit 2, never a traceback."""

import pytest

from slider_cn.cli import _join_negative_values, main
from slider_cn.demo_data import write_demo_dataset


def test_negative_strength_lists_are_values_not_options():
    argv = ["validate", "--strengths", "-1,-0.5,0,0.5,1", "--strength", "-0.5"]
    assert _join_negative_values(argv) == [
        "validate",
        "--strengths=-1,-0.5,0,0.5,1",
        "--strength=-0.5",
    ]


@pytest.fixture
def run(tmp_path):
    paths = write_demo_dataset(tmp_path / "run", images_per_group=2)
    assert main(["train", "--config", str(paths["config"]), "--max_train_steps", "2"]) == 0
    return paths


def test_resume_with_another_rank_is_a_clear_error(run, capsys):
    code = main(
        [
            "train",
            "--config",
            str(run["config"]),
            "--resume_from_checkpoint",
            "latest",
            "--lora_rank",
            "8",
            "--max_train_steps",
            "4",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "lora_rank" in err and "Traceback" not in err


def test_resume_past_max_steps_says_nothing_is_left(run, capsys):
    code = main(
        [
            "train",
            "--config",
            str(run["config"]),
            "--resume_from_checkpoint",
            "latest",
            "--max_train_steps",
            "1",
        ]
    )
    assert code == 2
    assert "nothing left to train" in capsys.readouterr().err


def test_output_dir_that_is_a_file(run, capsys):
    code = main(
        [
            "train",
            "--config",
            str(run["config"]),
            "--output_dir",
            str(run["config"]),
            "--max_train_steps",
            "1",
        ]
    )
    assert code == 2
    assert str(run["config"]) in capsys.readouterr().err


def test_export_refuses_a_non_finite_strength(run, capsys):
    output = run["config"].parent / "output"
    with pytest.raises(SystemExit) as info:
        main(["export", "--adapter", str(output), "--format", "kohya", "--strength", "nan"])
    assert info.value.code == 2
    assert "finite" in capsys.readouterr().err


def test_unreadable_image_mid_run_keeps_a_checkpoint(tmp_path, capsys):
    paths = write_demo_dataset(tmp_path / "run", images_per_group=2)
    (paths["minus"] / "minus_000.png").write_bytes(b"not a png")
    code = main(["train", "--config", str(paths["config"]), "--max_train_steps", "6"])
    assert code == 2
    err = capsys.readouterr().err
    assert "minus_000.png" in err
    assert list((tmp_path / "run" / "output").glob("checkpoint-*"))
