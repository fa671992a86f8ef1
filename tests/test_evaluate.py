"""slider-cn evaluate: statistics, the report and plot, CLIP scoring, and its command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from slider_cn.cli import main
from slider_cn.config import load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.evaluate import (
    ClipMeasure,
    _finite,
    _slides_both_ways,
    evaluate_run,
    spearman,
    sweep_strengths,
)
from slider_cn.train import train
from slider_cn.validate import SweepRenderer, ValidationPrompt


def test_spearman_and_both_ways():
    assert spearman([-1, 0, 1], [0.1, 0.2, 0.9]) == pytest.approx(1.0)
    assert spearman([-1, 0, 1], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([-1, 0, 1], [2, 2, 2]))
    assert _slides_both_ways(0.4, 0.5)
    assert _slides_both_ways(-0.4, -0.5)  # a reversed slider still slides both ways
    assert not _slides_both_ways(0.02, 0.9)  # one side only
    assert not _slides_both_ways(-0.3, 0.9)  # backwards on one side
    assert not _slides_both_ways(0.0, 0.0)
    # undefined figures are written as null (strict JSON has no NaN)
    assert (
        json.dumps(_finite({"a": [math.nan, 1.0], "b": math.inf}))
        == '{"a": [null, 1.0], "b": null}'
    )
    assert sweep_strengths([1, -1, 0, 0.5, 0]) == [-1.0, 0.0, 0.5, 1.0]


def tiny_clip(folder):
    """A random-weight CLIP with the shapes tokenizer: offline, for the scoring path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from slider_cn.shapes.models import build_tokenizer

    tokenizer = build_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        image_size=32,
        patch_size=8,
    )
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    paths = write_demo_dataset(root / "data", images_per_group=2)
    config = load_config(
        paths["config"],
        {
            "max_train_steps": "3",
            "learning_rate": "5e-2",
            "output_dir": str(root / "out"),
            "validation_prompt": "a circle",
            "validation_num_inference_steps": "2",
        },
    )
    return paths, config, train(config)


def test_clip_scored_sweep_report_plot_and_grids(tiny_run, tmp_path):
    paths, config, result = tiny_run
    clip = ClipMeasure(str(tiny_clip(tmp_path / "clip")), "a large circle", "a small circle")
    prompts = [ValidationPrompt("circle", "a circle", 1.0), ValidationPrompt("sq", "a square", 1.0)]
    seeds = [0, 1, 2]
    evaluation = evaluate_run(
        result.family,
        result.components,
        result.adapter,
        config,
        tmp_path / "eval",
        prompts=prompts,
        strengths=[1, -1, 0],  # any order: the report sorts them
        seeds=seeds,
        measure=clip,
    )
    report = json.loads(evaluation.json_path.read_text())
    assert report["measure"] == "clip" and report["attribute"] == "clip_delta"
    assert report["strengths"] == [-1.0, 0.0, 1.0]
    rows = report["per_strength"]["clip_delta"]
    assert [r["n"] for r in rows] == [len(prompts) * len(seeds)] * 3
    # the s = 0 row is the CLIP score of exactly the pictures the sweep draws at 0
    with SweepRenderer(result.family, result.components, result.adapter, config) as renderer:
        at_zero = [renderer.render(p.prompt, 0.0, seeds) for p in prompts]
    direct = [r["values"]["clip_delta"] for images in at_zero for r in clip(images)]
    assert rows[1]["mean"] == pytest.approx(float(np.mean(direct)), rel=1e-4, abs=1e-4)
    means = [r["mean"] for r in rows]
    assert report["effect_size"] == pytest.approx(means[2] - means[0])
    assert len(report["monotonicity"]["spearman_per_seed"]) == len(seeds)
    with Image.open(evaluation.plot) as plot:
        assert plot.format == "PNG" and plot.width > 200
    for name, grid in evaluation.grids.items():
        with Image.open(grid) as image:
            # one row per seed, one 64-pixel tile per strength
            assert image.width == 3 * 64 and image.height > 3 * 64, name


def test_evaluate_command_line_errors(tiny_run, tmp_path, capsys):
    paths, config, result = tiny_run
    args = ["evaluate", "--config", str(paths["config"]), "--adapter", str(result.output_dir)]
    assert main([*args, "--validation_prompt", "a circle"]) == 2
    assert "--clip_model" in capsys.readouterr().err
    assert main([*args, "--clip_model", "somewhere"]) == 2
    assert "--positive" in capsys.readouterr().err
    clip = str(tiny_clip(tmp_path / "clip"))
    scored = [*args, "--clip_model", clip, "--positive", "a", "--negative", "b", "--prompt", "c"]
    for strengths in ("0,1", "-1,-0.5,0.5,1"):  # too few; no s = 0 to compare with
        assert main([*scored, "--strengths", strengths]) == 2
        assert "--strengths" in capsys.readouterr().err


def test_evaluate_cli_writes_strict_json_and_a_grid_per_prompt(tiny_run, tmp_path, capsys):
    paths, config, result = tiny_run
    clip = str(tiny_clip(tmp_path / "clip"))
    code = main(
        [
            "evaluate",
            "--config",
            str(paths["config"]),
            "--adapter",
            str(result.output_dir),
            "--clip_model",
            clip,
            "--positive",
            "a circle",
            "--negative",
            "a square",
            "--prompt",
            "a circle",
            "--prompt",
            "a circle",  # the same prompt twice: two grids, both reported
            "--seeds",
            "2",
            "--strengths",
            "-1,0,1",
            "--validation_num_inference_steps",
            "2",
            "--output",
            str(tmp_path / "eval"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads(
        (tmp_path / "eval" / "evaluation.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"),
    )
    grids = report["files"]["grids"]
    assert len(grids) == 2 and len(set(grids.values())) == 2
    for name in grids.values():
        assert (tmp_path / "eval" / name).is_file() and name in out
    # two seeds: a per-seed Spearman can be undefined (NaN), and is written as null
    assert all(v is None or -1 <= v <= 1 for v in report["monotonicity"]["spearman_per_seed"])
