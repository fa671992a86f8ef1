"""What bench/train_step.py (CPU) and bench/gpu_step.py (CUDA) share: the models, and one
training step done two ways on the same inputs.

- `SliderRunner`: slider-cn's own path, nothing copied: `BenchRecipe` (slider_cn/recipe.py's
  `SliderRecipe` with the bench's models in place of the family's) runs the recipe's whole
  setup (slider targets, adapter, fp32 master weights, frozen precision, optimizer, accelerate),
  and each step is the recipe's `train_micro_batch` (accumulate + autocast, `SliderStep` with
  `accelerator.backward`, the non-finite check, clipping, optimizer and scheduler step, the
  train_log record with `loss.item()`).
- `PlainRunner`: the plainest loop a user would write with diffusers + peft: `add_adapter`
  with a LoraConfig on the same modules, `cast_training_params`, AdamW, `torch.autocast`,
  noise and timesteps drawn on the device, clip, step, `loss.item()`.

Cases: "lora" (LoRA on the UNet), "lora+cn" (the same with a frozen ControlNet: one no-grad
ControlNet forward), "preserve" (a neutral batch in `preserve` mode: one extra no-grad UNet
forward) and "controlnet" (LoRA on the ControlNet, UNet frozen).
"""

from __future__ import annotations

import copy
import gc
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slider_cn.config import TrainConfig  # noqa: E402
from slider_cn.data.sampler import BatchPlan  # noqa: E402
from slider_cn.recipe import SliderRecipe  # noqa: E402

# runwayml/stable-diffusion-v1-5, unet/config.json (860M parameters).
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# The CPU benchmark's UNet: SD1.5's layout (three cross-attention levels, one plain, two
# layers per block, 8 heads) at 1/10 of its width, and the tiny text encoder's 32-dim context.
# 8.5M parameters, 100 slider targets (as SD1.5); at 128 px (16x16 latents) a step takes about
# 0.2 s on one core: the compute is real, and per-step Python overhead still shows.
MEDIUM_UNET = {
    **SD15_UNET,
    "block_out_channels": [32, 64, 128, 128],
    "cross_attention_dim": 32,
    "norm_num_groups": 16,
    "sample_size": 16,
}

# The family's tiny UNet (slider_cn/families/sd.py), for dry runs.
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

UNETS = {"sd15": SD15_UNET, "medium": MEDIUM_UNET, "tiny": TINY_UNET}
CASES = ("lora", "lora+cn", "preserve", "controlnet")


def cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Inputs:
    """One micro-batch as the training loop has it after the (cached) encoders."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    conditioning_pixels: torch.Tensor | None
    slider_strength: float
    sign: str


def make_inputs(
    model: str,
    resolution: int,
    batch_size: int,
    device: torch.device,
    *,
    conditioning: bool,
    sign: str = "+",
    seed: int = 0,
) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    context = UNETS[model]["cross_attention_dim"]
    cond = torch.rand(batch_size, 3, resolution, resolution, generator=g) if conditioning else None
    return Inputs(
        latents=torch.randn(batch_size, 4, side, side, generator=g).to(device),
        encoder_hidden_states=torch.randn(batch_size, 77, context, generator=g).to(device),
        conditioning_pixels=None if cond is None else cond.to(device),
        slider_strength={"+": 0.5, "-": -0.5, "0": 0.0}[sign],
        sign=sign,
    )


def build_unet(model: str, device: torch.device, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # Initialised where it will run: an 860M-parameter init on the CPU takes long.
    with torch.device(device):
        return UNet2DConditionModel(**UNETS[model])


def build_controlnet(unet, seed: int = 0):
    """A ControlNet as from_unet makes it, with its zero projections given small random
    weights, as a trained ControlNet has (zeros would cut the gradient path)."""
    from diffusers import ControlNetModel

    from slider_cn.families.sd import TINY_CONDITIONING_CHANNELS
    from slider_cn.targets import controlnet_output_projections

    kwargs = {}
    if unet.config.block_out_channels[0] < 320:
        kwargs["conditioning_embedding_out_channels"] = TINY_CONDITIONING_CHANNELS
    torch.manual_seed(seed + 1)
    with torch.device(unet.device):
        controlnet = ControlNetModel.from_unet(unet, **kwargs)
    modules = dict(controlnet.named_modules())
    with torch.no_grad():
        for name in controlnet_output_projections(controlnet, "sd1x"):
            for p in modules[name].parameters():
                p.normal_(0.0, 1e-3)
    return controlnet


def slider_targets(model: torch.nn.Module, side: str) -> list[str]:
    from slider_cn.targets import resolve_targets

    return resolve_targets(model, "sd1x", side=side, slider=True).names


@dataclass
class Options:
    rank: int = 16
    precision: str = "no"  # "no" (fp32), "bf16", "fp16"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: str | None = None  # a torch.compile backend, or None
    fused: bool | None = None  # None: what the recipe does (fused on CUDA)
    base_precision: str = "no"  # base_model_precision of the frozen modules (slider_cn.precision)
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)


def _models_for(case: str, model: str, device: torch.device, seed: int):
    unet = build_unet(model, device, seed)
    controlnet = build_controlnet(unet, seed) if case in ("lora+cn", "controlnet") else None
    return unet, controlnet


def _to_channels_last(*modules) -> None:
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


def _maybe_compile(module, options: Options):
    if options.compile is None:
        return module
    return torch.compile(module, backend=options.compile)


class BenchRecipe(SliderRecipe):
    """slider-cn's training recipe with the bench's models in place of the family's: the whole
    setup (targets, adapter, fp32 master weights, frozen precision, optimizer, accelerate) and
    the micro-batch step are the recipe's own. The config's dataset (a small demo one) is set up
    as usual but not read: the bench hands the step its inputs, as a warm cache gives them.
    ``vae`` is what the step needs of one (nothing for image sliders: the latents come in)."""

    def __init__(self, config: TrainConfig, models, device: torch.device, vae=None):
        super().__init__(config)
        self.models, self.vae = models, vae
        self.cpu = device.type == "cpu"  # the bench's device, GPU or not

    def _load_components(self):
        from slider_cn.families.base import Components
        from slider_cn.families.sd import sd_noise_scheduler

        unet, controlnet = self.models
        for module in (unet, controlnet):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        return Components(
            denoiser=unet,
            vae=self.vae if self.vae is not None else torch.nn.Identity(),
            text_encoders=[],
            tokenizers=[],
            noise_scheduler=sd_noise_scheduler(),
            controlnet=controlnet,
        )


def bench_config(root: Path, mode: str, *, conditioning: bool, **overrides) -> TrainConfig:
    """A training config for the recipe on a small demo dataset under ``root`` (strengths
    +-0.5, as the bench's inputs; conditioning images for a ControlNet in the loop)."""
    from slider_cn.config import load_config
    from slider_cn.demo_data import write_demo_dataset

    paths = write_demo_dataset(
        root, images_per_group=1, conditioning="folders" if conditioning else None
    )
    values = {
        "training_mode": mode,
        "slider_lora_target": True,
        "max_train_steps": 10**6,  # the lr schedule's length: the bench never reaches it
        "checkpointing_steps": 10**6,
        **overrides,
    }
    return load_config(paths["config"], {k: str(v) for k, v in values.items()})


def bench_plan(sign: str, strength: float, prompt=None) -> BatchPlan:
    """A sampler plan for the step's record (backend, sign; no files: the inputs are given)."""
    return BatchPlan(
        step=0,
        epoch=0,
        index=0,
        backend="bench",
        slider_strength=strength,
        sign=sign,
        samples=(),
        resolution=0,
        prompt=prompt,
    )


class SliderRunner:
    """slider-cn's training step: `SliderRecipe.train_micro_batch` of a recipe set up on the
    bench's models; see the module docstring."""

    name = "slider-cn"

    def __init__(
        self,
        case: str,
        model: str,
        device: torch.device,
        options: Options,
        models: tuple[Any, Any] | None = None,
    ):
        self.case, self.device, self.options = case, device, options
        mode = "controlnet" if case == "controlnet" else "lora"
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-recipe-")
        config = bench_config(
            Path(self._tmp.name),
            mode,
            conditioning=case in ("lora+cn", "controlnet"),
            lora_rank=options.rank,
            lora_alpha=options.rank,
            mixed_precision=options.precision,
            base_model_precision=options.base_precision,
            gradient_checkpointing=options.gradient_checkpointing,
            learning_rate=options.learning_rate,
            max_grad_norm=options.max_grad_norm,
            seed=options.seed,
        )
        unet, controlnet = models or _models_for(case, model, device, options.seed)
        self.recipe = BenchRecipe(config, (unet, controlnet), device)
        self.recipe.setup()
        # the bench's speed-ups, on what the recipe set up
        if options.channels_last:
            _to_channels_last(unet, controlnet)
        if options.fused is not None:
            for group in self.recipe.optimizer.param_groups:
                group["fused"] = options.fused or None
        components = self.recipe.components
        if mode == "controlnet":  # compile only what trains, as the plain side
            components.controlnet = _maybe_compile(components.controlnet, options)
        else:
            components.denoiser = _maybe_compile(components.denoiser, options)
        self.weight_dtype = self.recipe.weight_dtype
        self.n_targets = len(self.recipe.targets.names)
        self.plans = {
            sign: bench_plan(sign, s) for sign, s in (("+", 0.5), ("-", -0.5), ("0", 0.0))
        }

    def step(self, inputs: Inputs) -> float:
        """One micro-batch of the recipe, from cached inputs to its train_log record."""
        from slider_cn.step import StepInputs

        dtype = self.weight_dtype
        step_inputs = StepInputs(
            latents=inputs.latents.to(dtype),
            cond={"encoder_hidden_states": inputs.encoder_hidden_states.to(dtype)},
            slider_strength=inputs.slider_strength,
            sign=inputs.sign,
            conditioning_pixels=None
            if inputs.conditioning_pixels is None
            else inputs.conditioning_pixels.to(self.device, dtype),
        )
        plan = self.plans[inputs.sign]
        return self.recipe.train_micro_batch(plan, self.recipe.step_fn, step_inputs)["loss"]

    def close(self) -> None:
        self.recipe.cleanup()
        self.recipe.accelerator.free_memory()
        self._tmp.cleanup()


class PlainRunner:
    """A minimal hand-written diffusers + peft loop on the same modules; see the docstring."""

    name = "plain"

    def __init__(
        self,
        case: str,
        model: str,
        device: torch.device,
        options: Options,
        models: tuple[Any, Any] | None = None,
    ):
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from slider_cn.families.sd import sd_noise_scheduler

        self.case, self.device, self.options = case, device, options
        self.unet, self.controlnet = models or _models_for(case, model, device, options.seed)
        self.scheduler = sd_noise_scheduler()
        dtype = options.dtype
        for module in (self.unet, self.controlnet):
            if module is not None:
                module.requires_grad_(False)
                module.to(device, dtype)
        trainable = self.controlnet if case == "controlnet" else self.unet
        names = slider_targets(trainable, "controlnet" if case == "controlnet" else "denoiser")
        torch.manual_seed(options.seed)
        trainable.add_adapter(
            LoraConfig(
                r=options.rank,
                lora_alpha=options.rank,
                init_lora_weights=True,
                target_modules="^(?:" + "|".join(n.replace(".", r"\.") for n in names) + ")$",
            )
        )
        cast_training_params(trainable, torch.float32)
        if options.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.controlnet is not None:
                self.controlnet.enable_gradient_checkpointing()
        trainable.train()
        if options.channels_last:
            _to_channels_last(self.unet, self.controlnet)
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        fused = options.fused if options.fused is not None else device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=options.learning_rate, weight_decay=1e-2, fused=fused or None
        )
        self.unet_fwd = _maybe_compile(self.unet, options)
        self.controlnet_fwd = (
            None
            if self.controlnet is None
            else _maybe_compile(self.controlnet, options)
            if case == "controlnet"
            else self.controlnet
        )
        if case == "controlnet":
            self.unet_fwd = self.unet  # frozen: compile only what trains, as the slider side
        self.n_targets = len(names)

    def step(self, inputs: Inputs) -> float:
        dtype, device = self.options.dtype, self.device
        latents = inputs.latents.to(dtype)
        ehs = inputs.encoder_hidden_states.to(dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            residuals = {}
            if self.controlnet is not None:
                cond = inputs.conditioning_pixels.to(device, dtype)
                with torch.set_grad_enabled(self.case == "controlnet"):
                    down, mid = self.controlnet_fwd(
                        noisy, timesteps, ehs, controlnet_cond=cond, return_dict=False
                    )
                residuals = {
                    "down_block_additional_residuals": down,
                    "mid_block_additional_residual": mid,
                }
            target = noise
            if self.case == "preserve":
                with torch.no_grad():
                    target = self.unet_fwd(noisy, timesteps, ehs, return_dict=False)[0]
            prediction = self.unet_fwd(noisy, timesteps, ehs, return_dict=False, **residuals)[0]
            loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def close(self) -> None:
        pass


def case_inputs(case: str, model: str, resolution: int, batch: int, device, seed=0):
    """The inputs of a case: neutral for preserve, conditioning for the ControlNet cases."""
    return make_inputs(
        model,
        resolution,
        batch,
        device,
        conditioning=case in ("lora+cn", "controlnet"),
        sign="0" if case == "preserve" else "+",
        seed=seed,
    )


def twin_models(case: str, model: str, device: torch.device, seed: int = 0):
    """Two identical copies of the case's models, one per runner."""
    first = _models_for(case, model, device, seed)
    return first, copy.deepcopy(first)


def timed(runner, inputs: Inputs) -> float:
    cuda_sync(runner.device)
    start = time.perf_counter()
    runner.step(inputs)
    cuda_sync(runner.device)
    return time.perf_counter() - start


def release() -> None:
    """Free what the last runner left: compiled graphs hold their modules."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class DataFeed:
    """The recipe's per-micro-batch data path on a warm cache: the sampler's next plan,
    `prefetch_batches` (or `load_batch` in the loop with ``prefetch=False``), latents and text
    embeddings from `EncodedCache`, on a synthetic dataset and the tiny sd1x encoders (their
    latents have SD's shape, 4 x R/8 x R/8). ``context`` replaces the tiny text encoder's
    32-dim embeddings for a UNet with another cross-attention width (the cache is still read).
    ``signs`` keeps only backends of those signs (a neutral batch is the preserve case).
    """

    def __init__(
        self,
        root: Path,
        resolution: int,
        batch: int,
        device: torch.device,
        *,
        conditioning: bool = False,
        prefetch: bool = True,
        signs: tuple[str, ...] = ("+", "-"),
        context: torch.Tensor | None = None,
        images_per_group: int = 8,
    ):
        from slider_cn.config import load_config
        from slider_cn.data.backends import training_backends
        from slider_cn.data.cache import EncodedCache
        from slider_cn.data.sampler import SliderSampler
        from slider_cn.demo_data import write_demo_dataset
        from slider_cn.families import get_family

        paths = write_demo_dataset(
            root,
            images_per_group=images_per_group,
            resolution=resolution,
            conditioning="folders" if conditioning else None,
        )
        config = load_config(paths["config"], {"resolution": str(resolution)})
        backends = [b for b in training_backends(config, progress=False) if b.sign in signs]
        self.sampler = SliderSampler(backends, batch_size=batch, seed=0)
        family = get_family(config)
        components = family.load_components()
        for module in components.modules().values():
            module.to(device)
        self.cache = EncodedCache(config.cache_path, family, components, device=device)
        self.device, self.prefetch, self.context = device, prefetch, context
        self._batches = self._cycle()
        for _ in range(len(self.sampler)):  # fill the cache: every later call hits
            self.next()

    def _cycle(self):
        from slider_cn.data.loading import load_batch, prefetch_batches

        for epoch in itertools.count():
            self.sampler.set_epoch(epoch)
            if self.prefetch:
                yield from prefetch_batches(self.sampler, pixels=False)
            else:
                for plan in self.sampler:
                    yield plan, load_batch(plan, pixels=False)

    def next(self) -> Inputs:
        plan, batch = next(self._batches)
        latents = self.cache.latents(batch)
        hidden = self.cache.text(batch.captions)["encoder_hidden_states"]
        if self.context is not None:
            hidden = self.context.expand(latents.shape[0], *self.context.shape[1:])
        return Inputs(
            latents=latents,
            encoder_hidden_states=hidden,
            conditioning_pixels=batch.conditioning_pixels,
            slider_strength=plan.slider_strength,
            sign=plan.sign,
        )
