"""`make demo` end to end (fewer steps): every stage runs and leaves what it promises."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage(tmp_path, monkeypatch, capsys):
    from slider_cn import demo

    monkeypatch.setattr(demo, "STEPS", 10)
    demo.main(str(tmp_path / "demo"))
    out = capsys.readouterr().out
    root = tmp_path / "demo"
    assert len(list((root / "canny" / "plus").glob("*.png"))) == 16  # slider-cn preprocess ran
    for run in ("lora_run", "controlnet_run"):
        assert len(list((root / run / "validation" / "final").glob("*_sweep.png"))) == 2
        report = json.loads((root / run / "evaluation" / "evaluation.json").read_text())
        assert report["attribute"] == "warmth"
        assert [r["strength"] for r in report["per_strength"]["warmth"]] == [-1, -0.5, 0, 0.5, 1]
        assert (root / run / "evaluation" / "evaluation.png").is_file()
    assert (root / "lora_run" / "slider_kohya.safetensors").is_file()
    assert (root / "controlnet_run" / "controlnet_slider.safetensors").is_file()
    assert "What the sliders do" in out and "warmth by strength" in out
