"""Median text-slider step time of slider-cn against the same forwards written plainly (CPU).

    python bench/text_step.py [--pairs 15] [--cases lora,lora+cn,controlnet] [--steps 8]

One text-slider micro-batch is: k frozen sampler steps from pure noise on the target prompt
(k drawn in 1..steps-1), one batched frozen forward for target / positive / negative, one
adapted forward on the target at multiplier s, the loss against
eps(target) + eta * (eps(positive) - eps(negative)), its backward, and the optimizer step.

- slider-cn: `SliderRecipe.train_micro_batch` with the recipe's `TextSliderStep`, on a recipe set
  up with the bench's models (bench/common.py's `BenchRecipe`): accumulate + autocast, the
  step, the non-finite check, clipping, AdamW and scheduler step, the train_log record.
- plain: the same forwards by hand on the same modules and adapter: a loop of UNet (and
  ControlNet) calls with the DDIM update written out, `torch.cat` for the batched forward, the
  ControlNet residuals of the target rows sliced by hand, MSE, backward, clip, AdamW step.

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
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

GOAL = 1.05
ETA = 1.0


class Setup:
    """The models, the recipe and both steps for one case."""

    def __init__(self, case: str, args, root: Path):
        from slider_cn.data.prompts import PromptTask

        self.case, self.args = case, args
        mode = "controlnet" if case == "controlnet" else "lora"
        config = common.bench_config(
            root / case,
            mode,
            conditioning=case != "lora",
            lora_rank=args.rank,
            lora_alpha=args.rank,
            mixed_precision="no",
            seed=args.seed,
        )
        unet = common.build_unet(args.model, torch.device("cpu"), args.seed)
        controlnet = common.build_controlnet(unet, args.seed) if case != "lora" else None
        # a tiny VAE config is all initial_noise reads: 4 latent channels, 8x downsampling
        vae = torch.nn.Module()
        vae.config = type("VaeConfig", (), {"block_out_channels": (1, 1, 1, 1),
                                            "latent_channels": 4})()  # fmt: skip
        self.recipe = common.BenchRecipe(config, (unet, controlnet), torch.device("cpu"), vae=vae)
        self.recipe.setup()
        self.adapter = self.recipe.trainables.adapter
        self.components = self.recipe.components
        self.task = PromptTask("bench", "pair", "t", "p", "n", ETA, "enhance", args.steps)
        self.plans = {
            s: common.bench_plan("+" if s > 0 else "-", s, self.task) for s in (1.0, -1.0)
        }
        # the plain side's optimizer: AdamW on the same adapter, as a plain loop has it
        self.params = self.adapter.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=1e-2)
        g = torch.Generator().manual_seed(args.seed)
        b, context = args.batch, common.UNETS[args.model]["cross_attention_dim"]
        self.cond = {"encoder_hidden_states": torch.randn(3 * b, 77, context, generator=g)}
        self.pixels = (
            torch.rand(b, 3, args.resolution, args.resolution, generator=g)
            if controlnet is not None
            else None
        )

    # --- slider-cn --------------------------------------------------------------------------
    def _inputs(self, strength: float):
        from slider_cn.text_step import TextStepInputs

        return TextStepInputs(
            task=self.task,
            cond=self.cond,
            batch_size=self.args.batch,
            resolution=self.args.resolution,
            slider_strength=strength,
            conditioning_pixels=self.pixels,
        )

    def slider_step(self, seed: int, strength: float) -> float:
        """One text-slider micro-batch of the recipe: `train_micro_batch` with its TextSliderStep
        (forwards, backward, clipping, optimizer step, the train_log record)."""
        recipe = self.recipe
        recipe.generator.manual_seed(seed)
        record = recipe.train_micro_batch(
            self.plans[strength], recipe.text_step_fn, self._inputs(strength)
        )
        return record["loss"]

    def slider_loss(self, seed: int, strength: float) -> float:
        """The recipe's text step alone, no backward: the loss both sides must agree on."""
        generator = torch.Generator().manual_seed(seed)
        return self.recipe.text_step_fn(self._inputs(strength), generator).loss.item()

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
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def compare(case: str, args, root: Path) -> dict:
    setup = Setup(case, args, root)
    # the two sides compute the same loss from the same draws (before either steps the
    # weights): a check that the plain side really is the same work
    a, b = setup.slider_loss(123, 1.0), setup.plain_step(123, 1.0)
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
    with tempfile.TemporaryDirectory(prefix="bench-text-step-") as tmp:
        rows = [compare(case, args, Path(tmp)) for case in args.cases.split(",") if case]
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
