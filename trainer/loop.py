"""The training loop, top to bottom.

Every random choice of micro-batch k (data order, flip, caption shuffle/dropout, latent sample, noise,
timestep, LoRA dropout) is drawn from generators seeded by (seed, k). So a run resumed at step s draws exactly
what the uninterrupted run drew from step s on: resuming once or twice ends at the same weights.
Data-parallel: process p of P takes micro-batch k = (step*accum + a)*P + p.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import data as ds
from trainer.checkpoint import (check_disk_space, list_checkpoints, load_checkpoint, prune_checkpoints,
                                save_checkpoint)
from trainer.conditioning import encode_text, sdxl_time_ids, unet_kwargs
from trainer.config import Config, save_config
from trainer.events import STOP_FILE, EventLog
from trainer.export import save_adapters, training_metadata
from trainer.io import atomic_write_text, seal_jsonl
from trainer.ema import ema_state, ema_weights, load_ema_state, make_ema, update_ema
from trainer.optimizers import build_optimizer, check_optimizer_available
from trainer.masks import batch_masks, make_masks
from trainer.model import attach_lora, check_qlora_available, load_base, lora_parameters
from trainer.variants import (DeltaLora, adalora_orth_loss, adalora_state, load_adalora_state,
                              measure_layer_importance, needs_conversion, probe_steps,
                              select_important)
from trainer.sampling import render_samples
from trainer.tracking import start_trackers, tracker_args
from trainer.validation import (load_validation_state, make_validator, split_validation, validation_due,
                                validation_state)


def resolve_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@torch.no_grad()
def encode_latent_dist(vae, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = vae.encode(image[None].to(vae.device, vae.dtype)).latent_dist
    return dist.mean[0].float(), dist.std[0].float()


def offload(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Move frozen modules whose outputs are cached off the GPU (nothing to do on the CPU)."""
    if device.type == "cuda" and modules:
        for module in modules:
            module.to("cpu")
        torch.cuda.empty_cache()


def onload(modules: list[torch.nn.Module], device: torch.device) -> None:
    for module in modules:
        module.to(device)


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


def report_step(events: EventLog, bar, step: int, total_steps: int, loss: torch.Tensor, lr: float,
                rate: float) -> None:
    """The `step` event and progress bar of a finished step. Raises if its loss is not finite."""
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss became {loss_value} at step {step}; lower the learning rate")
    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    events.emit("step", buffered=True, step=step, total=total_steps, loss=loss_value, lr=lr, it_s=round(rate, 3),
                eta_s=round((total_steps - step) / max(rate, 1e-9), 1), gpu_mem_gib=mem)


def train(cfg: Config, run_dir: Path, base=None) -> Path:
    """Train the LoRA described by `cfg` into `run_dir`; returns the final adapter path. Any failure is also
    recorded as a `failed` event (message + hint), so the UI shows why without parsing the log.
    `base`: an already loaded trainer.model.Base to train on instead of loading cfg.model (benchmarks)."""
    def failed(**fields) -> None:  # only into an existing run folder (e.g. QLoRA refused on CPU has no run yet)
        if os.environ.get("RANK", "0") == "0" and Path(run_dir).is_dir():
            EventLog(Path(run_dir) / "events.jsonl").emit("failed", **fields)

    try:
        return _train_variant(cfg, Path(run_dir), base)
    except torch.OutOfMemoryError as err:
        first = (str(err).strip().splitlines() or ["out of memory"])[0]
        message = f"out of memory: {first}"
        failed(reason=message, hint=oom_hint(cfg), cause="oom")
        raise OutOfMemory(f"{message}\n{oom_hint(cfg)}") from None
    except Exception as err:
        known = isinstance(err, (ValueError, FileNotFoundError))  # config/dataset/model/disk errors read alone
        failed(reason=str(err) if known else f"{type(err).__name__}: {err}", cause="error")
        raise


def _train_variant(cfg: Config, run_dir: Path, base=None) -> Path:
    if cfg.lora.variant == "qlora":
        check_qlora_available()  # refuse up front, before minutes of loading
    check_optimizer_available(cfg.train)
    if cfg.lora.variant != "loradrop":
        return _train(cfg, Path(run_dir), base=base)
    if base is not None:
        raise ValueError("loradrop trains twice (probe + run) and needs model.path, not a preloaded base")
    # LoRA-drop: a short probe run scores every layer by its adapter output ||s·BAx||², then the real run trains
    # LoRA only on the layers that carry `loradrop_threshold` of the total importance.
    selection = Path(run_dir) / "loradrop.json"
    if not selection.is_file():
        probe_cfg = cfg.model_copy(deep=True)
        probe_cfg.lora.variant = "lora"
        probe_cfg.train.steps = probe_steps(cfg.lora, cfg.train.steps)
        probe_cfg.train.epochs = probe_cfg.train.checkpoint_every = probe_cfg.train.save_every = 0
        probe_cfg.train.resume = None
        probe_cfg.sample.prompts = []
        importance = _train(probe_cfg, Path(run_dir) / "loradrop-probe", measure_importance=True)
        kept = select_important(importance, cfg.lora.loradrop_threshold)
        atomic_write_text(selection, json.dumps({"importance": importance, "kept": kept}, indent=1))
    kept = json.loads(selection.read_text())["kept"]
    unet_kept = [k.removeprefix("unet.") for k in kept if k.startswith("unet.")]
    # SDXL: one target list serves both text encoders, so it keeps what either of them needs
    te_kept = sorted({k.split(".", 1)[1] for k in kept if k.startswith(("text_encoder.", "text_encoder_2."))})
    lora = cfg.lora.model_copy(update={"unet_targets": unet_kept, "text_encoder_targets": te_kept,
                                       "train_unet": bool(unet_kept), "train_text_encoder": bool(te_kept)})
    return _train(cfg, Path(run_dir), lora=lora)


def use_fast_path(cfg: Config, measure_importance: bool = False) -> bool:
    # LoRA-drop's probe adds forward hooks after the models are prepared: a compiled graph would not run them.
    return not measure_importance and (cfg.train.fast == "on" or (cfg.train.fast == "auto" and torch.cuda.is_available()))


def _train(cfg: Config, run_dir: Path, lora=None, measure_importance: bool = False, base=None):
    """The loop. `lora` overrides cfg.lora for the model (LoRA-drop's selection) while cfg is what gets saved."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    fast = use_fast_path(cfg, measure_importance)
    # cpu=True without CUDA lets accelerate run data-parallel over gloo when launched with several processes.
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.train.mixed_precision),
                              gradient_accumulation_steps=cfg.train.grad_accum, cpu=not torch.cuda.is_available(),
                              **tracker_args(cfg, run_dir))
    main = accelerator.is_main_process
    events = EventLog(run_dir / "events.jsonl" if main else None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        seal_jsonl(run_dir / "events.jsonl")  # a line torn by kill -9 must not swallow this run's first event
        save_config(cfg, run_dir / "config.toml")
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request belongs to the run it stopped
        start_trackers(accelerator, cfg, events)  # TensorBoard follows the events (trainer/tracking.py)
    device, tc = accelerator.device, cfg.train
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    started_at = time.time()

    # --- data: scan, report problems by file, keep going with the rest
    items, problems = ds.scan_dataset(cfg.data)
    for problem in problems:
        events.emit("problem", path=str(problem.path), reason=problem.reason)
        if main:
            print(f"skipped/warning: {problem}")
    items, validation_items = split_validation(items, cfg, events)  # held-out images (trainer/validation.py)
    masks = make_masks(cfg, items, events)  # data.masked_loss (trainer/masks.py), None when off
    batches_per_epoch = len(ds.epoch_batches(items, tc.batch_size, tc.seed, 0))
    micro_per_step = tc.grad_accum * accelerator.num_processes
    total_steps = math.ceil(tc.epochs * batches_per_epoch / micro_per_step) if tc.epochs else tc.steps
    # Before minutes of loading: refuse when the run's files cannot fit (DiskSpaceError names both sizes).
    disk = check_disk_space(cfg, run_dir, total_steps) if main else {}
    test_oom_at = int(os.environ.get("STYLE_LORA_TEST_OOM_AT_STEP", "-1"))  # test-only: simulate an OOM

    # --- model: frozen base in weight_dtype, LoRA params in fp32
    lora = lora or cfg.lora
    base = base or load_base(cfg.model, quantize_bits=lora.qlora_bits if lora.variant == "qlora" else None)
    set_seed(tc.seed)  # LoRA init draws from the global generators: same seed, same starting adapter
    tuners = attach_lora(base, lora, total_steps)
    unet, vae, text_encoders = base.unet, base.vae, base.text_encoders()
    unet.to(device) if lora.variant == "qlora" else unet.to(device, dtype=weight_dtype)
    for text_encoder in text_encoders.values():
        text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32)  # fp32 VAE: SD's VAE overflows in fp16, and it runs once per image when cached
    trained = {name: m for name, m in (("unet", unet), *text_encoders.items()) if lora_parameters(m)}
    trains_text = any(name.startswith("text_encoder") for name in trained)
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in trained.keys() - {"unet"}:
            trained[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    lrs = {"unet": tc.lr_unet, "text_encoder": tc.lr_text_encoder, "text_encoder_2": tc.lr_text_encoder}
    optimizer = build_optimizer(tc, lora, [(m, lrs[n]) for n, m in trained.items()], fused=device.type == "cuda")
    delta = DeltaLora(trained, lora.deltalora_lambda, lora.deltalora_start) if lora.variant == "deltalora" else None
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                                 num_training_steps=total_steps)
    # Only trained modules go through prepare (DDP refuses modules without trainable parameters).
    prepared = accelerator.prepare(*trained.values(), optimizer)
    wrapped = dict(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]
    # What the loss calls: the prepared models (eager path), swapped for compiled ones on the fast path below.
    eager_fwd = {"unet": wrapped.get("unet", unet), **{n: wrapped.get(n, m) for n, m in text_encoders.items()}}
    fwd = dict(eager_fwd)

    ema = make_ema(tc, trained)  # EMA of the adapter weights (trainer/ema.py), None when off
    validator = make_validator(cfg, base, validation_items, device, weight_dtype, trains_text,
                               main and not measure_importance)

    # --- resume
    start_step = 0
    if tc.resume == "latest" and not list_checkpoints(run_dir):
        events.emit("resumed", step=0, checkpoint=None)  # killed before its first checkpoint: start over
    elif tc.resume:
        folder = list_checkpoints(run_dir)[-1] if tc.resume == "latest" else Path(tc.resume)
        if not (folder / "state.json").is_file():
            raise FileNotFoundError(f"train.resume: no checkpoint at {folder}")
        start_step, extra = load_checkpoint(folder, trained, optimizer, lr_scheduler)
        if delta:
            delta.load_state(extra)
        load_adalora_state(tuners, extra)
        load_ema_state(ema, extra)
        load_validation_state(validator, extra)
        events.emit("resumed", step=start_step, checkpoint=str(folder))

    # --- caches: VAE latents (both orientations when flipping) and text embeddings when the TE is frozen
    latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
    if tc.cache_latents:
        for i, item in enumerate(tqdm(items, desc="caching latents", disable=not main)):
            for flip in ((False, True) if cfg.data.flip else (False,)):
                latent_cache[i, flip] = encode_latent_dist(vae, ds.load_image(item.path, item.bucket, flip))
    text_cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if tc.cache_text_embeddings and not trains_text and ds.caption_is_static(cfg.data):
        with torch.no_grad():
            for i, item in enumerate(items):
                caption = ds.build_caption(item.caption, cfg.data, random.Random(0))
                hidden, pooled = encode_text(base, text_encoders, [caption], device)
                text_cache[i] = hidden[0], None if pooled is None else pooled[0]
    # Frozen parts whose every output is now cached leave the GPU until a sample needs them (SDXL's two text
    # encoders are 1.6 GB in bf16, the VAE 0.3 GB in fp32), as kohya's cached text-encoder outputs do.
    idle = [vae] * bool(tc.cache_latents) + list(text_encoders.values()) * bool(text_cache)
    offload(idle, device)

    epoch_cache: dict[int, list[list[int]]] = {}

    def batch_at(k: int) -> list[int]:
        epoch = k // batches_per_epoch
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = ds.epoch_batches(items, tc.batch_size, tc.seed, epoch)
        return epoch_cache[epoch][k % batches_per_epoch]

    scheduler = base.noise_scheduler
    num_timesteps = scheduler.config.num_train_timesteps

    def micro_batch_loss(k: int) -> torch.Tensor:
        if k == test_oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. (simulated by STYLE_LORA_TEST_OOM_AT_STEP)")
        rng = random.Random(f"{tc.seed}-{k}")
        # noise and timesteps: drawn on the GPU when there is one (no host RNG + copy per step), else on the CPU
        gen = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(tc.seed * 1_000_003 + k)
        torch.manual_seed(tc.seed + k)  # LoRA dropout draws from the global generator
        indices = batch_at(k)
        flips = [cfg.data.flip and rng.random() < 0.5 for _ in indices]
        captions = [ds.build_caption(items[i].caption, cfg.data, rng) for i in indices]
        means, stds = [], []
        for i, flip in zip(indices, flips):
            if (i, flip) in latent_cache:
                mean, std = latent_cache[i, flip]
            else:
                mean, std = encode_latent_dist(vae, ds.load_image(items[i].path, items[i].bucket, flip))
            means.append(mean)
            stds.append(std)
        mean, std = torch.stack(means), torch.stack(stds)
        def randn(shape) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=gen.device).to(device)

        latents = (mean.to(device) + std.to(device) * randn(mean.shape)) * vae.config.scaling_factor
        noise = randn(latents.shape)
        if tc.noise_offset:
            noise += tc.noise_offset * randn((latents.shape[0], latents.shape[1], 1, 1))
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=gen, device=gen.device).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
        if text_cache:
            hidden = torch.stack([text_cache[i][0] for i in indices])
            pooled = None if base.kind != "sdxl" else torch.stack([text_cache[i][1] for i in indices])
        else:
            # grad only when training the TE, and never inside a no_grad caller (LoRA-drop's importance pass)
            with torch.set_grad_enabled(trains_text and torch.is_grad_enabled()):
                hidden, pooled = encode_text(base, {n: fwd[n] for n in text_encoders}, captions, device)
        time_ids = None
        if base.kind == "sdxl":
            time_ids = torch.stack([sdxl_time_ids(items[i].size, items[i].bucket, f) for i, f in zip(indices, flips)])
        pred = fwd["unet"](noisy, timesteps, hidden.to(weight_dtype), **unet_kwargs(pooled, time_ids, weight_dtype)).sample.float()
        target = noise if base.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        weight_map = batch_masks(masks, indices, flips, pred)  # masked loss: 0 where the mask is 0; else 1.0
        loss = (F.mse_loss(pred, target.float(), reduction="none") * weight_map).mean(dim=(1, 2, 3))
        if tc.min_snr_gamma:
            snr = compute_snr(scheduler, timesteps)
            weight = snr.clamp(max=tc.min_snr_gamma) / (snr + 1 if base.prediction_type == "v_prediction" else snr)
            loss = loss * weight
        loss = loss.mean()
        for name in tuners:  # AdaLoRA keeps P and Q near-orthogonal, as in the paper
            loss = loss + lora.adalora_orth_reg * adalora_orth_loss(trained[name])
        return loss

    def save_adapter(step: int, final: bool, best: bool = False) -> list[Path]:
        samples = sorted((run_dir / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
        with ema_weights(ema):
            paths = save_adapters(run_dir, cfg, trained,
                                  training_metadata(cfg, base.kind, step, len(items), started_at, base.prediction_type),
                                  base_kind=base.kind,
                                  tag_frequency=ds.tag_frequency(items), cover_png=samples[-1].read_bytes() if samples else None,
                                  step=None if final else step, delta=delta, convert=needs_conversion(lora),
                                  best=best)
        events.emit("adapter", step=step, paths=[str(p) for p in paths], final=final)
        return list(paths)

    def sample(step: int) -> None:
        if cfg.sample.prompts and main:
            # the original modules: a compiled graph would recompile for the sampler's shapes
            onload(idle, device)
            with ema_weights(ema):
                paths = render_samples(base, unet, text_encoders, cfg, step, run_dir / "samples", weight_dtype)
            offload(idle, device)
            events.emit("samples", step=step, paths=[str(p) for p in paths])

    def checkpoint(step: int) -> None:
        if main:
            folder = save_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}", step,
                                     trained, optimizer,
                                     lr_scheduler, extra={**(delta.state() if delta else {}),
                                                          **adalora_state(tuners), **ema_state(ema),
                                                          **validation_state(validator)})
            prune_checkpoints(run_dir, tc.keep_checkpoints)
            events.emit("checkpoint", step=step, path=str(folder))
        accelerator.wait_for_everyone()

    params = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    events.emit("start", total_steps=total_steps, start_step=start_step, images=len(items), trainable_params=trainable,
                variant=lora.variant, fast_path=fast, base_kind=base.kind, prediction_type=base.prediction_type,
                problems=len(problems), device=str(device), precision=accelerator.mixed_precision,
                processes=accelerator.num_processes, run_dir=str(run_dir),
                disk_needed_bytes=disk.get("needed_bytes"), disk_free_bytes=disk.get("free_bytes"),
                lora_params_estimate=disk.get("lora_params"))
    for m in wrapped.values():
        m.train()
    if fast:  # compile, then check one micro-batch against the eager path before trusting it (trainer/fast_path.py)
        from trainer import fast_path

        first_k = start_step * micro_per_step + accelerator.process_index
        compiled = fast_path.compile_models(eager_fwd, set(trained), device)

        def backward_with(models: dict) -> None:
            fwd.update(models)
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            accelerator.backward(micro_batch_loss(first_k))

        try:
            error, seconds = fast_path.gradient_error(params, lambda: backward_with(eager_fwd),
                                                      lambda: backward_with(compiled))
            reason = f"compiled gradients differ from the eager path by {error:.1%}"
        except Exception as err:  # a compiler failure must not end the run: it trains on the eager path
            error, seconds, reason = float("inf"), 0.0, f"compiling failed: {type(err).__name__}: {str(err)[:300]}"
            optimizer.zero_grad(set_to_none=True)
        error = accelerator.reduce(torch.tensor(error, device=device), reduction="mean").item()
        fast = error <= fast_path.MAX_GRAD_ERROR
        fwd.update(compiled if fast else eager_fwd)
        events.emit("fast_path", enabled=fast, grad_error=round(error, 6) if math.isfinite(error) else None,
                    compile_s=round(seconds, 1), backend=fast_path.backend(),
                    reason=None if fast else f"{reason}: training on the eager path")
    bar = tqdm(total=total_steps, initial=start_step, desc="training", disable=not main, dynamic_ncols=True)
    step, stopped, tick, unread = start_step, False, time.time(), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # step events report the training peak, not the VAE caching before it
    while step < total_steps:
        loss_sum = 0.0
        if delta:
            delta.begin_step(step)
        for a in range(tc.grad_accum):
            k = (step * tc.grad_accum + a) * accelerator.num_processes + accelerator.process_index
            with accelerator.accumulate(*wrapped.values()):
                if fast and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
                loss = micro_batch_loss(k)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    for tuner in tuners.values():  # AdaLoRA: sensitivity update and rank masking, before zero_grad
                        tuner.update_and_allocate(step)
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
        lr_scheduler.step()
        update_ema(ema)
        step += 1
        now = time.time()
        rate, tick = 1.0 / max(now - tick, 1e-9), now
        bar.update(1)
        # The loss is read one step late: reading this step's (.item()) would make the CPU wait until the GPU
        # finished it, so the GPU would idle while the next step is prepared.
        if unread:
            report_step(events, bar, *unread)
        unread = (step, total_steps, accelerator.reduce(loss_sum / tc.grad_accum, reduction="mean"),
                  lr_scheduler.get_last_lr()[0], rate)
        stopped = (run_dir / STOP_FILE).exists()
        if step == total_steps or stopped or any(every and step % every == 0 for every in
                                                 (tc.checkpoint_every, tc.save_every, cfg.sample.every,
                                                  tc.validation_every)):
            report_step(events, bar, *unread)  # before the files and events of this step
            unread = None
        if validation_due(cfg, step, total_steps, validator):
            validator.run(step, unet, text_encoders, events, ema, lambda: save_adapter(step, final=False, best=True))
        if step == total_steps or stopped:
            break
        if tc.checkpoint_every and step % tc.checkpoint_every == 0:
            checkpoint(step)
        if tc.save_every and step % tc.save_every == 0 and main:
            save_adapter(step, final=False)
        if cfg.sample.every and step % cfg.sample.every == 0:
            sample(step)
    bar.close()
    onload(idle, device)  # the caller's Base is whole again (samples, reports and benchmarks use it after)
    if measure_importance:
        return measure_layer_importance(trained, micro_batch_loss, first_k=step * micro_per_step,
                                        batches=max(1, batches_per_epoch // accelerator.num_processes))

    # --- end (finished or stopped): resumable checkpoint, samples, final adapter
    if stopped or tc.checkpoint_every:
        checkpoint(step)
    sample(step)
    final = run_dir / f"{cfg.output.name}.diffusers.safetensors"
    if main:
        paths = save_adapter(step, final=True)
        events.emit("stopped" if stopped else "done", step=step, paths=[str(p) for p in paths],
                    seconds=round(time.time() - started_at, 1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final
