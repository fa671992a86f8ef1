"""The detector registry: names, parameters with controlnet-aux's defaults, and where weights live.

Pure data and validation: importing this module imports neither torch nor controlnet-aux, so the
CLI can build its options and `--list` instantly, and worker processes start light.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from slider_cn.errors import ConfigError, suggest


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: type  # int, float or bool
    default: Any
    help: str
    minimum: float | None = None
    optional: bool = False  # None is a valid value (meaning: see help)


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    summary: str
    params: tuple[ParamSpec, ...]
    # controlnet-aux submodule and class; None for detectors implemented with OpenCV alone.
    aux_module: str | None = None
    aux_class: str | None = None
    # Weight files that from_pretrained reads from --annotator-path (empty: needs no weights).
    weights: tuple[str, ...] = ()
    default_repo: str | None = None
    hub_subfolder: str | None = None  # where the files sit inside the hub repo
    # Extra keyword arguments for from_pretrained (classes without a default filename).
    pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    # Python packages the detector needs beyond controlnet-aux's own requirements.
    requires: tuple[str, ...] = ()
    # Our parameter name -> controlnet-aux's keyword (it spells `guassian_sigma`).
    call_names: dict[str, str] = field(default_factory=dict)
    # Fixed keyword arguments for the detector call.
    call_fixed: dict[str, Any] = field(default_factory=dict)
    # Random detectors are seeded per file (seed parameter + the file's relative path).
    seeded: bool = False
    # One-channel maps (edges, lines, depth) are written as 8-bit grayscale PNGs, a third of
    # the encoding work of RGB; the others (colours, normals, poses) as RGB.
    gray: bool = False

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights)

    @property
    def uses_torch(self) -> bool:
        # Weight-based detectors are torch networks: they run in one process (CUDA when present,
        # otherwise torch's own threads); the others run in a pool of --workers processes.
        return self.needs_weights

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)


def _detect_resolution(default: int = 512) -> ParamSpec:
    return ParamSpec(
        "detect_resolution",
        int,
        default,
        "shorter side (pixels) the detector works at; the result is resized to the output size",
        minimum=64,
    )


_SEED = ParamSpec("seed", int, 0, "seed of the random pattern (combined with each file's path)")

_SPECS: tuple[DetectorSpec, ...] = (
    DetectorSpec(
        "canny",
        "Canny edges (OpenCV), computed at the output size unless --detect-resolution is given",
        (
            ParamSpec("low_threshold", int, 100, "lower hysteresis threshold", minimum=0),
            ParamSpec("high_threshold", int, 200, "upper hysteresis threshold", minimum=0),
            ParamSpec(
                "detect_resolution",
                int,
                None,
                "shorter side to detect at; unset detects at the output size (exactly cv2.Canny)",
                minimum=8,
                optional=True,
            ),
        ),
        gray=True,
    ),
    DetectorSpec(
        "shuffle",
        "content shuffle: the image warped by a random smooth flow",
        (
            ParamSpec("f", int, 256, "size of the random flow's features (pixels)", minimum=1),
            _detect_resolution(),
            _SEED,
        ),
        aux_module="shuffle",
        aux_class="ContentShuffleDetector",
        seeded=True,
    ),
    DetectorSpec(
        "lineart_standard",
        "line art from a difference of Gaussians (no network)",
        (
            ParamSpec("gaussian_sigma", float, 6.0, "blur sigma (pixels)", minimum=0.1),
            ParamSpec("intensity_threshold", int, 8, "minimum line intensity", minimum=0),
            _detect_resolution(),
        ),
        aux_module="lineart_standard",
        aux_class="LineartStandardDetector",
        call_names={"gaussian_sigma": "guassian_sigma"},
        gray=True,
    ),
    DetectorSpec(
        "mediapipe_face",
        "face landmarks (MediaPipe)",
        (
            ParamSpec("max_faces", int, 1, "most faces drawn", minimum=1),
            ParamSpec("min_confidence", float, 0.5, "minimum detection confidence", minimum=0.0),
            _detect_resolution(),
        ),
        aux_module="mediapipe_face",
        aux_class="MediapipeFaceDetector",
        requires=("mediapipe",),
    ),
    DetectorSpec(
        "hed",
        "HED soft edges",
        (
            _detect_resolution(),
            ParamSpec("safe", bool, False, "quantised 'safe' edges"),
            ParamSpec("scribble", bool, False, "thin, scribble-like lines"),
        ),
        aux_module="hed",
        aux_class="HEDdetector",
        weights=("ControlNetHED.pth",),
        default_repo="lllyasviel/Annotators",
        gray=True,
    ),
    DetectorSpec(
        "pidi",
        "PiDiNet soft edges",
        (
            _detect_resolution(),
            ParamSpec("safe", bool, False, "quantised 'safe' edges"),
            ParamSpec("scribble", bool, False, "thin, scribble-like lines"),
            ParamSpec("apply_filter", bool, False, "filter weak edges"),
        ),
        aux_module="pidi",
        aux_class="PidiNetDetector",
        weights=("table5_pidinet.pth",),
        default_repo="lllyasviel/Annotators",
        gray=True,
    ),
    DetectorSpec(
        "lineart",
        "line art (realistic)",
        (_detect_resolution(), ParamSpec("coarse", bool, False, "use the coarse model")),
        aux_module="lineart",
        aux_class="LineartDetector",
        weights=("sk_model.pth", "sk_model2.pth"),
        default_repo="lllyasviel/Annotators",
        gray=True,
    ),
    DetectorSpec(
        "lineart_anime",
        "line art (anime)",
        (_detect_resolution(),),
        aux_module="lineart_anime",
        aux_class="LineartAnimeDetector",
        weights=("netG.pth",),
        default_repo="lllyasviel/Annotators",
        gray=True,
    ),
    DetectorSpec(
        "mlsd",
        "M-LSD straight lines",
        (
            ParamSpec("thr_v", float, 0.1, "line score threshold", minimum=0.0),
            ParamSpec("thr_d", float, 0.1, "line distance threshold", minimum=0.0),
            _detect_resolution(),
        ),
        aux_module="mlsd",
        aux_class="MLSDdetector",
        weights=("mlsd_large_512_fp32.pth",),
        default_repo="lllyasviel/Annotators",
        gray=True,
    ),
    DetectorSpec(
        "midas",
        "MiDaS depth (DPT hybrid)",
        (_detect_resolution(),),
        aux_module="midas",
        aux_class="MidasDetector",
        weights=("dpt_hybrid-midas-501f0c75.pt",),
        default_repo="lllyasviel/Annotators",
        call_fixed={"depth_and_normal": False},
        gray=True,
    ),
    DetectorSpec(
        "zoe",
        "ZoeDepth depth",
        (
            _detect_resolution(),
            ParamSpec("gamma_corrected", bool, False, "apply gamma 2.2 to the depth"),
        ),
        aux_module="zoe",
        aux_class="ZoeDetector",
        weights=("ZoeD_M12_N.pt",),
        default_repo="lllyasviel/Annotators",
        gray=True,
    ),
    DetectorSpec(
        "leres",
        "LeReS depth",
        (
            ParamSpec("thr_a", float, 0, "remove near (percent)", minimum=0.0),
            ParamSpec("thr_b", float, 0, "remove background (percent)", minimum=0.0),
            ParamSpec("boost", bool, False, "boosted (multi-resolution) depth"),
            _detect_resolution(),
        ),
        aux_module="leres",
        aux_class="LeresDetector",
        weights=("res101.pth", "latest_net_G.pth"),
        default_repo="lllyasviel/Annotators",
        gray=True,
    ),
    DetectorSpec(
        "normalbae",
        "surface normals (NormalBAE)",
        (_detect_resolution(),),
        aux_module="normalbae",
        aux_class="NormalBaeDetector",
        weights=("scannet.pt",),
        default_repo="lllyasviel/Annotators",
    ),
    DetectorSpec(
        "openpose",
        "OpenPose skeletons",
        (
            _detect_resolution(),
            ParamSpec("include_body", bool, True, "draw the body"),
            ParamSpec("include_hand", bool, False, "draw the hands"),
            ParamSpec("include_face", bool, False, "draw the face"),
        ),
        aux_module="open_pose",
        aux_class="OpenposeDetector",
        weights=("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
        default_repo="lllyasviel/Annotators",
    ),
    DetectorSpec(
        "teed",
        "TEED soft edges",
        (
            _detect_resolution(),
            ParamSpec("safe_steps", int, 2, "quantisation steps (0: none)", minimum=0),
        ),
        aux_module="teed",
        aux_class="TEEDdetector",
        weights=("5_model.pth",),
        default_repo="fal-ai/teed",
        pretrained_kwargs={"filename": "5_model.pth"},
        gray=True,
    ),
    DetectorSpec(
        "anyline",
        "Anyline (MistoLine) line art",
        (
            _detect_resolution(1280),
            ParamSpec("gaussian_sigma", float, 2.0, "blur sigma (pixels)", minimum=0.1),
            ParamSpec("intensity_threshold", int, 3, "minimum line intensity", minimum=0),
        ),
        aux_module="anyline",
        aux_class="AnylineDetector",
        weights=("MTEED.pth",),
        default_repo="TheMistoAI/MistoLine",
        hub_subfolder="Anyline",
        pretrained_kwargs={"filename": "MTEED.pth", "subfolder": "Anyline"},
        call_names={"gaussian_sigma": "guassian_sigma"},
        gray=True,
    ),
    DetectorSpec(
        "sam",
        "Segment Anything masks (ViT-H)",
        (_detect_resolution(), _SEED),
        aux_module="segment_anything",
        aux_class="SamDetector",
        weights=("sam_vit_h_4b8939.pth",),
        default_repo="ybelkada/segment-anything",
        hub_subfolder="checkpoints",
        pretrained_kwargs={"subfolder": "checkpoints"},
        seeded=True,
    ),
)

DETECTORS: dict[str, DetectorSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name: str) -> DetectorSpec:
    """The detector called `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return DETECTORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown detector '{name}'{suggest(name, DETECTORS)}; "
            f"known detectors: {', '.join(DETECTORS)} (see `slider-cn preprocess --list`)"
        ) from None


def _coerce(spec: DetectorSpec, param: ParamSpec, value: Any) -> Any:
    where = f"detector '{spec.name}': parameter '{param.name}'"
    if value is None:
        if param.optional:
            return None
        raise ConfigError(f"{where} needs a value (default {param.default!r})")
    if param.type is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if param.type is int:
        if float(value) != int(value):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if param.minimum is not None and value < param.minimum:
        raise ConfigError(f"{where} must be >= {param.minimum:g}, got {value!r}")
    return value


def resolve_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Validate `params` for detector `name` and fill in the defaults (controlnet-aux's)."""
    spec = get_spec(name)
    params = dict(params or {})
    known = [p.name for p in spec.params]
    for key in params:
        if key not in known:
            raise ConfigError(
                f"detector '{name}' has no parameter '{key}'{suggest(key, known)}; "
                f"its parameters: {', '.join(known) or 'none'}"
            )
    resolved = {p.name: _coerce(spec, p, params.get(p.name, p.default)) for p in spec.params}
    if name == "canny" and resolved["low_threshold"] > resolved["high_threshold"]:
        raise ConfigError(
            f"detector 'canny': low_threshold ({resolved['low_threshold']}) must not exceed "
            f"high_threshold ({resolved['high_threshold']})"
        )
    return resolved


def params_hash(name: str, resolved: dict[str, Any], length: int = 8) -> str:
    """A short, stable hash of a detector and its resolved parameters (cache folder names)."""
    blob = json.dumps({"detector": name, "params": resolved}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
