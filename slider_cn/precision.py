"""How the frozen weights are stored: `base_model_precision` and `text_encoder_precision`.

The slider is small; the frozen base is what fills a GPU. These options shrink only frozen
weights, after the slider is attached, and never the slider's own layers:

- ``no``: the training dtype (as before).
- ``fp8``: torchao weight-only float8 (e4m3, per-row scales) on every ``nn.Linear`` outside the
  adapters, computed in the training dtype.
- ``int8``: torchao weight-only int8 (per-row scales), the same way.

Convolutions, norms and embeddings stay in the training dtype (a transformer denoiser is almost
all Linear; a UNet keeps its convolutions).

Training needs the backward pass through every frozen layer (the gradient reaches the slider
layers below it), and that is where a naive quantized layer loses what it saved: autograd keeps
the dequantized weight of every layer for the backward (measured: the step then peaks at the
bf16 weights' size on top of the quantized ones). `FrozenQuantizedLinear` saves the stored
weight instead and dequantizes it again, one layer at a time, in its backward. diffusers'
layerwise casting is not used: it turns the weight back to float8 after each forward, and the
backward then fails on it.
- ``nf4``: bitsandbytes 4-bit NormalFloat on every ``nn.Linear`` outside the adapters; CUDA only.

The denoiser is always frozen; the ControlNet only in LoRA-only mode (in ControlNet mode it
carries the slider and a fresh one trains its output projections, so it stays as it is). The
slider's files do not depend on any of this: they hold only adapter weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slider_cn.errors import ConfigError

log = logging.getLogger("slider_cn.precision")

PRECISIONS = ("no", "fp8", "int8", "nf4")
# SimpleTuner's spellings, mapped to the nearest of ours.
ALIASES = {
    "no_change": "no",
    "fp8-torchao": "fp8",
    "fp8-quanto": "fp8",
    "int8-torchao": "int8",
    "int8-quanto": "int8",
    "nf4-bnb": "nf4",
    "int4-quanto": "nf4",
}


def autocast_precision(config) -> str:
    """The config's mixed_precision with `auto` resolved: bf16 on a GPU that computes it
    natively (emulated bf16 on pre-Ampere cards is slower than fp32), else no autocast."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "no"


def autocast_dtype(config) -> torch.dtype:
    """The dtype frozen weights are stored in: the autocast precision's, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        autocast_precision(config), torch.float32
    )


def adapter_module_names(model: nn.Module) -> set[str]:
    """Modules that belong to a PEFT adapter (slider or assistant): never quantized."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in module.adapter_layer_names:
                names.add(f"{name}.{attribute}")
    return names


def _outside(names: set[str], fqn: str) -> bool:
    return not any(fqn == n or fqn.startswith(n + ".") for n in names)


class _FrozenLinearFunction(torch.autograd.Function):
    """y = x W^T + b with a frozen, quantized W: saves W as stored, not dequantized."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        # dequantized for this one product and freed; W and b are frozen: no grads for them
        return grad @ weight.dequantize().to(grad.dtype), None, None


class FrozenQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao quantized tensor (see the module docstring).

    Layers are switched to this class in place, so module names, state-dict keys and the
    adapters wrapped around them stay as they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # torchao's tensors take F.linear before autocast would cast the input
            x = x.to(torch.get_autocast_dtype(device))
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _FrozenLinearFunction.apply(x, self.weight, self.bias)


def _no_zero_rows(layer: nn.Linear) -> bool:
    """Per-row scales of an all-zero row are 0, and float8's 0/0 makes the whole output NaN:
    such layers (zero-initialised projections, e.g. a fresh ControlNet's) stay as they are."""
    with torch.no_grad():
        return bool(layer.weight.abs().amax(dim=1).min() > 0)


def store_torchao(module: nn.Module, precision: str) -> None:
    """Weight-only float8 or int8 on the frozen ``nn.Linear`` layers, adapters skipped."""
    try:
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        raise ConfigError(
            f"precision '{precision}' needs torchao: pip install 'slider-cn[quant]' (or torchao)"
        ) from None
    adapters = adapter_module_names(module)

    def frozen_linear(layer: nn.Module, fqn: str) -> bool:
        # exactly nn.Linear: a layer quantized already (a module shared with another model,
        # as Z-Image's ControlNet shares the denoiser's embedders) is a subclass by now
        return type(layer) is nn.Linear and _outside(adapters, fqn) and _no_zero_rows(layer)

    config = Float8WeightOnlyConfig() if precision == "fp8" else Int8WeightOnlyConfig()
    # chosen once (the zero-row check reads every weight), then quantized and switched
    chosen = [layer for fqn, layer in module.named_modules() if frozen_linear(layer, fqn)]
    ids = {id(layer) for layer in chosen}
    quantize_(module, config, filter_fn=lambda layer, fqn: id(layer) in ids)
    for layer in chosen:
        layer.__class__ = FrozenQuantizedLinear


def store_nf4(module: nn.Module, compute_dtype: torch.dtype) -> None:
    device = next(module.parameters()).device
    if device.type != "cuda":
        raise ConfigError(
            "base_model_precision 'nf4' needs a CUDA GPU (bitsandbytes 4-bit); on this machine "
            "use 'int8' or 'fp8'"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "base_model_precision 'nf4' needs bitsandbytes: pip install bitsandbytes"
        ) from None
    adapters = adapter_module_names(module)
    for fqn, layer in list(module.named_modules()):
        if type(layer) is not nn.Linear or not _outside(adapters, fqn):
            continue  # exactly nn.Linear: shared layers quantized already are Linear4bit
        quantized = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            layer.weight.data.to("cpu"), requires_grad=False, quant_type="nf4"
        ).to(device)  # moving to the GPU quantizes
        if layer.bias is not None:
            quantized.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        parent_name, _, child = fqn.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, quantized)


def store(module: nn.Module, precision: str, compute_dtype: torch.dtype) -> None:
    """Store one frozen module's weights at ``precision`` (adapter layers untouched)."""
    if precision == "no":
        return
    if precision in ("fp8", "int8"):
        store_torchao(module, precision)
    elif precision == "nf4":
        store_nf4(module, compute_dtype)
    else:  # the config validates this; a programming error otherwise
        raise ValueError(f"unknown precision {precision!r}")


def check_config(config) -> None:
    """The refusals that need no model (made before any work, by the dry run too)."""
    chosen = {config.base_model_precision, config.text_encoder_precision}
    if config.base_model_precision != "no" and config.lora_type == "lycoris":
        raise ConfigError(
            f"base_model_precision '{config.base_model_precision}' works with lora_type "
            "'standard' (PEFT) only: LyCORIS replaces the forward of the very layers it would "
            "quantize"
        )
    if "nf4" in chosen and not torch.cuda.is_available():
        raise ConfigError(
            "precision 'nf4' needs a CUDA GPU (bitsandbytes 4-bit); on this machine use "
            "'int8' or 'fp8'"
        )
    if chosen & {"fp8", "int8"}:
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(
                "precision 'fp8' / 'int8' needs torchao: pip install 'slider-cn[quant]' (or torchao)"
            )


def apply_frozen_precision(components, config, compute_dtype: torch.dtype) -> dict[str, str]:
    """Shrink the frozen modules of a run as its config asks; returns role -> precision."""
    applied: dict[str, str] = {}
    base = config.base_model_precision
    if base != "no":
        if config.lora_type == "lycoris":
            raise ConfigError(
                f"base_model_precision '{base}' works with lora_type 'standard' (PEFT) only: "
                "LyCORIS replaces the forward of the very layers it would quantize"
            )
        store(components.denoiser, base, compute_dtype)
        applied["denoiser"] = base
        if components.controlnet is not None and config.training_mode == "lora":
            store(components.controlnet, base, compute_dtype)
            applied["controlnet"] = base
    text = config.text_encoder_precision
    if text != "no":
        for i, encoder in enumerate(components.text_encoders):
            store(encoder, text, compute_dtype)
            applied[f"text_encoder{'' if i == 0 else f'_{i + 1}'}"] = text
    for role, precision in applied.items():
        log.info("frozen %s stored as %s", role, precision)
    return applied


def weight_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes the weights of ``modules`` take as stored (quantized tensors count their data and
    scales)."""
    total = 0
    seen: set[int] = set()
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if hasattr(data, "__tensor_flatten__") and type(data) is not torch.Tensor:
        return _tensor_bytes(data)
    return data.numel() * data.element_size()
