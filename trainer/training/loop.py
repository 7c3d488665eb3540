"""The training loop, top to bottom: `train` -> `_train` = prepare (trainer/training/run.py) -> `fit` (the steps) -> `finish`.

A micro-batch and its loss are trainer/training/batch.py's; every random choice of micro-batch k is seeded by (seed, k), so a
run resumed at step s draws exactly what the uninterrupted run drew from step s on.
Data-parallel: process p of P takes micro-batch k = (step*accum + a)*P + p.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from trainer.training import fast_path
from trainer.data import dataset as ds
from trainer.training.batch import diffusion_loss, make_batch
from trainer.training.checkpoint import prune_checkpoints, save_checkpoint
from trainer.config import Config, LoraConfig
from trainer.events import ADAPTER, CHECKPOINT, DONE, FAILED, FAST_PATH, SAMPLES, START, STEP, STOP_FILE, STOPPED, \
    WARNING, EventLog
from trainer.lora_files.export import export_budget, save_adapters, training_metadata
from trainer.training.ema import ema_state, ema_weights, update_ema
from trainer.io import describe_os_error
from trainer.families.loading import check_qlora_available, load_base
from trainer.training.optimizers import check_optimizer_available
from trainer.training.run import Run, attach_models, fill_caches, offload, onload, open_run, resume
from trainer.training.sampling import render_samples
from trainer.training.validation import validation_state, validation_due
from trainer.adapters.blocks import check_blocks_before_loading
from trainer.adapters.variants import adalora_state, measure_layer_importance, needs_conversion, run_loradrop


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message says what to lower."""


def oom_hint(cfg: Config) -> str:
    tips = [f"lower train.batch_size (now {cfg.train.batch_size})" if cfg.train.batch_size > 1 else "",
            f"lower data.resolution (now {cfg.data.resolution})",
            "" if cfg.train.gradient_checkpointing else "turn on train.gradient_checkpointing",
            "" if cfg.train.cache_latents else "turn on train.cache_latents",
            "use train.mixed_precision bf16/fp16" if cfg.train.mixed_precision == "no" else "",
            "use lora.variant lorafa or a lower lora.rank"]
    return "Hint: " + "; ".join(t for t in tips if t) + "."


def train(cfg: Config, run_dir: Path, base=None) -> Path:
    """Train the LoRA described by `cfg` into `run_dir`; returns the final adapter path. Any failure is also
    recorded as a `failed` event (message + hint), so the UI shows why without parsing the log.
    `base`: an already loaded trainer.families.loading.Base to train on instead of loading cfg.model (benchmarks)."""
    def failed(**fields) -> None:  # only into an existing run folder (e.g. QLoRA refused on CPU has no run yet)
        if os.environ.get("RANK", "0") == "0" and Path(run_dir).is_dir():
            try:
                EventLog(Path(run_dir) / "events.jsonl").emit(FAILED, **fields)
            except OSError:  # a full disk: the CLI still reports the first error, not this one
                pass

    try:
        if cfg.lora.variant == "qlora":
            check_qlora_available()  # refuse up front, before minutes of loading
        check_optimizer_available(cfg.train)
        if base is None:
            check_blocks_before_loading(cfg.model.path, cfg.lora)  # lora.blocks names, from the folder's configs
        if cfg.lora.variant == "loradrop":
            if base is not None:
                raise ValueError("loradrop trains twice (probe + run) and needs model.path, not a preloaded base")
            return run_loradrop(cfg, Path(run_dir), _train, probe_layer_importance)
        return _train(cfg, Path(run_dir), base=base)
    except torch.OutOfMemoryError as err:
        first = (str(err).strip().splitlines() or ["out of memory"])[0]
        message = f"out of memory: {first}"
        failed(reason=message, hint=oom_hint(cfg), cause="oom")
        raise OutOfMemory(f"{message}\n{oom_hint(cfg)}") from None
    except Exception as err:
        known = isinstance(err, (ValueError, FileNotFoundError, FloatingPointError))  # written for users
        reason = describe_os_error(err) if isinstance(err, OSError) and err.errno is not None else \
            str(err) if known else f"{type(err).__name__}: {err}"
        failed(reason=reason, cause="error")
        raise


def use_fast_path(cfg: Config, measure_importance: bool = False) -> bool:
    # LoRA-drop's probe adds forward hooks after the models are prepared: a compiled graph would not run them.
    return not measure_importance and (cfg.train.fast == "on" or (cfg.train.fast == "auto" and torch.cuda.is_available()))


def _train(cfg: Config, run_dir: Path, lora: LoraConfig | None = None, base=None) -> Path:
    """One run. `lora` overrides cfg.lora for the model (LoRA-drop's selection) while cfg is what gets saved."""
    run = prepare(cfg, run_dir, lora or cfg.lora, base, fast=use_fast_path(cfg))
    step, stopped = fit(run)
    return finish(run, step, stopped)


def probe_layer_importance(cfg: Config, run_dir: Path) -> dict[str, float]:
    """LoRA-drop's probe: a short plain-LoRA run, then each layer's importance over one epoch of micro-batches."""
    run = prepare(cfg, run_dir, cfg.lora, None, fast=use_fast_path(cfg, measure_importance=True), probe=True)
    step, _ = fit(run)
    return measure_layer_importance(run.trained, lambda k: diffusion_loss(run, run.models, make_batch(run, k)),
                                    first_k=step * run.micro_per_step,
                                    batches=max(1, run.batches_per_epoch // run.accelerator.num_processes))


def prepare(cfg: Config, run_dir: Path, lora: LoraConfig, base, fast: bool, probe: bool = False) -> Run:
    run = open_run(cfg, Path(run_dir), lora)
    base = base or load_base(cfg.model, quantize_bits=lora.qlora_bits if lora.variant == "qlora" else None)
    attach_models(run, base, probe)
    resume(run)
    fill_caches(run)
    run.fast = fast
    run.events.emit(START, total_steps=run.total_steps, start_step=run.start_step, images=len(run.items),
                    trainable_params=sum(p.numel() for p in run.params if p.requires_grad), variant=lora.variant,
                    fast_path=fast, base_kind=base.kind, base_label=base.family.label(base.unet.config),
                    prediction_type=base.prediction_type,
                    problems=len(run.problems), device=str(run.device), precision=run.accelerator.mixed_precision,
                    processes=run.accelerator.num_processes, run_dir=str(run.run_dir),
                    disk_needed_bytes=run.disk.get("needed_bytes"), disk_free_bytes=run.disk.get("free_bytes"),
                    lora_params_estimate=run.disk.get("lora_params"))
    return run


def enable_fast_path(run: Run) -> None:
    """Compile the trained models and check one micro-batch against the eager path (trainer/training/fast_path.py)."""
    first_k = run.start_step * run.micro_per_step + run.accelerator.process_index
    run.models, check = fast_path.enable(
        run.models, set(run.trained), run.params, run.device,
        backward=lambda models: run.accelerator.backward(diffusion_loss(run, models, make_batch(run, first_k))),
        mean_over_processes=lambda x: run.accelerator.reduce(torch.tensor(x, device=run.device), "mean").item(),
        optimizer=run.optimizer)
    run.fast = check["enabled"]
    run.events.emit(FAST_PATH, **check)


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over train.grad_accum micro-batches; returns their mean loss (on the device, unread)."""
    tc, accelerator = run.cfg.train, run.accelerator
    loss_sum = 0.0
    if run.delta:
        run.delta.begin_step(step)
    for a in range(tc.grad_accum):
        k = (step * tc.grad_accum + a) * accelerator.num_processes + accelerator.process_index
        with accelerator.accumulate(*run.wrapped.values()):
            if run.fast and run.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
            loss = diffusion_loss(run, run.models, make_batch(run, k))
            accelerator.backward(loss)
            if accelerator.sync_gradients and tc.max_grad_norm:
                accelerator.clip_grad_norm_(run.params, tc.max_grad_norm)
            run.optimizer.step()
            if accelerator.sync_gradients:
                for tuner in run.tuners.values():  # AdaLoRA: sensitivity update and rank masking, before zero_grad
                    tuner.update_and_allocate(step)
            run.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
    run.lr_scheduler.step()
    update_ema(run.ema)
    return loss_sum / tc.grad_accum


def fit(run: Run) -> tuple[int, bool]:
    """The steps, with checkpoints, adapters and samples on their schedules. Returns (last step, stopped early)."""
    from tqdm.auto import tqdm

    cfg, tc = run.cfg, run.cfg.train
    for m in run.wrapped.values():
        m.train()
    if run.fast:
        enable_fast_path(run)
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="training", disable=not run.main, dynamic_ncols=True)
    step, stopped, tick, unread = run.start_step, False, time.time(), None
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # step events report the training peak, not the VAE caching before it
    while step < run.total_steps:
        loss = train_step(run, step)
        step += 1
        now = time.time()
        rate, tick = 1.0 / max(now - tick, 1e-9), now
        bar.update(1)
        # The loss is read one step late: reading this step's (.item()) would make the CPU wait until the GPU
        # finished it, so the GPU would idle while the next step is prepared.
        if unread:
            report_step(run.events, bar, *unread)
        unread = (step, run.total_steps, run.accelerator.reduce(loss, reduction="mean"),
                  run.lr_scheduler.get_last_lr()[0], rate)
        stopped = (run.run_dir / STOP_FILE).exists()
        ckpt_due, save_due, sample_due, check_due = (is_due(step, every) for every in
                                                     (tc.checkpoint_every, tc.save_every, cfg.sample.every,
                                                      tc.validation_every))
        if step == run.total_steps or stopped or ckpt_due or save_due or sample_due or check_due:
            report_step(run.events, bar, *unread)  # before the files and events of this step
            unread = None
        if validation_due(cfg, step, run.total_steps, run.validator):
            run.validator.run(step, run.base.unet, run.base.text_encoders(), run.events, run.ema,
                              lambda: save_adapter(run, step, final=False, best=True))
        if step == run.total_steps or stopped:
            break
        if ckpt_due:
            checkpoint(run, step)
        if save_due and run.main:
            save_adapter(run, step, final=False)
        if sample_due:
            sample(run, step)
    bar.close()
    onload(run.idle, run.device)  # the caller's Base is whole again (samples, reports and benchmarks use it after)
    run.idle = []  # and stays so: the final samples need no moves
    return step, stopped


def is_due(step: int, every: int) -> bool:
    """A schedule of `every` steps (0: never) falls on `step`."""
    return bool(every) and step % every == 0


def finish(run: Run, step: int, stopped: bool) -> Path:
    """The end (finished or stopped): the adapter comes first (checkpoint, final adapter), then what is optional
    (the final samples; the style report runs after `done`). An optional step that fails is a warning."""
    cfg = run.cfg
    if stopped or cfg.train.checkpoint_every:
        checkpoint(run, step)
    final = run.run_dir / f"{cfg.output.name}.diffusers.safetensors"
    paths = save_adapter(run, step, final=True) if run.main else []
    if optional_step(run.events, "final samples", step, lambda: sample(run, step)) and run.main and cfg.sample.prompts:
        optional_step(run.events, "cover image", step, lambda: save_adapter(run, step, final=True))  # new cover
    if run.main:
        run.events.emit(STOPPED if stopped else DONE, step=step, paths=[str(p) for p in paths],
                        seconds=round(time.time() - run.started_at, 1))
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return final


def report_step(events: EventLog, bar, step: int, total_steps: int, loss: torch.Tensor, lr: float,
                rate: float) -> None:
    """The `step` event and progress bar of a finished step. Raises if its loss is not finite."""
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss became {loss_value} at step {step}; lower the learning rate")
    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    events.emit(STEP, buffered=True, step=step, total=total_steps, loss=loss_value, lr=lr, it_s=round(rate, 3),
                eta_s=round((total_steps - step) / max(rate, 1e-9), 1), gpu_mem_gib=mem)


def optional_step(events: EventLog, what: str, step: int, run) -> bool:
    """Run an optional end-of-run step (samples, ...) after the adapter is saved. False when it failed, which is
    recorded as a `warning` event: the run still ends `done` with its files."""
    try:
        run()
        return True
    except Exception as err:
        reason = describe_os_error(err) if isinstance(err, OSError) else (
            str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")
        events.emit(WARNING, step=step, what=what, reason=f"{what} failed (the adapter is saved): {reason}")
        print(f"warning: {what} failed (the adapter is saved): {reason}")
        return False


def save_adapter(run: Run, step: int, final: bool, best: bool = False) -> list[Path]:
    """Both adapter files (kohya/A1111 and diffusers layouts) of the weights as they are at `step` (the EMA weights
    with train.ema); `best`: the lowest validation loss so far (train.keep_best)."""
    samples = sorted((run.run_dir / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
    base, cfg = run.base, run.cfg
    with ema_weights(run.ema):
        paths = save_adapters(run.run_dir, cfg, run.trained,
                              training_metadata(cfg, base.kind, step, len(run.items), run.started_at,
                                                base.prediction_type, base.unet.config),
                              base_kind=base.kind, tag_frequency=ds.tag_frequency(run.items),
                              cover_png=samples[-1].read_bytes() if samples else None,
                              step=None if final else step, delta=run.delta, convert=needs_conversion(run.lora),
                              best=best, budget_s=export_budget(run.started_at),  # never longer than the training
                              warn=lambda text: run.events.emit(WARNING, step=step, what="export", reason=text))
    run.events.emit(ADAPTER, step=step, paths=[str(p) for p in paths], final=final)
    return list(paths)


def sample(run: Run, step: int) -> None:
    if run.cfg.sample.prompts and run.main:
        # the original modules: a compiled graph would recompile for the sampler's shapes
        onload(run.idle, run.device)
        with ema_weights(run.ema):
            paths = render_samples(run.base, run.base.unet, run.base.text_encoders(), run.cfg, step,
                                   run.run_dir / "samples", run.weight_dtype)
        offload(run.idle, run.device)
        run.events.emit(SAMPLES, step=step, paths=[str(p) for p in paths])


def checkpoint(run: Run, step: int) -> None:
    if run.main:
        extra = {**(run.delta.state() if run.delta else {}), **adalora_state(run.tuners), **ema_state(run.ema),
                 **validation_state(run.validator)}
        folder = save_checkpoint(run.run_dir / "checkpoints" / f"step-{step:06d}", step, run.trained, run.optimizer,
                                 run.lr_scheduler, extra=extra)
        prune_checkpoints(run.run_dir, run.cfg.train.keep_checkpoints)
        run.events.emit(CHECKPOINT, step=step, path=str(folder))
    run.accelerator.wait_for_everyone()
