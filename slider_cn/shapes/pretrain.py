"""Reproduce the shipped `shapes` pipeline and its `shapes-canny` ControlNet from a seed.

    python -m slider_cn.shapes.pretrain --output slider_cn/shapes/weights

Four stages, each saved under ``<output>/stages`` (or ``--stages``; not part of the package) so
an interrupted run continues from the last finished one, and a stage is trained again only when
a setting it depends on changed: the VAE (reconstruction + KL), the text encoder and UNet together (v-prediction,
caption dropout for classifier-free guidance, EMA weights), the canny ControlNet on the frozen
base, then the evaluation (caption accuracy of the base, outline IoU of the ControlNet), written
to ``<output>/pretrain_report.json``. The same script runs on a CPU or a GPU (``--device``)
and gives the same kind of model; it runs once, by the maintainers, never in CI or the demo.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from slider_cn.shapes import models
from slider_cn.shapes.measure import mask_iou, measure, shape_mask
from slider_cn.shapes.world import COLOURS, SHAPES, ShapeSpec, render, sample_spec

log = logging.getLogger("slider_cn.shapes.pretrain")


@dataclass
class PretrainSettings:
    seed: int = 0
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 2e-3
    pool_size: int = 16384  # pictures encoded once for the UNet and ControlNet stages
    unet_steps: int = 5000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    controlnet_steps: int = 1500
    controlnet_batch: int = 64
    controlnet_lr: float = 1e-3
    controlnet_caption_dropout: float = 0.5
    eval_seeds: int = 3
    eval_steps: int = 25
    eval_guidance: float = 3.0


def pool_specs(settings: PretrainSettings) -> list[ShapeSpec]:
    rng = np.random.default_rng(settings.seed + 1)
    return [sample_spec(rng) for _ in range(settings.pool_size)]


def to_pixels(images) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def training_caption(spec: ShapeSpec, rng: np.random.Generator, dropout: float) -> str:
    """The full caption, or one with the size and/or colour word left out, or none (CFG)."""
    if rng.random() < dropout:
        return ""
    words = ["shape"]
    if rng.random() < 0.8:
        words.append("colour")
    if rng.random() < 0.5:
        words.append("size")
    return spec.caption(words)


def _tokens(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=models.MAX_TOKENS, return_tensors="pt"
    ).input_ids.to(device)


def _lr_lambda(steps: int, warmup: int = 100):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _noised(scheduler, x0: torch.Tensor, generator: torch.Generator):
    """Noise drawn from ``generator`` at uniform timesteps; the v-prediction target."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    t = t.to(x0.device)
    return scheduler.add_noise(x0, noise, t), t, scheduler.get_velocity(x0, noise, t)


# --- stages ----------------------------------------------------------------------------------
def train_vae(settings: PretrainSettings, device: torch.device):
    torch.manual_seed(settings.seed)
    vae = models.build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings.vae_steps))
    rng = np.random.default_rng(settings.seed + 2)
    bar = tqdm(range(settings.vae_steps), desc="vae", mininterval=5)
    for _ in bar:
        pixels = to_pixels(render(sample_spec(rng)) for _ in range(settings.vae_batch)).to(device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + settings.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    return vae, {"vae_final_mse": mse.item()}


@torch.no_grad()
def encode_pool(vae, specs: list[ShapeSpec], device: torch.device):
    """Latents (unscaled) and canny maps of every pool picture."""
    latents, canny = [], []
    for start in tqdm(range(0, len(specs), 256), desc="encode pool", mininterval=5):
        images = [render(spec) for spec in specs[start : start + 256]]
        latents.append(vae.encode(to_pixels(images).to(device)).latent_dist.mode().cpu())
        maps = [models.canny_map(image) for image in images]
        canny.append(torch.from_numpy(np.stack(maps)).unsqueeze(1).float() / 255.0)
    return torch.cat(latents), torch.cat(canny)


def train_base(settings, device, tokenizer, latents, specs, scheduler):
    torch.manual_seed(settings.seed + 3)
    text_encoder = models.build_text_encoder(tokenizer).to(device)
    unet = models.build_unet().to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings.unet_steps))
    ema_unet = EMAModel(unet.parameters(), decay=settings.ema_decay, use_ema_warmup=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=settings.ema_decay, use_ema_warmup=True)
    rng = np.random.default_rng(settings.seed + 4)
    generator = torch.Generator().manual_seed(settings.seed + 5)
    bar = tqdm(range(settings.unet_steps), desc="unet + text encoder", mininterval=5)
    for _ in bar:
        index = rng.integers(len(specs), size=settings.unet_batch)
        x0 = latents[index].to(device)
        captions = [training_caption(specs[i], rng, settings.caption_dropout) for i in index]
        noisy, t, target = _noised(scheduler, x0, generator)
        hidden = text_encoder(_tokens(tokenizer, captions, device))[0]
        prediction = unet(noisy, t, hidden).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return unet, text_encoder, {"unet_final_loss": loss.item()}


def train_controlnet(
    settings, device, tokenizer, text_encoder, unet, latents, canny, specs, scheduler
):
    torch.manual_seed(settings.seed + 6)
    controlnet = models.build_controlnet(unet).to(device).train()
    optimizer = torch.optim.AdamW(
        controlnet.parameters(), lr=settings.controlnet_lr, weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings.controlnet_steps))
    rng = np.random.default_rng(settings.seed + 7)
    generator = torch.Generator().manual_seed(settings.seed + 8)
    bar = tqdm(range(settings.controlnet_steps), desc="controlnet", mininterval=5)
    for _ in bar:
        index = rng.integers(len(specs), size=settings.controlnet_batch)
        x0 = latents[index].to(device)
        cond = canny[index].expand(-1, 3, -1, -1).to(device)
        captions = [
            training_caption(specs[i], rng, settings.controlnet_caption_dropout) for i in index
        ]
        noisy, t, target = _noised(scheduler, x0, generator)
        with torch.no_grad():
            hidden = text_encoder(_tokens(tokenizer, captions, device))[0]
        down, mid = controlnet(noisy, t, hidden, controlnet_cond=cond, return_dict=False)
        prediction = unet(
            noisy,
            t,
            hidden,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    controlnet.eval().requires_grad_(False)
    return controlnet, {"controlnet_final_loss": loss.item()}


# --- evaluation ------------------------------------------------------------------------------
def _ddim(scheduler):
    return DDIMScheduler.from_config(scheduler.config)


@torch.no_grad()
def evaluate(settings, pipe: StableDiffusionPipeline, controlnet, device) -> dict:
    """Caption accuracy of the base; outline IoU of the ControlNet."""
    captions = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    prompts = [c for c in captions for _ in range(settings.eval_seeds)]
    generator = torch.Generator().manual_seed(settings.seed + 100)
    images = pipe(
        prompts,
        height=models.RESOLUTION,
        width=models.RESOLUTION,
        num_inference_steps=settings.eval_steps,
        guidance_scale=settings.eval_guidance,
        generator=generator,
    ).images
    measured = [measure(image) for image in images]
    colour_ok = [m.colour == p.split()[1] for m, p in zip(measured, prompts, strict=True)]
    shape_ok = [m.shape == p.split()[2] for m, p in zip(measured, prompts, strict=True)]
    found = [m.found for m in measured]
    report = {
        "caption_samples": len(prompts),
        "shape_found": float(np.mean(found)),
        "colour_accuracy": float(np.mean(colour_ok)),
        "shape_accuracy": float(np.mean(shape_ok)),
        "both_accuracy": float(
            np.mean([a and b for a, b in zip(colour_ok, shape_ok, strict=True)])
        ),
    }
    # ControlNet: outlines of unseen pictures, prompts that name no colour
    rng = np.random.default_rng(settings.seed + 101)
    specs = [sample_spec(rng) for _ in range(24)]
    maps = []
    for spec in specs:
        image = render(spec)
        edges = models.canny_map(image)
        maps.append(torch.from_numpy(np.stack([edges] * 3)).float() / 255.0)
    cn_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    cn_pipe.set_progress_bar_config(disable=True)
    generated = cn_pipe(
        [spec.caption(("shape",)) for spec in specs],
        image=torch.stack(maps),
        height=models.RESOLUTION,
        width=models.RESOLUTION,
        num_inference_steps=settings.eval_steps,
        guidance_scale=settings.eval_guidance,
        generator=torch.Generator().manual_seed(settings.seed + 102),
    ).images
    ious = [
        mask_iou(shape_mask(image), shape_mask(render(spec)))
        for image, spec in zip(generated, specs, strict=True)
    ]
    report["controlnet_mask_iou_mean"] = float(np.mean(ious))
    report["controlnet_mask_iou_min"] = float(np.min(ious))
    return report, images, generated


def _contact_sheet(images, columns: int):
    from PIL import Image

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


# --- stages ----------------------------------------------------------------------------------
# The settings each stage's result depends on (by name or prefix): a saved stage is reused only
# when these match, so changing --unet-steps retrains the UNet and the ControlNet, not the VAE.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "vae": ("seed", "vae_"),
    "base": ("seed", "vae_", "pool_size", "unet_", "caption_dropout", "ema_decay"),
}
STAGE_SETTINGS["controlnet"] = (*STAGE_SETTINGS["base"], "controlnet_")


def _stage_settings(settings: PretrainSettings, stage: str) -> dict:
    keys = STAGE_SETTINGS[stage]
    return {k: v for k, v in asdict(settings).items() if any(k.startswith(p) for p in keys)}


def _run_stage(stages: Path, name: str, settings: PretrainSettings, modules: dict, train):
    """Load stage ``name`` from ``stages`` when it was made with the same settings; else call
    ``train()`` (which returns the trained modules, in ``modules``' order, and its stats), save
    it and return its stats with the seconds it took."""
    from safetensors import safe_open

    path = stages / f"{name}.safetensors"
    wanted = _stage_settings(settings, name)
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            saved = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
        if saved.pop("settings", None) == wanted:
            state = load_file(str(path))
            for prefix, module in modules.items():
                own = {
                    k.removeprefix(prefix + "."): v
                    for k, v in state.items()
                    if k.startswith(prefix + ".")
                }
                module.load_state_dict(own)
                module.eval().requires_grad_(False)
            return saved, False
        log.info("stage %s was made with other settings: training it again", name)
    started = time.perf_counter()
    *trained, stats = train()
    for module, fresh in zip(modules.values(), trained, strict=True):
        module.load_state_dict(fresh.state_dict())
        module.eval().requires_grad_(False)
    stats = {**stats, "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{prefix}.{key}": value.detach().cpu().contiguous()
        for prefix, module in modules.items()
        for key, value in module.state_dict().items()
    }
    metadata = {k: json.dumps(v) for k, v in {**stats, "settings": wanted}.items()}
    save_file(tensors, str(path), metadata=metadata)
    return stats, True


def _stamp_metadata(folder: Path, metadata: dict[str, str]) -> None:
    """Add the generator settings to every safetensors file diffusers wrote under ``folder``."""
    from safetensors import safe_open

    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            own = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        save_file(tensors, str(path), metadata={**own, **metadata})


def pretrain(
    settings: PretrainSettings, output: Path, device: str = "cpu", stages: Path | None = None
) -> dict:
    output = Path(output)
    dev = torch.device(device)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tokenizer = models.build_tokenizer()
    scheduler = models.build_scheduler()

    stages = Path(stages) if stages else output / "stages"
    trained: dict[str, bool] = {}
    vae = models.build_vae().to(dev)
    stats, trained["vae"] = _run_stage(
        stages, "vae", settings, {"vae": vae}, lambda: train_vae(settings, dev)
    )
    specs = pool_specs(settings)
    t = time.perf_counter()
    latents, canny = encode_pool(vae, specs, dev)
    timings["encode_s"] = time.perf_counter() - t
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    unet, text_encoder = models.build_unet().to(dev), models.build_text_encoder(tokenizer).to(dev)
    base_stats, trained["base"] = _run_stage(
        stages,
        "base",
        settings,
        {"unet": unet, "text_encoder": text_encoder},
        lambda: train_base(settings, dev, tokenizer, latents, specs, scheduler),
    )
    controlnet = models.build_controlnet(unet).to(dev)
    cn_stats, trained["controlnet"] = _run_stage(
        stages,
        "controlnet",
        settings,
        {"controlnet": controlnet},
        lambda: train_controlnet(
            settings, dev, tokenizer, text_encoder, unet, latents, canny, specs, scheduler
        ),
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    report, samples, controlled = evaluate(settings, pipe, controlnet, dev)
    timings["evaluate_s"] = time.perf_counter() - t

    # ship: fp16 weights (half the bytes; loaded back as fp32), the training noise scheduler
    base_dir, canny_dir = output / "base", output / "canny"
    pipe.scheduler = scheduler
    pipe.to(torch.float16).save_pretrained(str(base_dir), safe_serialization=True)
    controlnet.to(torch.float16).save_pretrained(str(canny_dir), safe_serialization=True)
    metadata = {
        "slider_cn.shapes.settings": json.dumps(asdict(settings)),
        "slider_cn.shapes.resolution": str(models.RESOLUTION),
    }
    _stamp_metadata(base_dir, metadata)
    _stamp_metadata(canny_dir, metadata)
    _contact_sheet(samples, columns=settings.eval_seeds * 3).save(output / "pretrain_samples.png")
    _contact_sheet(controlled, columns=8).save(output / "pretrain_controlnet_samples.png")

    report.update(
        {
            "settings": asdict(settings),
            "device": device,
            "threads": torch.get_num_threads(),
            "seconds": {**timings, "total_s": time.perf_counter() - started},
            "trained_now": trained,
            "stages": {"vae": stats, "base": base_stats, "controlnet": cn_stats},
            "vae_scaling_factor": scale,
        }
    )
    (output / "pretrain_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slider_cn.shapes.pretrain",
        description="Train the shapes pipeline and its canny ControlNet from a seed.",
    )
    parser.add_argument("--output", required=True, help="folder for base/, canny/ and the report")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--stages", help="folder of the finished stages, to resume from (default: OUTPUT/stages)"
    )
    for field in fields(PretrainSettings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in fields(PretrainSettings)})
    report = pretrain(settings, Path(args.output), args.device, args.stages)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
