"""What every model family provides: its components, and how to encode images and prompts."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from slider_cn.losses import denoising_loss, huber_threshold
from slider_cn.targets.spec import ArchitectureTargets

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig

# pipelines already warned about not taking validation_guidance_rescale (warned once each)
_WARNED_NO_RESCALE: set[str] = set()


@dataclass
class Components:
    """The model parts of one family, as built from a folder, a hub id or `tiny`."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    controlnet: torch.nn.Module | None = None
    # True when the ControlNet was built from the denoiser here (its output projections are
    # zero-initialised and must be trained in controlnet mode, docs/design.md §8.1).
    controlnet_is_fresh: bool = False

    def modules(self) -> dict[str, torch.nn.Module]:
        named: dict[str, torch.nn.Module] = {"denoiser": self.denoiser, "vae": self.vae}
        for i, encoder in enumerate(self.text_encoders):
            named[f"text_encoder{'' if i == 0 else f'_{i + 1}'}"] = encoder
        if self.controlnet is not None:
            named["controlnet"] = self.controlnet
        return named


@contextlib.contextmanager
def seeded(seed: int):
    """Seed module initialisation without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ModelFamily:
    """A model family: load components, encode images and prompts.

    Subclasses set ``name`` and implement the builders. Training-step pieces (noise, target,
    forward) live beside them as the training issue adds them.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # The family's diffusers classes: its denoiser, its ControlNet, and the inference
    # pipelines (plain and with a ControlNet). The plain pipeline is also the family's LoRA
    # loader: its save_lora_weights writes, and its lora_state_dict reads, LoRA files.
    denoiser_model_class: ClassVar[type]
    pipeline_class: ClassVar[type]
    # None for a family diffusers has no ControlNet for (its registry line says controlnet=False)
    controlnet_model_class: ClassVar[type | None] = None
    controlnet_pipeline_class: ClassVar[type | None] = None
    # Which modules the slider adapts, on the denoiser and on the ControlNet (the patterns of
    # slider_cn/targets/spec.py; the name and class fields are filled in by architecture()).
    targets: ClassVar[ArchitectureTargets]
    # what the family's ControlNet pipeline calls its conditioning image
    control_image_argument: ClassVar[str] = "control_image"
    # Keyword prefix of the pipeline's save_lora_weights (``unet_lora_layers``) and the kohya
    # key prefix; None means the family has no kohya-format export.
    lora_component: ClassVar[str]
    kohya_prefix: ClassVar[str | None] = None

    def __init__(self, config: TrainConfig):
        self.config = config

    @classmethod
    def architecture(cls) -> ArchitectureTargets:
        """The family's target lists, named after the family and its classes."""
        return dataclasses.replace(
            cls.targets,
            name=cls.name,
            description=cls.description,
            denoiser_classes=(cls.denoiser_class_name(),),
            controlnet_classes=(cls.controlnet_class_name(),) if cls.has_controlnet() else (),
        )

    @classmethod
    def denoiser_class_name(cls) -> str:
        return cls.denoiser_model_class.__name__

    @classmethod
    def has_controlnet(cls) -> bool:
        return cls.controlnet_model_class is not None

    @classmethod
    def controlnet_class_name(cls) -> str:
        return cls.controlnet_model_class.__name__ if cls.has_controlnet() else "none"

    # --- building ------------------------------------------------------------------------
    def load_components(self, *, with_controlnet: bool | None = None) -> Components:
        """Build every component. ``with_controlnet`` defaults to what the config implies."""
        if with_controlnet is None:
            with_controlnet = self.needs_controlnet()
        if self.config.is_tiny:
            components = self.build_tiny(self.config.seed)
        else:
            components = self.load_pretrained(self.config.pretrained_model_name_or_path)
        if with_controlnet:
            if self.config.controlnet_model_name_or_path:
                components.controlnet = self.load_controlnet(
                    self.config.controlnet_model_name_or_path
                )
            else:
                components.controlnet = self.fresh_controlnet(components.denoiser)
                components.controlnet_is_fresh = True
        for module in components.modules().values():
            module.requires_grad_(False)
            module.eval()
        return components

    def fresh_controlnet(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """A ControlNet initialised from the denoiser, the same one for the same seed."""
        with seeded(self.config.seed + 1):
            return self.controlnet_from_denoiser(denoiser)

    def needs_controlnet(self) -> bool:
        return self.config.training_mode == "controlnet" or bool(
            self.config.controlnet_model_name_or_path
        )

    def build_tiny(self, seed: int) -> Components:
        raise NotImplementedError

    def load_pretrained(self, path: str) -> Components:
        raise NotImplementedError

    def load_controlnet(self, path: str) -> torch.nn.Module:
        raise NotImplementedError

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def save_pretrained(self, components: Components, folder: str | Path) -> None:
        """Write the base components as a diffusers pipeline folder (a `tiny` run's ``base/``)."""
        raise NotImplementedError

    # --- LoRA files ----------------------------------------------------------------------
    def lora_state_dict(
        self, state_dict: dict[str, torch.Tensor], denoiser: torch.nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
        """A LoRA file's weights (kohya or other layouts) in diffusers/PEFT keys, read by the
        family's own diffusers loader; returns (state dict, network alphas or None)."""
        out = self.pipeline_class.lora_state_dict(state_dict, **self._lora_loader_kwargs(denoiser))
        # SD loaders return (state_dict, network_alphas); the others fold alphas into weights
        return (out[0], out[1]) if isinstance(out, tuple) else (out, None)

    def _lora_loader_kwargs(self, denoiser: torch.nn.Module) -> dict[str, Any]:
        return {}

    # --- encoding ------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        raise NotImplementedError

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], shape (B, 3, H, W) -> scaled latents."""
        raise NotImplementedError

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> the denoiser's text conditioning, as a dict of tensors with batch dim first."""
        raise NotImplementedError

    # --- training step -------------------------------------------------------------------
    def add_noise(
        self, components: Components, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw noise and timesteps from ``generator``; return (noisy latents, noise, timesteps)."""
        raise NotImplementedError

    def noise_latents(
        self,
        components: Components,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Clean latents noised to ``timesteps`` with the given noise (the forward process)."""
        return components.noise_scheduler.add_noise(latents, noise, timesteps)

    def loss(
        self,
        components: Components,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The denoising loss of one forward: `loss_type` (slider_cn/losses.py) over the
        elements; families with loss weighting override it and pass their weights."""
        return denoising_loss(
            prediction,
            target,
            self.config.loss_type,
            self.huber_threshold(components, timesteps),
        )

    def huber_threshold(
        self, components: Components, timesteps: torch.Tensor
    ) -> torch.Tensor | None:
        """The pseudo-Huber threshold of each sample (None for `l2`), on `huber_schedule`."""
        config = self.config
        if config.loss_type == "l2":
            return None
        return huber_threshold(
            config.huber_schedule,
            config.huber_c,
            timesteps,
            num_train_timesteps=components.noise_scheduler.config.num_train_timesteps,
            noise_ratio=lambda: self.noise_ratio(components, timesteps),
        )

    def noise_ratio(self, components: Components, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise level over signal level of the noisy input at ``timesteps`` (1/sqrt(SNR)),
        per sample: sqrt((1 - alpha_bar) / alpha_bar) on the DDPM schedule."""
        alphas = components.noise_scheduler.alphas_cumprod.float()
        alpha_bar = alphas[timesteps.detach().long().cpu()]
        return ((1.0 - alpha_bar) / alpha_bar).sqrt()

    def training_target(
        self,
        components: Components,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """What the denoiser is trained to predict (epsilon, v or the flow velocity)."""
        raise NotImplementedError

    def controlnet_residuals(
        self,
        components: Components,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        conditioning_pixels: torch.Tensor,
        scale: float,
    ) -> dict[str, Any]:
        """Run the ControlNet; return the keyword arguments that feed its output to the denoiser."""
        raise NotImplementedError

    def predict(
        self,
        components: Components,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        residuals: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction, with ControlNet residuals when given."""
        raise NotImplementedError

    def clean_latent_estimate(
        self,
        components: Components,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prediction: torch.Tensor,
    ) -> torch.Tensor:
        """The clean latent implied by a prediction (used to measure the slider's effect)."""
        raise NotImplementedError

    # --- sampling x_t for text sliders (slider_cn/text_step.py) ---------------------------
    def initial_noise(
        self, components: Components, batch: int, resolution: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Pure noise in the latent layout training uses (B, C, R/f, R/f), drawn on the CPU
        from ``generator`` so that it is reproducible on any device."""
        vae = components.vae.config
        factor = 2 ** (len(vae.block_out_channels) - 1)  # as diffusers' pipelines compute it
        side = resolution // factor
        return torch.randn((batch, vae.latent_channels, side, side), generator=generator)

    def sampling_timesteps(
        self, components: Components, steps: int, latents: torch.Tensor
    ) -> torch.Tensor:
        """``steps + 1`` timesteps from pure noise down to clean, in training's convention."""
        raise NotImplementedError

    def noise_estimate(
        self,
        components: Components,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prediction: torch.Tensor,
    ) -> torch.Tensor:
        """The noise implied by a prediction (with ``clean_latent_estimate``, a full split)."""
        raise NotImplementedError

    def denoise_step(
        self,
        components: Components,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        next_timesteps: torch.Tensor,
        prediction: torch.Tensor,
    ) -> torch.Tensor:
        """One deterministic sampler step (DDIM with eta 0; for flow matching, Euler): split
        ``noisy`` into its clean and noise estimates and noise the clean one to the next level."""
        clean = self.clean_latent_estimate(components, noisy, timesteps, prediction)
        noise = self.noise_estimate(components, noisy, timesteps, prediction)
        return self.noise_latents(components, clean, noise, next_timesteps).to(noisy.dtype)

    # --- validation (slider_cn/validate.py) ----------------------------------------------
    def validation_pipeline(self, components: Components) -> Any:
        """A diffusers inference pipeline over ``components``, for validation images.

        The pipeline must hold the very module objects of ``components`` (no copies, no dtype
        or device moves), so the slider and any assistant adapter on them are in it; with
        ``components.controlnet`` set, use the family's ControlNet pipeline class with that
        ControlNet. Build an inference scheduler from ``components.noise_scheduler.config``
        rather than reuse (and mutate) the training noise scheduler. Do not call
        ``set_adapters`` or pass LoRA scales: validate.py sets the slider's strength itself.
        """
        raise NotImplementedError(f"{self.name}: validation is not implemented")

    def validation_call_kwargs(
        self, prompt: str, conditioning_image: Any | None, config: TrainConfig
    ) -> dict[str, Any]:
        """Keyword arguments for one call of the validation pipeline, except the generator.

        ``prompt``; ``height``/``width`` from ``config.validation_size`` (``validation_resolution``,
        else ``resolution``); ``num_inference_steps`` from
        ``validation_num_inference_steps``; the guidance scale from ``validation_guidance``
        under the pipeline's own name; and, when ``conditioning_image`` (a PIL image) is given,
        that image under the pipeline's own name (``image`` for SD/SDXL ControlNet pipelines,
        ``control_image`` for others) plus ``controlnet_conditioning_scale``;
        ``guidance_rescale`` (``validation_guidance_rescale``, when set) for pipelines that
        take it, a warning once for those that do not. Never a
        ``cross_attention_kwargs`` / ``joint_attention_kwargs`` scale: it would scale every
        adapter, the assistant included (docs/design.md §8.2, §8.8).
        """
        width, height = config.validation_size
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "height": height,
            "width": width,
            "num_inference_steps": config.validation_num_inference_steps,
            "guidance_scale": config.validation_guidance,
        }
        if conditioning_image is not None:
            kwargs[self.control_image_argument] = conditioning_image
            kwargs["controlnet_conditioning_scale"] = config.controlnet_conditioning_scale
        if config.validation_guidance_rescale:
            pipeline = (
                self.controlnet_pipeline_class
                if conditioning_image is not None and self.controlnet_pipeline_class is not None
                else self.pipeline_class
            )
            if "guidance_rescale" in inspect.signature(pipeline.__call__).parameters:
                kwargs["guidance_rescale"] = config.validation_guidance_rescale
            elif pipeline.__name__ not in _WARNED_NO_RESCALE:
                _WARNED_NO_RESCALE.add(pipeline.__name__)
                logging.getLogger("slider_cn.validate").warning(
                    "validation_guidance_rescale %s is not used: %s takes no guidance_rescale",
                    config.validation_guidance_rescale,
                    pipeline.__name__,
                )
        return kwargs

    def encoder_identity(self) -> str:
        """A string naming the model whose encoders produced a cache entry."""
        base = self.config.pretrained_model_name_or_path
        if base == "tiny":
            return f"{self.name}:tiny:seed{self.config.seed}"
        if self.config.is_shapes:
            # the shipped weights can be rebuilt: key caches by the UNet file's size and time
            from slider_cn.shapes import builtin_model

            stat = next(builtin_model(base).glob("unet/*.safetensors")).stat()
            return f"{self.name}:shapes:{stat.st_size}:{stat.st_mtime_ns}"
        path = Path(base)
        return f"{self.name}:{path.resolve() if path.exists() else base}"
