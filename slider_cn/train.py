"""The training loop (accelerate), read top to bottom:

config -> data backends -> model components -> slider adapter on the trainable side ->
sampler -> for each micro-batch: encode (from cache), slider step, optimizer step ->
checkpoints -> final outputs.
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
from slider_cn.config import ConfigError, TrainConfig
from slider_cn.data.backends import training_backends
from slider_cn.data.cache import EncodedCache
from slider_cn.data.loading import prefetch_batches
from slider_cn.data.sampler import SliderSampler
from slider_cn.families import get_family
from slider_cn.offload import TextEncoderPlacement
from slider_cn.step import SliderStep, StepInputs
from slider_cn.targets import (
    controlnet_output_projections,
    resolve_targets,
)
from slider_cn.text_step import TextSliderStep, TextStepInputs

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


def _check_output_dir(config: TrainConfig) -> None:
    found = checkpoints.list_checkpoints(config.output_dir)
    if found and not config.resume_from_checkpoint:
        raise ConfigError(
            f"output_dir {config.output_dir} already holds checkpoints of a run ({found[-1].name}); "
            "pass --resume_from_checkpoint latest to continue it, or choose another output_dir"
        )


def check_conditioning(config: TrainConfig, backends) -> None:
    # Checked before any model is loaded: a ControlNet in the loop needs a conditioning image
    # for every training image.
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


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "optimizer 'adamw_8bit' needs bitsandbytes: pip install bitsandbytes"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def _max_strength(backends) -> float:
    strengths = [abs(b.slider_strength) for b in backends if b.slider_strength]
    return max(strengths) if strengths else 1.0


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
    if config.lora_type == "lycoris":
        read_lycoris_config(config.lycoris_config)
    precision.check_config(config)
    return validate.check_validation_config(config)


def train(config: TrainConfig) -> TrainResult:
    """Train a slider; return where its files are and the trained objects."""
    validation_prompts = preflight(config)  # fail before any work

    accelerator = Accelerator(
        # collectives wait up to an hour: the other ranks wait while the main one generates
        # inline conditioning (canny/depth over a whole dataset)
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=1))],
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
        # Without a GPU, say so: accelerate then starts gloo ranks under torchrun on CPU.
        cpu=not torch.cuda.is_available(),
    )
    output_dir = Path(config.output_dir)
    is_main = accelerator.is_main_process

    # --- data: validated before any model is loaded ---------------------------------------
    # Inline conditioning is generated by the main process; the others then find it cached.
    with accelerator.main_process_first():
        backends = training_backends(config, progress=is_main, world_size=accelerator.num_processes)
    check_conditioning(config, backends)
    sampler = SliderSampler(
        backends,
        batch_size=config.train_batch_size,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )

    # --- components and the adapter on the trainable side ---------------------------------
    family = get_family(config)
    components = family.load_components()
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        config.mixed_precision, torch.float32
    )
    for module in components.modules().values():
        # frozen weights in the autocast precision; the trainable ones go back to fp32 below
        module.to(device) if weight_dtype == torch.float32 else module.to(device, weight_dtype)

    side = "controlnet" if config.training_mode == "controlnet" else "denoiser"
    trainable = components.controlnet if side == "controlnet" else components.denoiser
    arch = family.name  # the targets registry maps family names to architectures
    targets = resolve_targets(
        trainable,
        arch,
        side=side,
        slider=config.slider_lora_target,
        exclude_shared_with=components.denoiser if side == "controlnet" else None,
    )
    assistant = None
    if config.assistant_lora_path:
        assistant = load_assistant_adapter(
            components.denoiser, config.assistant_lora_path, config.assistant_lora_strength
        )
    # Adapter initialisation draws from the global RNG: the same seed on every rank gives a
    # reproducible run and identical starting weights everywhere.
    set_seed(config.seed)
    adapter = attach_slider_adapter(trainable, targets.names, config)
    params = list(adapter.trainable_parameters())
    # A fresh ControlNet's output projections are zero: unless they learn, its residuals stay
    # zero and no gradient reaches the adapter (docs/design.md §8.1).
    projection_names: list[str] = []
    if side == "controlnet" and components.controlnet_is_fresh:
        projection_names = controlnet_output_projections(trainable, arch)
        modules = dict(trainable.named_modules())
        for name in projection_names:
            for p in modules[name].parameters():
                p.requires_grad_(True)
                params.append(p)
    for p in params:
        p.data = p.data.float()  # master weights in fp32 under mixed precision
    # Shrink the frozen weights only now, with the adapter attached, so its layers are skipped.
    precision.apply_frozen_precision(components, config, weight_dtype)
    if accelerator.num_processes > 1:
        # DDP would broadcast every parameter at setup, and quantized frozen weights cannot be;
        # frozen weights are the same on every rank by construction
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            trainable, [n for n, p in trainable.named_parameters() if not p.requires_grad]
        )
    # text encoders parked only now: nf4 quantizes on the GPU
    text_encoders = TextEncoderPlacement(
        components.text_encoders, device, enabled=config.offload_text_encoders
    )
    text_encoders.park()
    if config.gradient_checkpointing:
        components.denoiser.enable_gradient_checkpointing()
        if components.controlnet is not None:
            components.controlnet.enable_gradient_checkpointing()
    trainable.train()

    optimizer = _optimizer(config, params)
    unsynced_params = (
        list(adapter.trainable_parameters())
        if adapter.kind == "lycoris" and accelerator.num_processes > 1
        else []
    )
    micro_per_epoch = max(1, len(sampler))
    # Accumulation runs on across epoch ends (there is no prepared dataloader to cut it), so
    # count in micro-batches: an optimizer step every `gradient_accumulation_steps` of them.
    accumulation = config.gradient_accumulation_steps
    max_steps = config.max_train_steps or max(
        1, config.num_train_epochs * micro_per_epoch // accumulation
    )
    num_epochs = math.ceil(max_steps * accumulation / micro_per_epoch)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        # accelerate steps the scheduler once per process
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    if any(p.requires_grad for p in trainable.parameters()):
        prepared, optimizer, lr_scheduler = accelerator.prepare(trainable, optimizer, lr_scheduler)
    else:
        # A LyCORIS network lives beside the model, not in it: DDP has nothing to sync (and
        # refuses such a module); its gradients are averaged by hand below (unsynced_params).
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        prepared = trainable
    # Forward through the prepared module so that distributed gradient sync sees it.
    if side == "controlnet":
        components.controlnet = prepared
    else:
        components.denoiser = prepared

    step_fn = SliderStep(
        family,
        components,
        adapter,
        training_mode=config.training_mode,
        neutral_mode=config.slider_neutral_mode,
        max_strength=_max_strength(backends),
        conditioning_scale=config.controlnet_conditioning_scale,
    )
    text_step_fn = TextSliderStep(
        family,
        components,
        adapter,
        training_mode=config.training_mode,
        max_strength=_max_strength(backends),
        conditioning_scale=config.controlnet_conditioning_scale,
    )
    cache = EncodedCache(
        config.cache_path,
        family,
        components,
        device=device,
        text_encoders_onloaded=text_encoders.onloaded,
    )
    # Noise and timesteps come from a generator of their own, seeded per rank, so they are
    # reproducible and resumable whatever else draws random numbers.
    generator = torch.Generator().manual_seed(config.seed * 1000 + accelerator.process_index)

    def trainable_weights() -> dict[str, torch.Tensor]:
        weights = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
        unwrapped = accelerator.unwrap_model(prepared)
        modules = dict(unwrapped.named_modules())
        for name in projection_names:
            for pname, p in modules[name].named_parameters():
                weights[f"projection.{name}.{pname}"] = p
        return weights

    def load_trainable_weights(weights: dict[str, torch.Tensor]) -> None:
        adapter.load_state_dict(
            {k.removeprefix("adapter."): v for k, v in weights.items() if k.startswith("adapter.")}
        )
        modules = dict(accelerator.unwrap_model(prepared).named_modules())
        for name in projection_names:
            for pname, p in modules[name].named_parameters():
                p.data.copy_(weights[f"projection.{name}.{pname}"])

    global_step, start_epoch = 0, 0
    if config.resume_from_checkpoint:
        path = checkpoints.find_checkpoint(output_dir, config.resume_from_checkpoint)
        try:
            state = checkpoints.load_checkpoint(
                path,
                optimizer,
                lr_scheduler,
                generator,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
            )
            load_trainable_weights(state.weights)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ConfigError(
                f"cannot resume from {path}: {exc}. The checkpoint must be complete and come from "
                "a run with the same model, training_mode, lora_type, lora_rank and targets"
            ) from None
        if accelerator.scaler is not None and "scaler" in state.extra:
            accelerator.scaler.load_state_dict(state.extra["scaler"])
        sampler.load_state_dict(state.sampler)
        global_step, start_epoch = state.step, sampler.epoch
        if global_step >= max_steps:
            raise ConfigError(
                f"{path} is at step {global_step} and max_train_steps is {max_steps}: nothing "
                "left to train; raise max_train_steps (or num_train_epochs) to continue"
            )
        log.info("resumed from %s at step %d", path, global_step)

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if config.report_to != "none":
            accelerator.init_trackers(
                "slider-cn", config={k: v for k, v in config.model_dump().items() if v is not None}
            )
    log_name = "train_log.jsonl" if is_main else f"train_log.rank{accelerator.process_index}.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(output_dir / log_name, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally

    def save(step: int, epoch: int, boundary: dict[str, Any]) -> Path | None:
        """Every rank calls it at the same step; the main one writes. Nothing at step 0."""
        if step == 0:
            return None  # nothing trained: no checkpoint-0 to block the rerun
        accelerator.wait_for_everyone()
        # each rank draws its own noise: every rank's generator and global RNG, as they were at
        # the step boundary, are saved
        rank_states = [boundary["rng"]]
        if accelerator.num_processes > 1:
            rank_states = gather_object(rank_states)
        if not is_main:
            return None
        return checkpoints.save_checkpoint(
            output_dir,
            step=step,
            epoch=epoch,
            weights=trainable_weights(),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            sampler_state=boundary["sampler"],
            noise_generator=_generator_at(boundary["generator"]),
            extra={"scaler": accelerator.scaler.state_dict()} if accelerator.scaler else None,
            total_limit=config.checkpoints_total_limit,
            rank_states=rank_states,
        )

    def encoded(plan, batch):
        """The step and its inputs for one micro-batch (the cache reads images it lacks)."""
        conditioning_pixels = (
            None
            if batch.conditioning_pixels is None
            else batch.conditioning_pixels.to(device, weight_dtype)
        )
        if plan.prompt is None:
            return step_fn, StepInputs(
                latents=cache.latents(batch).to(weight_dtype),
                cond=_cast(cache.text(batch.captions), weight_dtype),
                slider_strength=plan.slider_strength,
                sign=plan.sign,
                conditioning_pixels=conditioning_pixels,
            )
        return text_step_fn, TextStepInputs(
            task=plan.prompt,
            cond=_cast(cache.text(_prompt_captions(plan)), weight_dtype),
            batch_size=len(plan.samples),
            resolution=plan.resolution,
            slider_strength=plan.slider_strength,
            conditioning_pixels=conditioning_pixels,
        )

    def micro_batches():
        """(plan, step, inputs) of this epoch. Bad data (an unreadable image) on any rank
        stops every rank at the same micro-batch, so that all of them save and exit together
        instead of one waiting for the others forever."""
        loaded = prefetch_batches(sampler, pixels=False)
        while True:
            failure: BaseException | None = None
            item = None
            try:
                pair = next(loaded, None)
                if pair is not None:
                    item = (pair[0], *encoded(*pair))
            except Exception as exc:  # noqa: BLE001 - agreed on below, then raised
                failure = exc
            # 0: fine, 1: bad data (all ranks save, then stop), 2: any other error (all stop)
            kind = 0 if failure is None else 1 if isinstance(failure, ConfigError) else 2
            if accelerator.num_processes > 1:
                flag = torch.tensor([float(kind)], device=device)
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
            if item is None:
                return
            yield item

    progress = tqdm(
        total=max_steps, initial=global_step, desc="train", disable=not is_main, dynamic_ncols=True
    )
    boundary = {
        "sampler": sampler.state_dict(),
        "generator": generator.get_state(),
        "rng": checkpoints.rank_rng_state(generator),
        "epoch": start_epoch,
    }
    epoch = start_epoch
    bad_batches: list = []  # micro-batches with a non-finite loss since the last step
    interrupt = _DeferredInterrupt()
    try:
        interrupt.install()
        for epoch in range(start_epoch, num_epochs):
            if global_step >= max_steps:
                break
            sampler.set_epoch(epoch)
            # Pixels are read only for latents missing from the cache; the next batch's files
            # are read while this one trains (checkpoints take the position from `plan`).
            for plan, run_step, inputs in micro_batches():
                with accelerator.accumulate(prepared), accelerator.autocast():
                    result = run_step(inputs, generator, backward=accelerator.backward)
                    if not torch.isfinite(result.loss):
                        bad_batches.append(plan)
                    if accelerator.sync_gradients:
                        if unsynced_params:
                            # LyCORIS weights live outside the wrapped model: average them here.
                            for p in unsynced_params:
                                if p.grad is not None:
                                    p.grad = accelerator.reduce(p.grad, reduction="mean")
                        # The norm of the averaged gradients is the same on every rank, so all
                        # ranks agree to stop; a NaN from any rank or micro-batch shows up here.
                        norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf)
                        if norm is not None and not torch.isfinite(norm):
                            optimizer.zero_grad(set_to_none=True)
                            where = save(global_step, boundary["epoch"], boundary)
                            culprit = bad_batches[0] if bad_batches else plan
                            raise TrainingError(
                                f"non-finite loss or gradients at step {global_step + 1} (loss "
                                f"{result.loss.item()} on this rank), backend '{culprit.backend}', "
                                f"files {[str(f) for f in culprit.files]}; "
                                + (
                                    f"last good state saved to {where}"
                                    if where is not None
                                    else "nothing trained yet, no checkpoint written"
                                )
                            )
                        bad_batches.clear()
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                record = {
                    "step": global_step + 1,
                    "loss": result.loss.item(),
                    "backend": plan.backend,
                    "strength": result.strength,
                    "sign": plan.sign,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "files": [str(f) for f in plan.files],
                }
                if plan.prompt is not None:
                    # a text slider's micro-batch: which entry, and the sampler steps to x_t
                    record["prompts"] = f"{plan.prompt.entry}:{plan.prompt.kind}"
                    record["denoising_steps"] = result.denoising_steps
                log_file.write(json.dumps(record) + "\n")
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                log_file.flush()
                boundary = {
                    "sampler": sampler.state_dict(after=plan),
                    "generator": generator.get_state(),
                    # taken here, not when a save runs (which may be mid-accumulation)
                    "rng": checkpoints.rank_rng_state(generator),
                    "epoch": epoch,
                }
                if interrupt.agreed(accelerator):
                    raise KeyboardInterrupt
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}", sign=plan.sign, backend=plan.backend
                )
                progress.update(1)
                if config.report_to != "none":
                    accelerator.log({"loss": record["loss"], "lr": record["lr"]}, step=global_step)
                if global_step % config.checkpointing_steps == 0 and global_step < max_steps:
                    save(global_step, epoch, boundary)
                if (
                    is_main
                    and config.validation_steps
                    and global_step % config.validation_steps == 0
                ):
                    folder = output_dir / "validation" / f"step-{global_step:06d}"
                    with text_encoders.onloaded():
                        validate.run_validation(
                            family,
                            components,
                            adapter,
                            config,
                            folder,
                            prompts=validation_prompts,
                            assistant=assistant,
                        )
                    log.info("validation images at step %d: %s", global_step, folder)
                if global_step >= max_steps:
                    break
    except ConfigError:
        # bad data found mid-run (e.g. an unreadable image): keep what was trained
        where = save(global_step, boundary["epoch"], boundary)
        if where is None and global_step == 0:
            log.error("stopped before the first step: nothing trained, no checkpoint written")
        elif where is not None:
            log.error("stopped at step %d; checkpoint saved to %s", global_step, where)
        raise
    except KeyboardInterrupt:
        where = save(global_step, boundary["epoch"], boundary)
        if where is not None:
            log.warning("interrupted at step %d; checkpoint saved to %s", global_step, where)
        raise
    finally:
        interrupt.uninstall()
        progress.close()
        log_file.close()

    save(global_step, epoch, boundary)
    text_encoders.enabled = False  # a finished run hands back every component on the device
    for encoder in components.text_encoders:
        encoder.to(device)
    accelerator.wait_for_everyone()
    files: dict[str, Path] = {}
    if is_main:
        files = outputs.write_final_outputs(
            output_dir,
            config=config,
            family=family,
            components=components,
            adapter=adapter,
            trainable=accelerator.unwrap_model(prepared),
            targets=targets,
            projection_names=projection_names,
            backends=backends,
            steps=global_step,
        )
        log.info("slider written to %s", output_dir)
    if config.report_to != "none":
        accelerator.end_training()
    del assistant
    return TrainResult(output_dir, global_step, family, components, adapter, files)


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
