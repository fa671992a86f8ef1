"""The training recipe (in the style of torchtune's recipes), read top to bottom:

    recipe = SliderRecipe(config)
    recipe.setup()           # accelerator, data, model, trainables, optimizer, steps, resume
    recipe.train()           # each micro-batch: train_micro_batch; each optimizer step:
                             # on_optimizer_step (log, checkpoint, validate)
    result = recipe.save()   # the last checkpoint and the final outputs
    recipe.cleanup()

`setup()` is a row of small named steps, each of which sets the attributes the next ones
read; `_load_components` is the one place the model comes from (the benchmarks put their own
models there). `train_micro_batch` is the whole of one micro-batch's training, which the
benchmarks time.

Faults: bad data found while loading a micro-batch (a ConfigError naming the file) on any rank
stops every rank at the same micro-batch, and all of them save what was trained; any other error
stops all without saving. A non-finite loss or gradient stops the run at that step with the last
good state saved, naming the micro-batch's backend and files. Ctrl-C finishes the optimizer step
under way, then saves and stops. No checkpoint is written before the first step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from slider_cn import checkpoints, outputs, precision, validate
from slider_cn.adapters import attach_slider_adapter, load_assistant_adapter, read_lycoris_config
from slider_cn.config import TrainConfig
from slider_cn.data.backends import training_backends
from slider_cn.data.cache import EncodedCache
from slider_cn.data.loading import prefetch_batches
from slider_cn.data.sampler import SliderSampler
from slider_cn.ema import SliderEMA
from slider_cn.errors import ConfigError
from slider_cn.families import get_family
from slider_cn.offload import TextEncoderPlacement
from slider_cn.step import SliderStep, StepInputs
from slider_cn.targets import controlnet_output_projections, resolve_targets
from slider_cn.text_step import TextSliderStep, TextStepInputs
from slider_cn.trainables import Trainables

log = logging.getLogger("slider_cn.train")


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. a non-finite loss); the last good state is saved."""


@dataclass
class TrainResult:
    """What a finished run leaves in memory, for callers that go on to measure or validate."""

    output_dir: Path
    steps: int
    family: Any
    components: Any
    adapter: Any
    files: dict[str, Path]


# --- refusals made before any work (the dry run makes them too) ------------------------------


def preflight(config: TrainConfig):
    """Every refusal that needs no data and no model, made before any work (the dry run makes
    the same ones); returns the validation prompts."""
    if config.data_backend_config is None and config.slider_prompts is None:
        raise ConfigError(
            "data_backend_config is required to train: set it in the config or pass "
            "--data_backend_config FILE (or give text sliders in slider_prompts)"
        )
    _check_output_dir(config)
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise ConfigError(
            f"report_to '{config.report_to}' needs the {config.report_to} package: pip install {config.report_to}"
        )
    if config.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("optimizer 'adamw_8bit' needs bitsandbytes: pip install bitsandbytes")
    if config.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise ConfigError(
            "optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt"
        )
    if config.lora_type == "lycoris":
        read_lycoris_config(config.lycoris_config)
    precision.check_config(config)
    return validate.check_validation_config(config)


def _check_output_dir(config: TrainConfig) -> None:
    found = checkpoints.list_checkpoints(config.output_dir)
    if found and not config.resume_from_checkpoint:
        raise ConfigError(
            f"output_dir {config.output_dir} already holds checkpoints of a run ({found[-1].name}); "
            "pass --resume_from_checkpoint latest to continue it, or choose another output_dir"
        )


def check_conditioning(config: TrainConfig, backends) -> None:
    """Checked before any model is loaded: a ControlNet in the loop needs a conditioning image
    for every training image."""
    if config.training_mode != "controlnet" and not config.controlnet_model_name_or_path:
        return
    missing = [b.id for b in backends if not b.has_conditioning and b.prompt is None]
    entries = sorted(
        {b.prompt.entry for b in backends if b.prompt is not None and not b.has_conditioning}
    )
    if entries:
        raise ConfigError(
            f"slider_prompts entr{'ies' if len(entries) > 1 else 'y'} {', '.join(entries)}: a "
            "ControlNet in the loop needs conditioning images; set conditioning_data on each "
            "entry to a conditioning backend of data_backend_config"
        )
    if missing:
        what = (
            "training_mode 'controlnet'"
            if config.training_mode == "controlnet"
            else "a ControlNet in the loop"
        )
        raise ConfigError(
            f"{config.data_backend_config}: {what} needs conditioning images, but "
            f"backend(s) {', '.join(missing)} have none; set conditioning_data (a conditioning backend) "
            'or an inline "conditioning": [{"type": "canny"}] on each'
        )


# --- the recipe ------------------------------------------------------------------------------


class SliderRecipe:
    """One slider run; see the module docstring."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.global_step = 0  # optimizer steps done
        self.start_epoch = 0
        self.epoch = 0
        self.boundary: dict[str, Any] = {}  # the state at the last step boundary (checkpoints)
        self.bad_batches: list = []  # micro-batches with a non-finite loss since the last step
        self.dropped_captions = 0  # captions dropped from the micro-batch being trained
        self.ema: SliderEMA | None = None  # `use_ema`
        self.interrupt = _DeferredInterrupt()
        self.log_file = None
        self.progress = None
        self.assistant = None
        # accelerate's cpu flag: without a GPU, say so (accelerate then starts gloo ranks under
        # torchrun on CPU)
        self.cpu = not torch.cuda.is_available()

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        self.validation_prompts = preflight(self.config)  # fail before any work
        self._setup_accelerator()
        self._setup_data()  # validated before any model is loaded
        self._setup_model()
        self._setup_trainables()
        self._setup_optimizer()
        self._setup_steps()
        if self.config.resume_from_checkpoint:
            self._resume()

    def _setup_accelerator(self) -> None:
        config = self.config
        self.accelerator = Accelerator(
            # collectives wait up to an hour: the other ranks wait while the main one generates
            # inline conditioning (canny/depth over a whole dataset)
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=1))],
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=precision.autocast_precision(config),
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=config.output_dir,
            cpu=self.cpu,
        )
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        # frozen weights are stored in the autocast precision; the trained ones stay fp32
        self.weight_dtype = precision.autocast_dtype(config)
        if self.is_main:
            chosen = precision.autocast_precision(config)
            why = "auto" if config.mixed_precision == "auto" else "set in the config"
            log.info("mixed_precision %s (%s) on %s", chosen, why, self.device)

    def _setup_data(self) -> None:
        accelerator = self.accelerator
        # Inline conditioning is generated by the main process; the others then find it cached.
        with accelerator.main_process_first():
            self.backends = training_backends(
                self.config, progress=self.is_main, world_size=accelerator.num_processes
            )
        check_conditioning(self.config, self.backends)
        self.sampler = SliderSampler(
            self.backends,
            batch_size=self.config.train_batch_size,
            seed=self.config.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )

    def _setup_model(self) -> None:
        self.family = get_family(self.config)
        self.components = self._load_components()
        for module in self.components.modules().values():
            # frozen weights in the autocast precision; the trainable ones go back to fp32 later
            if self.weight_dtype == torch.float32:
                module.to(self.device)
            else:
                module.to(self.device, self.weight_dtype)

    def _load_components(self):
        """The model components of the run (the one place the model comes from)."""
        return self.family.load_components()

    def _setup_trainables(self) -> None:
        """The slider adapter on the trainable side (and a fresh ControlNet's output
        projections), fp32 master weights, then the frozen side made ready around them."""
        config, components = self.config, self.components
        self.side = "controlnet" if config.training_mode == "controlnet" else "denoiser"
        trainable = components.controlnet if self.side == "controlnet" else components.denoiser
        arch = self.family.name  # a family's architecture has its name (its own `targets`)
        self.targets = resolve_targets(
            trainable,
            arch,
            side=self.side,
            slider=config.slider_lora_target,
            exclude_shared_with=components.denoiser if self.side == "controlnet" else None,
        )
        if config.assistant_lora_path:
            self.assistant = load_assistant_adapter(
                components.denoiser,
                config.assistant_lora_path,
                config.assistant_lora_strength,
                family=self.family,
            )
        # Adapter initialisation draws from the global RNG: the same seed on every rank gives a
        # reproducible run and identical starting weights everywhere.
        set_seed(config.seed)
        adapter = attach_slider_adapter(trainable, self.targets.names, config)
        # A fresh ControlNet's output projections are zero: unless they learn, its residuals
        # stay zero and no gradient reaches the adapter (docs/design.md §8.1).
        projections = (
            controlnet_output_projections(trainable, arch)
            if self.side == "controlnet" and components.controlnet_is_fresh
            else []
        )
        self.trainables = Trainables(adapter, trainable, projections)
        self.params = self.trainables.parameters()
        for p in self.params:
            p.data = p.data.float()  # master weights in fp32 under mixed precision
        # Shrink the frozen weights only now, with the adapter attached, so its layers are skipped.
        precision.apply_frozen_precision(components, config, self.weight_dtype)
        self._prepare_frozen(trainable)
        self.trainable = trainable

    def _prepare_frozen(self, trainable: torch.nn.Module) -> None:
        """DDP's ignore list, the text encoders' place, gradient checkpointing, train mode."""
        components = self.components
        if self.accelerator.num_processes > 1:
            # DDP would broadcast every parameter at setup, and quantized frozen weights cannot
            # be; frozen weights are the same on every rank by construction
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                trainable, [n for n, p in trainable.named_parameters() if not p.requires_grad]
            )
        # text encoders parked only now: nf4 quantizes on the GPU
        self.text_encoders = TextEncoderPlacement(
            components.text_encoders, self.device, enabled=self.config.offload_text_encoders
        )
        self.text_encoders.park()
        if self.config.gradient_checkpointing:
            components.denoiser.enable_gradient_checkpointing()
            if components.controlnet is not None:
                components.controlnet.enable_gradient_checkpointing()
        trainable.train()

    def _setup_optimizer(self) -> None:
        """The optimizer, the schedule's length, the lr scheduler; then accelerate prepares."""
        config, accelerator = self.config, self.accelerator
        optimizer = _optimizer(config, self.params)
        adapter = self.trainables.adapter
        self.unsynced_params = (
            list(adapter.trainable_parameters())
            if adapter.kind == "lycoris" and accelerator.num_processes > 1
            else []
        )
        micro_per_epoch = max(1, len(self.sampler))
        # Accumulation runs on across epoch ends (there is no prepared dataloader to cut it), so
        # count in micro-batches: an optimizer step every `gradient_accumulation_steps` of them.
        accumulation = config.gradient_accumulation_steps
        self.max_steps = config.max_train_steps or max(
            1, config.num_train_epochs * micro_per_epoch // accumulation
        )
        self.num_epochs = math.ceil(self.max_steps * accumulation / micro_per_epoch)
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            # accelerate steps the scheduler once per process
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.max_steps * accelerator.num_processes,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )
        if any(p.requires_grad for p in self.trainable.parameters()):
            prepared, optimizer, lr_scheduler = accelerator.prepare(
                self.trainable, optimizer, lr_scheduler
            )
        else:
            # A LyCORIS network lives beside the model, not in it: DDP has nothing to sync (and
            # refuses such a module); its gradients are averaged by hand (unsynced_params).
            optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
            prepared = self.trainable
        self.prepared, self.optimizer, self.lr_scheduler = prepared, optimizer, lr_scheduler
        if config.use_ema:
            self.ema = SliderEMA(self.trainables, config.ema_decay, config.ema_update_interval)
        # Forward through the prepared module so that distributed gradient sync sees it.
        if self.side == "controlnet":
            self.components.controlnet = prepared
        else:
            self.components.denoiser = prepared

    def _setup_steps(self) -> None:
        """The two training steps, the encoded cache and the noise generator."""
        config, adapter = self.config, self.trainables.adapter
        max_strength = _max_strength(self.backends)
        self.step_fn = SliderStep(
            self.family,
            self.components,
            adapter,
            training_mode=config.training_mode,
            neutral_mode=config.slider_neutral_mode,
            max_strength=max_strength,
            conditioning_scale=config.controlnet_conditioning_scale,
        )
        self.text_step_fn = TextSliderStep(
            self.family,
            self.components,
            adapter,
            training_mode=config.training_mode,
            max_strength=max_strength,
            conditioning_scale=config.controlnet_conditioning_scale,
        )
        self.cache = EncodedCache(
            config.cache_path,
            self.family,
            self.components,
            device=self.device,
            text_encoders_onloaded=self.text_encoders.onloaded,
            folders={
                b.id: (b.latent_cache, b.text_cache)
                for b in self.backends
                if b.latent_cache or b.text_cache
            },
        )
        # Noise and timesteps come from a generator of their own, seeded per rank, so they are
        # reproducible and resumable whatever else draws random numbers.
        self.generator = torch.Generator().manual_seed(
            config.seed * 1000 + self.accelerator.process_index
        )

    def _resume(self) -> None:
        """Weights, optimizer, scheduler, this rank's RNG and the sampler's position."""
        accelerator = self.accelerator
        path = checkpoints.find_checkpoint(self.output_dir, self.config.resume_from_checkpoint)
        try:
            state = checkpoints.load_checkpoint(
                path,
                self.optimizer,
                self.lr_scheduler,
                self.generator,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
            )
            self.trainables.load_state_dict(state.weights)
            if self.ema is not None and state.ema is not None:
                self.ema.load_state_dict(*state.ema)
            elif self.ema is not None:
                log.warning(
                    "%s holds no EMA (the run had no use_ema): the EMA starts from the "
                    "resumed weights",
                    path,
                )
                self.ema = SliderEMA(
                    self.trainables, self.config.ema_decay, self.config.ema_update_interval
                )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ConfigError(
                f"cannot resume from {path}: {exc}. The checkpoint must be complete and come from "
                "a run with the same model, training_mode, lora_type, lora_rank and targets "
                "(slider_lora_target is true unless set: a run made with the ordinary targets "
                "resumes with slider_lora_target false)"
            ) from None
        self._check_settings(path, state.extra.get("settings"))
        if accelerator.scaler is not None and "scaler" in state.extra:
            accelerator.scaler.load_state_dict(state.extra["scaler"])
        self.sampler.load_state_dict(state.sampler)
        self.global_step, self.start_epoch = state.step, self.sampler.epoch
        if self.global_step >= self.max_steps:
            raise ConfigError(
                f"{path} is at step {self.global_step} and max_train_steps is {self.max_steps}: "
                "nothing left to train; raise max_train_steps (or num_train_epochs) to continue"
            )
        log.info("resumed from %s at step %d", path, self.global_step)

    def _settings(self) -> dict[str, Any]:
        """Settings whose defaults depend on the family, the model or the machine, as this run
        resolved them; a resumed run is checked against them (_check_settings)."""
        config = self.config
        return {
            "resolution": config.resolution,
            "mixed_precision": precision.autocast_precision(config),
            "slider_lora_target": config.slider_lora_target,
        }

    def _check_settings(self, path: Path, saved: dict[str, Any] | None) -> None:
        now = self._settings()
        changed = {k: (v, now[k]) for k, v in (saved or {}).items() if now.get(k) != v}
        if changed:
            log.warning(
                "resuming %s with other settings than it was trained with: %s; set them in the "
                "config to continue the run as it was",
                path,
                ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()),
            )

    # --- the loop ----------------------------------------------------------------------------

    def train(self) -> None:
        """Micro-batches, epoch after epoch, until max_steps optimizer steps are done."""
        self._open_logs()
        self.epoch = self.start_epoch
        self.boundary = self._boundary(self.start_epoch)
        try:
            self.interrupt.install()
            for epoch in range(self.start_epoch, self.num_epochs):
                self.epoch = epoch
                if self.global_step >= self.max_steps:
                    break
                self.sampler.set_epoch(epoch)
                # Pixels are read only for latents missing from the cache; the next batch's
                # files are read while this one trains (the boundary takes the position from
                # `plan`).
                for plan, step, inputs in self._micro_batches():
                    record = self.train_micro_batch(plan, step, inputs)
                    self.log_file.write(json.dumps(record) + "\n")
                    if not self.accelerator.sync_gradients:
                        continue  # accumulating
                    self.on_optimizer_step(plan, record)
                    if self.global_step >= self.max_steps:
                        break
        except ConfigError:
            # bad data found mid-run (e.g. an unreadable image): keep what was trained
            where = self.save_checkpoint()
            if where is None and self.global_step == 0:
                log.error("stopped before the first step: nothing trained, no checkpoint written")
            elif where is not None:
                log.error("stopped at step %d; checkpoint saved to %s", self.global_step, where)
            raise
        except KeyboardInterrupt:
            where = self.save_checkpoint()
            if where is not None:
                log.warning(
                    "interrupted at step %d; checkpoint saved to %s", self.global_step, where
                )
            raise
        finally:
            self._close_logs()

    def train_micro_batch(self, plan, step, inputs) -> dict[str, Any]:
        """One micro-batch: forward and backward (accumulated, under autocast), and once the
        accumulation is complete the optimizer step on averaged, checked, clipped gradients.
        Returns its train_log record."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.prepared), accelerator.autocast():
            result = step(inputs, self.generator, backward=accelerator.backward)
            if not torch.isfinite(result.loss):
                self.bad_batches.append(plan)
            if accelerator.sync_gradients:
                self._reduce_and_clip(plan, result)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        record = {
            "step": self.global_step + 1,
            "loss": result.loss.item(),
            "backend": plan.backend,
            "strength": result.strength,
            "sign": plan.sign,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "files": [str(f) for f in plan.files],
        }
        if plan.prompt is None and self.config.caption_dropout_probability:
            record["dropped_captions"] = self.dropped_captions
        if plan.prompt is not None:
            # a text slider's micro-batch: which entry, and the sampler steps to x_t
            record["prompts"] = f"{plan.prompt.entry}:{plan.prompt.kind}"
            record["denoising_steps"] = result.denoising_steps
        return record

    def _reduce_and_clip(self, plan, result) -> None:
        """Before the optimizer step: LyCORIS gradients averaged by hand, every gradient
        clipped; a non-finite norm stops the run with the last good state saved."""
        accelerator = self.accelerator
        for p in self.unsynced_params:
            # LyCORIS weights live outside the wrapped model: average them here.
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        # The norm of the averaged gradients is the same on every rank, so all ranks agree to
        # stop; a NaN from any rank or micro-batch shows up here.
        by_value = self.config.grad_clip_method == "value"
        limit = self.config.max_grad_norm or math.inf
        # (by value: the norm is measured, unclipped, then each element clamped)
        norm = accelerator.clip_grad_norm_(self.params, math.inf if by_value else limit)
        if by_value and self.config.max_grad_norm:
            torch.nn.utils.clip_grad_value_(self.params, limit)
        if norm is not None and not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.save_checkpoint()
            culprit = self.bad_batches[0] if self.bad_batches else plan
            raise TrainingError(
                f"non-finite loss or gradients at step {self.global_step + 1} (loss "
                f"{result.loss.item()} on this rank), backend '{culprit.backend}', "
                f"files {[str(f) for f in culprit.files]}; "
                + (
                    f"last good state saved to {where}"
                    if where is not None
                    else "nothing trained yet, no checkpoint written"
                )
            )
        self.bad_batches.clear()

    def on_optimizer_step(self, plan, record: dict[str, Any]) -> None:
        """After each optimizer step: count it, take the boundary state, stop here on an agreed
        Ctrl-C; then progress, trackers, a checkpoint and validation when they are due."""
        config, accelerator = self.config, self.accelerator
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.global_step)
        self.log_file.flush()
        self.boundary = self._boundary(self.epoch, after=plan)
        if self.interrupt.agreed(accelerator):
            raise KeyboardInterrupt
        self.progress.set_postfix(
            loss=f"{record['loss']:.4f}", sign=plan.sign, backend=plan.backend
        )
        self.progress.update(1)
        if config.report_to != "none":
            accelerator.log({"loss": record["loss"], "lr": record["lr"]}, step=self.global_step)
        if self.global_step % config.checkpointing_steps == 0 and self.global_step < self.max_steps:
            self.save_checkpoint()
        if (
            self.is_main
            and config.validation_steps
            and self.global_step % config.validation_steps == 0
        ):
            self.run_validation()

    def _boundary(self, epoch: int, after=None) -> dict[str, Any]:
        """What a checkpoint at this step boundary holds, taken now (a save may come later,
        mid-accumulation): the sampler's position, the noise generator, this rank's RNG."""
        return {
            "sampler": self.sampler.state_dict(after=after),
            "generator": self.generator.get_state(),
            "rng": checkpoints.rank_rng_state(self.generator),
            "epoch": epoch,
        }

    def _micro_batches(self):
        """(plan, step, inputs) of this epoch. Bad data (an unreadable image) on any rank stops
        every rank at the same micro-batch, so that all of them save and exit together instead
        of one waiting for the others forever."""
        loaded = prefetch_batches(self.sampler, pixels=False)
        while True:
            failure: BaseException | None = None
            item = None
            try:
                pair = next(loaded, None)
                if pair is not None:
                    item = (pair[0], *self._encode(*pair))
            except Exception as exc:  # noqa: BLE001 - agreed on below, then raised
                failure = exc
            self._agree_on(failure)
            if item is None:
                return
            yield item

    def _agree_on(self, failure: BaseException | None) -> None:
        """Every rank learns the worst outcome of this micro-batch on any rank, and all raise."""
        accelerator = self.accelerator
        # 0: fine, 1: bad data (all ranks save, then stop), 2: any other error (all stop)
        kind = 0 if failure is None else 1 if isinstance(failure, ConfigError) else 2
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(kind)], device=self.device)
            kind = int(accelerator.reduce(flag, reduction="max").item())
        if kind == 1:
            raise failure or ConfigError(
                f"rank {accelerator.process_index} stopped: another rank found bad data "
                "(its message names the file)"
            )
        if kind == 2:
            if failure is not None and not isinstance(failure, ConfigError):
                raise failure
            raise TrainingError(
                f"rank {accelerator.process_index} stopped: another rank failed"
                + (f"; here: {failure}" if failure is not None else "")
            )

    def _drop_captions(self, captions: list[str]) -> list[str]:
        """`caption_dropout_probability`: each caption of an image batch replaced by the empty
        caption with that probability, drawn from the run's noise generator (restored on
        resume: the micro-batch is encoded after the step boundary the checkpoint holds)."""
        p = self.config.caption_dropout_probability
        self.dropped_captions = 0
        if not p:
            return captions  # no draw: runs without dropout keep their noise sequence
        draws = torch.rand(len(captions), generator=self.generator)
        kept = [
            caption if draw >= p else ""
            for caption, draw in zip(captions, draws.tolist(), strict=True)
        ]
        self.dropped_captions = sum(1 for draw in draws.tolist() if draw < p)
        return kept

    def _encode(self, plan, batch):
        """The step and its inputs for one micro-batch (the cache reads images it lacks)."""
        dtype, cache = self.weight_dtype, self.cache
        pixels = batch.conditioning_pixels
        pixels = None if pixels is None else pixels.to(self.device, dtype)
        if plan.prompt is None:
            cond = cache.text(self._drop_captions(batch.captions), plan.backend)
            geometry = batch.geometry()  # each image's size and crop (SDXL conditions on it)
            if geometry is not None:
                cond["image_geometry"] = geometry.to(self.device)
            return self.step_fn, StepInputs(
                latents=cache.latents(batch).to(dtype),
                cond=_cast(cond, dtype),
                slider_strength=plan.slider_strength,
                sign=plan.sign,
                conditioning_pixels=pixels,
            )
        return self.text_step_fn, TextStepInputs(
            task=plan.prompt,
            cond=_cast(cache.text(_prompt_captions(plan), plan.backend), dtype),
            batch_size=len(plan.samples),
            resolution=plan.resolution,
            slider_strength=plan.slider_strength,
            conditioning_pixels=pixels,
        )

    # --- checkpoints, validation, logs -------------------------------------------------------

    def save_checkpoint(self, epoch: int | None = None) -> Path | None:
        """A checkpoint of the state at the last step boundary. Every rank calls it at the same
        step; the main one writes. Nothing at step 0 (no checkpoint-0 to block the rerun)."""
        if self.global_step == 0:
            return None
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        # each rank draws its own noise: every rank's generator and global RNG, as they were at
        # the step boundary, are saved
        rank_states = [self.boundary["rng"]]
        if accelerator.num_processes > 1:
            rank_states = gather_object(rank_states)
        if not self.is_main:
            return None
        return checkpoints.save_checkpoint(
            self.output_dir,
            step=self.global_step,
            epoch=self.boundary["epoch"] if epoch is None else epoch,
            weights=self.trainables.state_dict(),
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            sampler_state=self.boundary["sampler"],
            noise_generator=_generator_at(self.boundary["generator"]),
            extra={
                "settings": self._settings(),
                **({"scaler": accelerator.scaler.state_dict()} if accelerator.scaler else {}),
            },
            total_limit=self.config.checkpoints_total_limit,
            rank_states=rank_states,
            ema=None if self.ema is None else self.ema.state_dict(),
        )

    def run_validation(self) -> None:
        """Validation images at this step (main process), with the text encoders onloaded."""
        folder = self.output_dir / "validation" / f"step-{self.global_step:06d}"
        with self.text_encoders.onloaded():
            validate.run_validation(
                self.family,
                self.components,
                self.trainables.adapter,
                self.config,
                folder,
                prompts=self.validation_prompts,
                assistant=self.assistant,
            )
        log.info("validation images at step %d: %s", self.global_step, folder)

    def _open_logs(self) -> None:
        """train_log.jsonl (one per rank), the trackers and the progress bar."""
        config, accelerator = self.config, self.accelerator
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if config.report_to != "none":
                accelerator.init_trackers(
                    "slider-cn",
                    config={k: v for k, v in config.model_dump().items() if v is not None},
                )
        index = accelerator.process_index
        name = "train_log.jsonl" if self.is_main else f"train_log.rank{index}.jsonl"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.output_dir / name, "a", encoding="utf-8")  # noqa: SIM115
        self.progress = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            desc="train",
            disable=not self.is_main,
            dynamic_ncols=True,
        )

    def _close_logs(self) -> None:
        self.interrupt.uninstall()
        if self.progress is not None:
            self.progress.close()
        if self.log_file is not None:
            self.log_file.close()

    # --- the end -----------------------------------------------------------------------------

    def save(self) -> TrainResult:
        """The last checkpoint, then the final outputs (written by the main process)."""
        config, accelerator = self.config, self.accelerator
        self.save_checkpoint(epoch=self.epoch)
        self.text_encoders.enabled = (
            False  # a finished run hands back every component on the device
        )
        for encoder in self.components.text_encoders:
            encoder.to(self.device)
        accelerator.wait_for_everyone()
        files: dict[str, Path] = {}
        if self.is_main:
            files = outputs.write_final_outputs(
                self.output_dir,
                config=config,
                family=self.family,
                components=self.components,
                adapter=self.trainables.adapter,
                trainable=accelerator.unwrap_model(self.prepared),
                targets=self.targets,
                projection_names=self.trainables.projection_names,
                backends=self.backends,
                steps=self.global_step,
                ema=None if self.ema is None else self.ema.swapped_in,
            )
            log.info("slider written to %s", self.output_dir)
        if config.report_to != "none":
            accelerator.end_training()
        adapter = self.trainables.adapter
        return TrainResult(
            self.output_dir, self.global_step, self.family, self.components, adapter, files
        )

    def cleanup(self) -> None:
        """Whatever is still open when a run stops (logs, the Ctrl-C handler); safe to repeat."""
        self._close_logs()
        self.assistant = None


# --- helpers ---------------------------------------------------------------------------------


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    kwargs.update(config.optimizer_kwargs)  # `optimizer_config`
    try:
        if config.optimizer == "adamw_8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError(
                    "optimizer 'adamw_8bit' needs bitsandbytes: pip install bitsandbytes"
                ) from None
            return bnb.optim.AdamW8bit(params, **kwargs)
        if config.optimizer == "prodigy":
            try:
                from prodigyopt import Prodigy
            except ImportError:
                raise ConfigError(
                    "optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt"
                ) from None
            return Prodigy(params, **kwargs)
        fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
        kwargs.setdefault("fused", fused or None)
        return torch.optim.AdamW(params, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"optimizer_config {config.optimizer_config!r}: optimizer '{config.optimizer}' "
            f"does not take it ({exc})"
        ) from None


def _max_strength(backends) -> float:
    strengths = [abs(b.slider_strength) for b in backends if b.slider_strength]
    return max(strengths) if strengths else 1.0


def _cast(cond: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in cond.items()}


def _prompt_captions(plan) -> list[str]:
    """The prompts a text-slider micro-batch encodes: target, positive and negative rows for a
    pair (TextStepInputs' layout), or the plan's anchors."""
    task, size = plan.prompt, len(plan.samples)
    if task.kind == "pair":
        return [task.target] * size + [task.positive] * size + [task.negative] * size
    return plan.captions


def _generator_at(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state)
    return generator


class _DeferredInterrupt:
    """Ctrl-C during training: finish the current optimizer step, then save and stop.

    Raising KeyboardInterrupt wherever it lands could split a step (weights stepped, sampler
    not yet advanced) and write a checkpoint that does not match itself. The flag is agreed
    across ranks so that all of them stop at the same step. A second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step with a checkpoint (again to stop at once)")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def agreed(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
