"""Median text-slider step time of slider-cn against the same forwards written plainly (CPU).

    python bench/text_step.py [--pairs 15] [--cases lora,lora+cn,controlnet] [--steps 8]

One text-slider micro-batch is: k frozen sampler steps from pure noise on the target prompt
(k drawn in 1..steps-1), one batched frozen forward for target / positive / negative, one
adapted forward on the target at multiplier s, the loss against
eps(target) + eta * (eps(positive) - eps(negative)), and its backward.

- slider-cn: `TextSliderStep` (slider_cn/text_step.py), as train.py calls it.
- plain: the same forwards by hand on the same modules and adapter: a loop of UNet (and
  ControlNet) calls with the DDIM update written out, `torch.cat` for the batched forward, the
  ControlNet residuals of the target rows sliced by hand, MSE, backward.

Both sides draw the noise and k from a generator seeded per pair, so every pair runs the same
number of forwards; the two steps of a pair run back to back in alternating order. Goal: ratio
slider-cn / plain <= 1.05 in every case. Cases: lora (no ControlNet), lora+cn (a frozen
ControlNet in every forward), controlnet (the slider on the ControlNet).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from slider_cn.config import TrainConfig  # noqa: E402

GOAL = 1.05
ETA = 1.0


class Setup:
    """The models, the adapter and both steps for one case."""

    def __init__(self, case: str, args):
        from slider_cn.adapters import attach_slider_adapter
        from slider_cn.data.prompts import PromptTask
        from slider_cn.families import get_family
        from slider_cn.families.base import Components
        from slider_cn.families.sd import _sd_noise_scheduler
        from slider_cn.text_step import TextSliderStep

        self.case, self.args = case, args
        mode = "controlnet" if case == "controlnet" else "lora"
        config = TrainConfig(training_mode=mode, slider_lora_target=True, lora_rank=args.rank)
        self.family = get_family(config)
        unet = common.build_unet(args.model, torch.device("cpu"), args.seed)
        controlnet = common.build_controlnet(unet, args.seed) if case != "lora" else None
        for module in (unet, controlnet):
            if module is not None:
                module.requires_grad_(False)
        side = "controlnet" if mode == "controlnet" else "denoiser"
        trainable = controlnet if mode == "controlnet" else unet
        torch.manual_seed(args.seed)
        self.adapter = attach_slider_adapter(
            trainable, common.slider_targets(trainable, side), config
        )
        trainable.train()
        # a tiny VAE config is all initial_noise reads: 4 latent channels, 8x downsampling
        vae = torch.nn.Module()
        vae.config = type("VaeConfig", (), {"block_out_channels": (1, 1, 1, 1),
                                            "latent_channels": 4})()  # fmt: skip
        self.components = Components(
            denoiser=unet,
            vae=vae,
            text_encoders=[],
            tokenizers=[],
            noise_scheduler=_sd_noise_scheduler(),
            controlnet=controlnet,
        )
        self.task = PromptTask("bench", "pair", "t", "p", "n", ETA, "enhance", args.steps)
        self.step = TextSliderStep(
            self.family, self.components, self.adapter, training_mode=mode, max_strength=1.0
        )
        g = torch.Generator().manual_seed(args.seed)
        b, context = args.batch, common.UNETS[args.model]["cross_attention_dim"]
        self.cond = {"encoder_hidden_states": torch.randn(3 * b, 77, context, generator=g)}
        self.pixels = (
            torch.rand(b, 3, args.resolution, args.resolution, generator=g)
            if controlnet is not None
            else None
        )

    # --- slider-cn --------------------------------------------------------------------------
    def slider_step(self, seed: int, strength: float) -> float:
        from slider_cn.text_step import TextStepInputs

        inputs = TextStepInputs(
            task=self.task,
            cond=self.cond,
            batch_size=self.args.batch,
            resolution=self.args.resolution,
            slider_strength=strength,
            conditioning_pixels=self.pixels,
        )
        generator = torch.Generator().manual_seed(seed)
        result = self.step(inputs, generator, backward=lambda loss: loss.backward())
        self._zero_grad()
        return result.loss.item()

    # --- the same forwards, plainly ---------------------------------------------------------
    def _controlnet(self, x, t, text, pixels):
        down, mid = self.components.controlnet(
            x, t, encoder_hidden_states=text, controlnet_cond=pixels, return_dict=False
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _unet(self, x, t, text, residuals):
        return self.components.denoiser(
            x, t, encoder_hidden_states=text, return_dict=False, **(residuals or {})
        )[0]

    def plain_step(self, seed: int, strength: float) -> float:
        b, side = self.args.batch, self.args.resolution // 8
        steps, pixels = self.args.steps, self.pixels
        scheduler = self.components.noise_scheduler
        alphas = scheduler.alphas_cumprod
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((b, 4, side, side), generator=generator)
        k = int(torch.randint(1, steps, (1,), generator=generator).item())
        grid = torch.linspace(999, 0, steps + 1).round().long()
        text = self.cond["encoder_hidden_states"]
        target_text = text[:b]
        cn = self.components.controlnet is not None
        with torch.no_grad(), self.adapter.switched_off():
            for i in range(k):
                t = grid[i].expand(b)
                residuals = self._controlnet(x, t, target_text, pixels) if cn else None
                eps = self._unet(x, t, target_text, residuals)
                a, a_next = alphas[grid[i]], alphas[grid[i + 1]]
                clean = (x - (1 - a).sqrt() * eps) / a.sqrt()
                x = a_next.sqrt() * clean + (1 - a_next).sqrt() * eps
            t = grid[k].expand(b)
            x3, t3 = torch.cat([x, x, x]), torch.cat([t, t, t])
            p3 = torch.cat([pixels, pixels, pixels]) if cn else None
            residuals = self._controlnet(x3, t3, text, p3) if cn else None
            eps_t, eps_p, eps_n = self._unet(x3, t3, text, residuals).chunk(3)
            target = eps_t + (1.0 if strength > 0 else -1.0) * ETA * (eps_p - eps_n)
            if cn:
                residuals = {
                    "down_block_additional_residuals": [
                        r[:b] for r in residuals["down_block_additional_residuals"]
                    ],
                    "mid_block_additional_residual": residuals["mid_block_additional_residual"][:b],
                }
        with self.adapter.multiplier(strength):
            if self.case == "controlnet":
                residuals = self._controlnet(x, t, target_text, pixels)
            loss = F.mse_loss(self._unet(x, t, target_text, residuals).float(), target.float())
            loss.backward()
        self._zero_grad()
        return loss.item()

    def _zero_grad(self) -> None:
        for p in self.adapter.trainable_parameters():
            p.grad = None


def compare(case: str, args) -> dict:
    setup = Setup(case, args)
    # the two sides compute the same loss from the same draws: a check that the plain side
    # really is the same work
    a, b = setup.slider_step(123, 1.0), setup.plain_step(123, 1.0)
    if abs(a - b) > 1e-4 * max(1.0, abs(b)):
        raise SystemExit(f"{case}: slider-cn loss {a} and plain loss {b} differ")
    for i in range(args.warmup):
        setup.slider_step(i, 1.0)
        setup.plain_step(i, 1.0)
    times: dict[str, list[float]] = {"slider": [], "plain": []}
    for i in range(args.pairs):
        strength = 1.0 if i % 2 == 0 else -1.0
        order = [("slider", setup.slider_step), ("plain", setup.plain_step)]
        for name, fn in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            fn(1000 + i, strength)
            times[name].append(time.perf_counter() - start)
    s, p = statistics.median(times["slider"]), statistics.median(times["plain"])
    ratios = sorted(x / y for x, y in zip(times["slider"], times["plain"], strict=True))
    return {"case": case, "slider": s, "plain": p, "ratio": s / p,
            "paired": statistics.median(ratios), "q1": ratios[len(ratios) // 4],
            "q3": ratios[(3 * len(ratios)) // 4]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", choices=sorted(common.UNETS))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="denoising_steps of the entry")
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", default="lora,lora+cn,controlnet")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [compare(case, args) for case in args.cases.split(",") if case]
    print(
        f"{args.model} UNet at {args.resolution}px, batch {args.batch}, LoRA rank {args.rank}, "
        f"denoising_steps {args.steps}, {args.threads} thread(s); median of {args.pairs} "
        "interleaved text-slider steps each (same draws, same forwards on both sides)"
    )
    print(f"{'case':<12}{'slider-cn':>12}{'plain':>12}{'ratio':>8}  "
          f"{'pairs: median [q1..q3]':<25}goal")  # fmt: skip
    for r in rows:
        ok = "ok" if r["ratio"] <= GOAL else "OVER"
        print(
            f"{r['case']:<12}{r['slider'] * 1e3:>10.1f}ms{r['plain'] * 1e3:>10.1f}ms"
            f"{r['ratio']:>8.3f}  {r['paired']:.3f} [{r['q1']:.3f}..{r['q3']:.3f}]{'':<4}"
            f"<= {GOAL} {ok}"
        )
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
