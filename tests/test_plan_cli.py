"""`slider-cn train --config FILE --dry-run --plan N`: the schedule as JSON lines, no model."""

import json

import pytest

from slider_cn.cli import main
from slider_cn.families.base import ModelFamily


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--plan must not build model components")

    monkeypatch.setattr(ModelFamily, "load_components", refuse)


def plan_lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_plan_prints_the_sign_cycled_schedule_without_a_model(demo, capsys, no_model):
    assert main(["train", "--config", str(demo["config"]), "--dry-run", "--plan", "8"]) == 0
    lines = plan_lines(capsys)
    assert [line["step"] for line in lines] == list(range(8))
    assert "".join(line["sign"] for line in lines) == "+-0+-0+-"
    first = lines[0]
    assert set(first) >= {"step", "backend", "slider_strength", "sign", "files"}
    assert (first["backend"], first["slider_strength"]) == ("circle-plus", 0.5)
    assert all(
        line["slider_strength"] == {"+": 0.5, "-": -0.5, "0": 0.0}[line["sign"]] for line in lines
    )
    assert all(len(line["files"]) == 1 and line["files"][0].endswith(".png") for line in lines)
    # The demo has 2 images per group: one epoch is 6 batches; step 6 starts epoch 1.
    assert [line["epoch"] for line in lines] == [0] * 6 + [1] * 2
    epoch0 = sorted(f for line in lines[:6] for f in line["files"])
    assert len(set(epoch0)) == 6


def test_plan_follows_overrides_and_is_deterministic(demo, capsys, no_model):
    args = ["train", "--config", str(demo["config"]), "--plan", "3", "--train_batch_size", "2"]
    assert main(args) == 0
    once = plan_lines(capsys)
    assert main(args) == 0
    assert plan_lines(capsys) == once
    assert [len(line["files"]) for line in once] == [2, 2, 2]
    # Another seed shuffles differently (12 batches of 1 over two epochs).
    single = ["train", "--config", str(demo["config"]), "--plan", "12"]
    assert main(single) == 0
    seed_42 = [line["files"] for line in plan_lines(capsys)]
    assert main([*single, "--seed", "7"]) == 0
    assert [line["files"] for line in plan_lines(capsys)] != seed_42


def test_plan_reports_data_errors_with_exit_2(demo, capsys, no_model):
    demo["dataloader"].write_text(
        json.dumps(
            [
                {"id": "p", "instance_data_dir": "data/plus", "slider_strength": 1},
                {"id": "m", "instance_data_dir": "data/minus", "slider_strength": "minus one"},
            ]
        )
    )
    assert main(["train", "--config", str(demo["config"]), "--dry-run", "--plan", "2"]) == 2
    assert "key 'slider_strength'" in capsys.readouterr().err

    demo["dataloader"].write_text(
        json.dumps(
            [
                {"id": "p", "instance_data_dir": "data/plus", "slider_strength": 1},
                {"id": "m", "instance_data_dir": "data/minus", "slider_strength": -1, "repeats": 1},
            ]
        )
    )
    assert main(["train", "--config", str(demo["config"]), "--dry-run", "--plan", "2"]) == 2
    err = capsys.readouterr().err
    assert "positive group holds 2 samples" in err and "negative group holds 4" in err


def test_plan_needs_a_positive_count(demo, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(demo["config"]), "--dry-run", "--plan", "0"])
    assert info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
