"""What a run has written so far, as the page shows it: validation images and strength-sweep
grids by step, and the final files with how to load them (the README's "Use your slider")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slider_cn.ui.workspace import Workspace

# kind (as slider_cn_run.json names the files a run wrote) -> what it is and how to load it:
# the README's "Use your slider" table, shortened; keep the two in step.
LOAD_INSTRUCTIONS: dict[str, dict[str, str]] = {
    "diffusers": {
        "what": "base-side slider, diffusers/PEFT keys (alpha/r folded into lora_B)",
        "diffusers": "pipe.load_lora_weights(output_dir)",
        "comfyui": "SD UNets: use the kohya file; SD3 / Flux / Z-Image: models/loras/, Load LoRA",
    },
    "kohya": {
        "what": "the same slider, kohya keys with the true alpha",
        "diffusers": 'pipe.load_lora_weights(output_dir, weight_name="slider_kohya.safetensors")',
        "comfyui": "models/loras/, LoraLoaderModelOnly (or Load LoRA)",
    },
    "controlnet_lora": {
        "what": "ControlNet-side slider, unprefixed PEFT keys (alpha/r folded into lora_B)",
        "diffusers": "pipe.controlnet.load_lora_adapter(path, prefix=None)",
        "comfyui": "not loadable on a ControlNet: export merged-controlnet",
    },
    "controlnet": {
        "what": "the fresh ControlNet this run trained on (slider not merged)",
        "diffusers": 'ControlNetModel.from_pretrained(output_dir + "/controlnet")',
        "comfyui": "the slider is not in it: export merged-controlnet",
    },
    "lycoris": {
        "what": "a LyCORIS slider, the lycoris-lora library's format",
        "diffusers": "slider_cn.load_slider(pipe, output_dir)",
        "comfyui": "models/loras/, Load LoRA",
    },
    "base": {
        "what": "tiny runs only: the base model, so the result can be loaded",
        "diffusers": "StableDiffusionPipeline.from_pretrained(output_dir + '/base')",
        "comfyui": "-",
    },
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _images(ws: Workspace, folder: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": p.name,
            "path": ws.relative(p),
            "sweep": p.stem.endswith("_sweep"),
            "mtime": p.stat().st_mtime,
        }
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]


def run_outputs(ws: Workspace, output_dir: Path) -> dict[str, Any]:
    """Validation folders (newest step first), final files, exports and checkpoints."""
    from slider_cn.ui.jobs import checkpoints_in

    result: dict[str, Any] = {
        "output_dir": ws.relative(output_dir),
        "exists": output_dir.is_dir(),
        "validation": [],
        "files": [],
        "exports": [],
        "checkpoints": checkpoints_in(output_dir),
    }
    if not output_dir.is_dir():
        return result
    validation = output_dir / "validation"
    if validation.is_dir():
        for folder in sorted(validation.iterdir(), reverse=True):
            if folder.is_dir() and ws.contains(folder):
                images = _images(ws, folder)
                if images:
                    result["validation"].append({"name": folder.name, "images": images})
    run_file = output_dir / "slider_cn_run.json"
    if run_file.is_file():
        try:
            written = json.loads(run_file.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError):
            written = {}
        for kind, path in written.items():
            path = Path(path)
            if not ws.contains(path) or not path.exists():
                continue
            info = LOAD_INSTRUCTIONS.get(kind, {"what": kind, "diffusers": "", "comfyui": ""})
            result["files"].append(
                {
                    "kind": kind,
                    "name": path.name,
                    "path": ws.relative(path),
                    "folder": path.is_dir(),
                    "size": None if path.is_dir() else path.stat().st_size,
                    **info,
                }
            )
    exports = output_dir / "export"
    if exports.is_dir():
        result["exports"] = [ws.relative(p) for p in sorted(exports.iterdir()) if ws.contains(p)]
    return result
