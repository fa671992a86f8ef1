"""Every family's outputs, in both modes, outside slider-cn: the exports, `load_slider`,
`load_slider_controlnet` and `slider-cn validate` on tiny runs of sd1x, sdxl, sd3, flux and
zimage. What is loaded goes into that family's own diffusers pipeline (built from the run's
`base/` folder, with the run's `controlnet/` as the family's ControlNet class) and must give the
prediction the trained model in memory gave (rank 4, alpha 2, so alpha != rank).

Each (family, mode) is trained once per module (3 steps), on first use.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slider_cn import (
    formats,
    load_slider,
    load_slider_controlnet,
    set_slider_strength,
    slider_files,
)
from slider_cn.cli import main
from slider_cn.config import ConfigError, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.families import family_card, family_class, family_names
from slider_cn.train import train

pytestmark = pytest.mark.slow

FAMILIES = tuple(family_names())  # every registered family, a new one included
MODES = ("lora", "controlnet")
# families diffusers has a ControlNet for; the others train in LoRA mode only
CN_FAMILIES = tuple(f for f in FAMILIES if family_card(f).controlnet)
CASES = [(f, m) for f in FAMILIES for m in MODES if m == "lora" or f in CN_FAMILIES]
PROMPT = "a large circle"
STRENGTHS = (-1.0, 0.5, 1.5)
ATOL = 1e-5  # as tests/test_loading_export.py: a reloaded slider is the trained one
MERGED_ATOL = 1e-4  # a merged ControlNet: W + s * B A rounds once more
LOKR = Path(__file__).parents[1] / "configs" / "lycoris_config.json"
# The largest |reloaded - training| seen per (family, mode, what), printed at the end (-s).
DELTAS: dict[tuple[str, str, str], float] = {}


@dataclasses.dataclass
class Run:
    family: str
    mode: str
    config_path: Path
    root: Path
    result: object

    @property
    def out(self) -> Path:
        return Path(self.result.output_dir)

    @property
    def cls(self):
        return family_class(self.family)


def _train(root: Path, family: str, mode: str, **overrides) -> Run:
    paths = write_demo_dataset(root, images_per_group=2, resolution=64, conditioning="folders")
    values = {
        "model_family": family,
        "training_mode": mode,
        "max_train_steps": "3",
        "checkpointing_steps": "100",
        "lora_rank": "4",
        "lora_alpha": "2",
        "learning_rate": "1e-2",  # three steps move the slider well past the tolerance
        **{k: str(v) for k, v in overrides.items()},
    }
    result = train(load_config(paths["config"], values))
    for module in result.components.modules().values():
        module.eval()
    return Run(family, mode, paths["config"], root, result)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    made: dict[tuple[str, str], Run] = {}

    def get(family: str, mode: str) -> Run:
        if (family, mode) not in made:
            made[(family, mode)] = _train(tmp_path_factory.mktemp(f"{family}-{mode}"), family, mode)
        return made[(family, mode)]

    yield get
    if DELTAS:
        print("\nmax |reloaded - training prediction|:")
        for (family, mode, what), delta in sorted(DELTAS.items()):
            print(f"  {family:7} {mode:10} {what:28} {delta:.2e}")


# --- predictions ------------------------------------------------------------------------------
def _inputs(run: Run):
    generator = torch.Generator().manual_seed(0)
    noisy = run.result.family.initial_noise(run.result.components, 1, 64, generator)
    pixels = torch.rand(1, 3, 64, 64, generator=generator)
    cond = run.result.family.encode_prompts(run.result.components, [PROMPT])
    return noisy, torch.tensor([500.0]), cond, pixels


@torch.no_grad()
def predict(run: Run, denoiser=None, controlnet=None) -> torch.Tensor:
    """The denoiser's prediction (with the ControlNet's residuals in controlnet mode), as the
    training step computes it, with the given models in place of the trained ones."""
    family, components = run.result.family, run.result.components
    components = dataclasses.replace(
        components,
        denoiser=denoiser if denoiser is not None else components.denoiser,
        controlnet=controlnet if controlnet is not None else components.controlnet,
    )
    noisy, t, cond, pixels = _inputs(run)
    residuals = None
    if components.controlnet is not None:
        residuals = family.controlnet_residuals(components, noisy, t, cond, pixels, 1.0)
    return family.predict(components, noisy, t, cond, residuals)


def trained(run: Run, strength: float) -> torch.Tensor:
    with run.result.adapter.multiplier(strength):
        return predict(run)


def check(run: Run, what: str, got: torch.Tensor, expected: torch.Tensor, atol=ATOL) -> None:
    delta = (got - expected).abs().max().item()
    key = (run.family, run.mode, what)
    DELTAS[key] = max(DELTAS.get(key, 0.0), delta)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def pipeline(run: Run, controlnet=None):
    """The family's pipeline from the run's base/ folder; its ControlNet pipeline when the run
    has a ControlNet (the run's own by default)."""
    if run.mode == "controlnet" and controlnet is None:
        controlnet = load_slider_controlnet(run.out)
    if controlnet is None:
        pipe = run.cls.pipeline_class.from_pretrained(str(run.out / "base"))
    else:
        pipe = run.cls.controlnet_pipeline_class.from_pretrained(
            str(run.out / "base"), controlnet=controlnet
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def models(run: Run, pipe) -> dict:
    return {
        "denoiser": getattr(pipe, run.cls.lora_component),
        "controlnet": getattr(pipe, "controlnet", None),
    }


def cli(*args: str) -> int:
    return main([str(a) for a in args])


# --- load_slider / load_slider_controlnet -----------------------------------------------------
@pytest.mark.parametrize(("family", "mode"), CASES)
def test_load_slider_into_the_family_pipeline_reproduces_training(runs, family, mode):
    run = runs(family, mode)
    if mode == "controlnet":
        controlnet = load_slider_controlnet(run.out)
        assert type(controlnet) is run.cls.controlnet_model_class
    else:
        with pytest.raises(ConfigError, match="no controlnet/ folder.*base-side slider"):
            load_slider_controlnet(run.out)
    pipe = pipeline(run)
    assert type(pipe) is (
        run.cls.controlnet_pipeline_class if mode == "controlnet" else run.cls.pipeline_class
    )
    holder = "controlnet" if mode == "controlnet" else run.cls.lora_component
    assert load_slider(pipe, run.out) == [holder]
    for s in STRENGTHS:
        assert set_slider_strength(pipe, s) == [holder]
        check(run, "load_slider", predict(run, **models(run, pipe)), trained(run, s))
    # not vacuous: the slider moves the prediction far beyond the tolerance
    assert (trained(run, 1.0) - trained(run, 0.0)).abs().max() > 1e-3
    # the file training writes gives the trained scale (alpha 2, rank 4) to a loader that reads
    # no adapter metadata too (ComfyUI: no `.alpha` keys means alpha = r): alpha/r is folded
    plain = pipeline(run)
    component = run.cls.lora_component
    name = formats.CONTROLNET_LORA_FILE if mode == "controlnet" else formats.BASE_LORA_FILE
    model = plain.controlnet if mode == "controlnet" else getattr(plain, component)
    model.load_lora_adapter(
        str(run.out / name),
        prefix=None if mode == "controlnet" else component,
        adapter_name="slider",
    )
    check(run, "training file, alpha=r", predict(run, **models(run, plain)), trained(run, 1.0))


# --- exports ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "mode"), CASES)
def test_diffusers_export_bakes_the_strength_and_folds_alpha(runs, family, mode, tmp_path):
    run, s = runs(family, mode), -0.5
    path = tmp_path / "slider.safetensors"
    assert (
        cli(
            "export",
            "--adapter",
            run.out,
            "--format",
            "diffusers",
            "--strength",
            s,
            "--output",
            path,
        )
        == 0
    )
    metadata = formats.read_metadata(path)
    assert metadata[formats.ALPHA_FOLDED] == "true"
    assert metadata[formats.EXPORTED_STRENGTH] == "-0.5"
    expected = trained(run, s)
    component = run.cls.lora_component
    # diffusers' loaders, which read the adapter metadata (lora_alpha = r now) ...
    pipe = pipeline(run)
    if mode == "controlnet":
        pipe.controlnet.load_lora_adapter(
            str(tmp_path), weight_name=path.name, prefix=None, adapter_name="slider"
        )
    else:
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="slider")
    check(run, "export diffusers", predict(run, **models(run, pipe)), expected)
    # ... and a loader that takes alpha = r without reading it (ComfyUI reads these keys so)
    plain = pipeline(run)
    holder = plain.controlnet if mode == "controlnet" else getattr(plain, component)
    holder.load_lora_adapter(
        str(path), prefix=None if mode == "controlnet" else component, adapter_name="slider"
    )
    check(run, "export diffusers, alpha=r", predict(run, **models(run, plain)), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_export_where_the_family_has_kohya_names_and_exit_2_where_not(
    runs, family, tmp_path, capsys
):
    run = runs(family, "lora")
    path = tmp_path / "kohya.safetensors"
    code = cli("export", "--adapter", run.out, "--format", "kohya", "--output", path)
    if run.cls.kohya_prefix is None:
        assert code == 2 and not path.exists()
        err = capsys.readouterr().err
        assert "--format diffusers" in err and "Traceback" not in err
        assert not (run.out / formats.KOHYA_FILE).exists()  # training writes none either
        return
    assert code == 0
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        alphas = {handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith(f"{run.cls.kohya_prefix}_") for k in keys)
    assert alphas == {2.0}  # the training alpha, not the rank
    for folder, name in ((tmp_path, path.name), (run.out, formats.KOHYA_FILE)):
        pipe = pipeline(run)
        pipe.load_lora_weights(str(folder), weight_name=name, adapter_name="slider")
        for s in (1.0, -0.5):
            set_slider_strength(pipe, s)
            check(run, "kohya", predict(run, **models(run, pipe)), trained(run, s))


@pytest.mark.parametrize("family", CN_FAMILIES)
def test_merged_controlnet_loads_as_the_family_class_and_equals_the_slider(runs, family, tmp_path):
    run, s = runs(family, "controlnet"), -0.75
    merged = tmp_path / "merged"
    assert (
        cli(
            "export",
            "--adapter",
            run.out,
            "--format",
            "merged-controlnet",
            "--strength",
            s,
            "--output",
            merged,
        )
        == 0
    )
    model = run.cls.controlnet_model_class.from_pretrained(str(merged))
    assert not any("lora" in name for name, _ in model.named_parameters())
    pipe = pipeline(run, controlnet=model)
    check(
        run,
        "merged-controlnet",
        predict(run, **models(run, pipe)),
        trained(run, s),
        atol=MERGED_ATOL,
    )
    assert (trained(run, s) - trained(run, 0.0)).abs().max() > 1e-3


@pytest.mark.parametrize("family", CN_FAMILIES)
def test_formats_that_do_not_fit_are_exit_2_with_the_format_to_use(runs, family, capsys):
    base, side = runs(family, "lora"), runs(family, "controlnet")
    cases = [
        (base, "merged-controlnet", "base-side slider.*use --format"),
        (side, "kohya", "ControlNet-side slider.*--format merged-controlnet"),
    ]
    for run, fmt, message in cases:
        assert cli("export", "--adapter", run.out, "--format", fmt) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert re.search(message, err), err


def test_mismatched_models_are_config_errors(runs, tmp_path, capsys):
    sd3, sd1x, flux = runs("sd3", "controlnet"), runs("sd1x", "controlnet"), runs("flux", "lora")
    # another family's ControlNet for a merge: exit 2, no random weights, no PEFT traceback
    code = cli(
        "export",
        "--adapter",
        sd3.out,
        "--format",
        "merged-controlnet",
        "--controlnet",
        sd1x.out / "controlnet",
        "--output",
        tmp_path / "m",
    )
    err = capsys.readouterr().err
    assert code == 2 and "holds a ControlNetModel" in err and "SD3ControlNetModel" in err
    # a slider into another family's pipeline or model
    with pytest.raises(ConfigError, match="base-side flux slider.*FluxPipeline"):
        load_slider(pipeline(sd1x), flux.out)
    with pytest.raises(ConfigError, match="sd3 ControlNet.*SD3ControlNetModel"):
        load_slider(load_slider_controlnet(sd1x.out), sd3.out)


# --- slider-cn validate -------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "mode"), CASES)
def test_validate_rebuilds_the_run_and_renders(runs, family, mode, tmp_path):
    from slider_cn.validate import rebuild_run

    run = runs(family, mode)
    rebuilt = rebuild_run(load_config(run.config_path, {"model_family": family}), run.out, "cpu")
    for s in (-1.0, 0.5):
        with rebuilt.adapter.multiplier(s):
            got = predict(run, rebuilt.components.denoiser, rebuilt.components.controlnet)
        check(run, "validate rebuild", got, trained(run, s))
    args = [
        "validate",
        "--config",
        run.config_path,
        "--adapter",
        run.out,
        "--model_family",
        family,
        "--strengths",
        "-1,1",
        "--output",
        tmp_path / "v",
        "--validation_prompt",
        PROMPT,
        "--validation_num_inference_steps",
        "1",
    ]
    if mode == "controlnet":
        edges = next((run.root / "data" / "plus_edges").glob("*.png"))
        args += ["--validation_conditioning_image", edges]
    assert cli(*args) == 0
    assert (tmp_path / "v" / "validation.png").is_file()
    assert (tmp_path / "v" / "validation_sweep.png").is_file()


# --- LyCORIS files --------------------------------------------------------------------------------
def _lycoris_run(tmp_path, family: str, mode: str = "lora", **overrides) -> Run:
    if family_class(family).kohya_prefix is not None:  # the UNet families
        config = LOKR  # the guide's LoKr preset: attention, conv_in/out, time embedding
    else:
        config = tmp_path / "lokr.json"
        config.write_text(
            json.dumps({"algo": "lokr", "linear_dim": 4, "linear_alpha": 1, "factor": 4})
        )
    return _train(
        tmp_path / "run",
        family,
        mode,
        lora_type="lycoris",
        lycoris_config=config,
        slider_lora_target="true",
        **overrides,
    )


def _heads(state) -> set[str]:
    return {key.partition(".")[0] for key in state}


@pytest.mark.parametrize("family", ["sd1x"])
def test_unet_lycoris_file_has_kohya_names_that_lycoris_kohya_loads_whole(
    tmp_path, monkeypatch, family
):
    """lycoris-lora's kohya loader (sd-scripts, A1111-style UIs) maps `lora_unet_` names only:
    it must find every module of the file and give the training prediction."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # lycoris-lora 4.1.3: the loader first builds a default network (then discards it) whose
    # targets name the TimestepEmbedding class and its time_embedding.linear_1 both, which
    # asserts "duplicated lora name" on every diffusers UNet; without the names it does not.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    run = _lycoris_run(tmp_path, family)
    file = run.out / formats.LYCORIS_FILE
    weights = load_file(str(file))
    assert formats.read_metadata(file)[formats.LYCORIS_PREFIX] == "lora_unet"
    assert all(k.startswith("lora_unet_") for k in weights)
    unet = run.cls.denoiser_model_class.from_pretrained(str(run.out / "base" / "unet")).eval()
    network, _ = create_network_from_weights(1.0, str(file), None, None, unet)
    assert {lora.lora_name for lora in network.unet_loras} == _heads(weights)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    assert set(network.state_dict()) == set(weights)  # every key of the file is applied
    for s in (1.0, -0.5):
        network.set_multiplier(s)
        check(run, "lycoris.kohya", predict(run, unet), trained(run, s))
    # and slider-cn's own loader and validate's rebuild read the same file
    pipe = run.cls.pipeline_class.from_pretrained(str(run.out / "base"))
    assert load_slider(pipe, run.out, strength=-0.5) == ["unet"]
    check(run, "lycoris load_slider", predict(run, pipe.unet), trained(run, -0.5))


@pytest.mark.parametrize(
    "family,mode", [("flux", "lora"), ("zimage", "controlnet"), ("sd1x", "controlnet")]
)
def test_lycoris_files_of_transformers_and_controlnets_keep_lycoris_names(tmp_path, family, mode):
    """ComfyUI maps SD3 / Flux / Z-Image LyCORIS modules as `lycoris_<diffusers module path>`
    (its `lora_unet_` names are the original checkpoints' paths); a ControlNet-side file is
    for slider_cn.load_slider only. Both keep lycoris-lora's own prefix and reload exactly."""
    run = _lycoris_run(tmp_path, family, mode)
    file = run.out / formats.LYCORIS_FILE
    weights = load_file(str(file))
    assert formats.read_metadata(file)[formats.LYCORIS_PREFIX] == "lycoris"
    trained_on = (
        run.result.components.controlnet if mode == "controlnet" else run.result.components.denoiser
    )
    paths = {formats.kohya_module_name("lycoris", n) for n, _ in trained_on.named_modules()}
    assert _heads(weights) <= paths
    pipe = pipeline(run)
    holder = "controlnet" if mode == "controlnet" else run.cls.lora_component
    assert load_slider(pipe, run.out) == [holder]
    for s in (1.0, -0.5):
        set_slider_strength(pipe, s)
        check(run, "lycoris load_slider", predict(run, **models(run, pipe)), trained(run, s))


def test_lycoris_file_names_are_the_modules_own_under_an_assistant(tmp_path):
    """With an assistant LoRA loaded first, LyCORIS adapts `...to_q.base_layer`: the file still
    names `...to_q`, which loaders and validate's rebuild map."""
    from peft import LoraConfig

    from slider_cn.validate import rebuild_run

    source = family_class("sd1x")(load_config(None, {})).build_tiny(seed=0).denoiser
    source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    source.save_lora_adapter(str(tmp_path / "assistant"))
    run = _lycoris_run(
        tmp_path, "sd1x", assistant_lora_path=tmp_path / "assistant", assistant_lora_strength=0.8
    )
    assert any("base_layer" in lora.lora_name for lora in run.result.adapter.network.loras)
    weights = load_file(str(run.out / formats.LYCORIS_FILE))
    assert not any("base_layer" in k for k in weights)
    unet = run.cls.denoiser_model_class.from_pretrained(str(run.out / "base" / "unet"))
    names = {formats.kohya_module_name("lora_unet", n) for n, _ in unet.named_modules()}
    assert _heads(weights) <= names
    config = load_config(
        run.config_path,
        {
            "lycoris_config": str(LOKR),
            "assistant_lora_path": str(tmp_path / "assistant"),
            "assistant_lora_strength": "0.8",
        },
    )
    rebuilt = rebuild_run(config, run.out, "cpu")
    for s in (1.0, -0.5):
        with rebuilt.adapter.multiplier(s):
            got = predict(run, rebuilt.components.denoiser)
        check(run, "lycoris rebuild, assistant", got, trained(run, s))


def test_slider_files_name_the_family(runs):
    run = runs("zimage", "controlnet")
    files = slider_files(run.out)
    assert files.family is family_class("zimage") and files.side == "controlnet"
    broken = run.root / "broken"
    broken.mkdir()
    save_file({"x": torch.zeros(1)}, str(broken / formats.BASE_LORA_FILE))
    with pytest.raises(ConfigError, match="no known model family"):
        slider_files(broken).family  # noqa: B018
