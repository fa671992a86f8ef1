"""`slider-cn targets`, run in-process."""

import json

from slider_cn.cli import main
from slider_cn.targets import architectures


def run_json(capsys, *argv: str) -> dict:
    assert main(["targets", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_family_tiny_json_lists_the_slider_targets(capsys):
    data = run_json(capsys, "--family", "sd1x", "--model", "tiny")
    assert data["family"] == "sd1x" and data["side"] == "denoiser" and data["slider"] is True
    assert data["patterns"] == list(architectures()["sd1x"].slider)
    assert "conv_in" in data["adapted"]
    assert any(name.endswith("attn1.to_q") for name in data["adapted"])
    assert not any("attn2" in name for name in data["adapted"])

    ordinary = run_json(capsys, "--family", "sd1x", "--no-slider")
    assert any("attn2" in name for name in ordinary["adapted"])
    assert ordinary["adapted"] != data["adapted"]


def test_controlnet_side_reports_output_projections(capsys):
    data = run_json(capsys, "--family", "sdxl", "--side", "controlnet")
    assert data["side"] == "controlnet" and data["model_class"] == "ControlNetModel"
    outputs = data["controlnet_output_projections"]
    assert "controlnet_mid_block" in outputs and "controlnet_cond_embedding.conv_out" in outputs
    assert not set(outputs) & set(data["adapted"])
    assert not any("attn2" in name or "add_embedding" in name for name in data["adapted"])


def test_table_has_every_module_and_a_summary(capsys):
    assert main(["targets", "--family", "sd1x"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "module",
        "layer",
        "weight",
        "shape",
        "matched",
        "pattern",
    ]
    row = next(line for line in out.splitlines() if line.startswith("conv_in "))
    assert row.split() == ["conv_in", "Conv2d", "32x4x3x3", "conv_in"]
    assert "28 modules adapted on UNet2DConditionModel" in out
    assert "attn1.to_q x4" in out


def test_config_decides_family_mode_and_slider(demo, capsys):
    config = demo["config"]
    # The demo config turns slider_lora_target on and trains on the denoiser.
    data = run_json(capsys, "--config", str(config))
    assert data["slider"] is True and data["side"] == "denoiser"
    assert data["family"] == "sd1x" and data["model_class"] == "UNet2DConditionModel"
    data = run_json(capsys, "--config", str(config), "--slider_lora_target", "false")
    assert data["slider"] is False and any("attn2" in name for name in data["adapted"])
    data = run_json(capsys, "--config", str(config), "--training_mode", "controlnet")
    assert data["side"] == "controlnet" and data["model_class"] == "ControlNetModel"
    data = run_json(capsys, "--config", str(config), "--no-slider")
    assert data["slider"] is False


def test_list_families(capsys):
    assert main(["targets", "--list-families"]) == 0
    out = capsys.readouterr().out
    for name in ("sd1x", "sdxl", "zimage", "kandinsky5", "stable_cascade"):
        assert name in out
    data = run_json(capsys, "--list-families")
    from slider_cn.families import family_names

    listed = [f["family"] for f in data["families"]]
    assert listed == family_names() and {"flux", "sd1x", "sd3", "sdxl", "zimage"} <= set(listed)
    assert {a["architecture"] for a in data["architectures"]} == set(architectures())


def test_unknown_family_is_a_clear_error(capsys):
    assert main(["targets", "--family", "sdx"]) == 2
    err = capsys.readouterr().err
    assert "unknown model family 'sdx'" in err and "did you mean" in err
