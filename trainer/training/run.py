"""What one training run holds (`Run`) and the set-up steps that fill it, in the order trainer.training.loop calls them:
open_run (accelerator, run folder, dataset) -> attach_models (LoRA, optimizer, accelerate) -> resume -> fill_caches.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.data import dataset as ds
from trainer.data.images import load_image
from trainer.training.batch import encode_latent_dist
from trainer.training.checkpoint import check_disk_space, resume_from
from trainer.config import Config, LoraConfig, save_config
from trainer.data.summary import format_summary, summarize as summarize_dataset
from trainer.events import DATASET, PROBLEM, RESUMED, STOP_FILE, EventLog
from trainer.io import seal_jsonl
from trainer.adapters.attach import attach_lora, lora_parameters
from trainer.training.ema import load_ema_state, make_ema
from trainer.data.masks import make_masks
from trainer.training.optimizers import build_optimizer
from trainer.training.tracking import start_trackers, tracker_args
from trainer.training.validation import load_validation_state, make_validator, split_validation
from trainer.adapters.variants import DeltaLora, load_adalora_state


@dataclass
class Run:
    cfg: Config  # what is saved with the run
    lora: LoraConfig  # what the model gets: cfg.lora, or LoRA-drop's selection of layers
    run_dir: Path
    accelerator: Any
    events: EventLog
    items: list  # trainer.data.dataset.Item, style images then regularisation images
    problems: list
    batches_per_epoch: int
    total_steps: int
    disk: dict  # check_disk_space's estimate (main process only)
    started_at: float
    base: Any = None  # trainer.families.loading.Base
    trained: dict = field(default_factory=dict)  # "unet"|"transformer"/"text_encoder"(_2) -> module with LoRA parameters
    wrapped: dict = field(default_factory=dict)  # the same, as accelerate prepared them (DDP on several GPUs)
    models: dict = field(default_factory=dict)  # what the loss calls: prepared (eager) or compiled modules
    optimizer: Any = None
    lr_scheduler: Any = None
    params: list = field(default_factory=list)
    tuners: dict = field(default_factory=dict)  # AdaLoRA's peft tuners, which need a call per step
    delta: DeltaLora | None = None
    ema: Any = None  # EMA of the adapter weights (trainer/training/ema.py), None when train.ema is off
    validator: Any = None  # the held-out validation loss (trainer/training/validation.py), None without held-out images
    validation_items: list = field(default_factory=list)
    masks: Any = None  # data.masked_loss's per-image masks (trainer/data/masks.py), None when off
    latent_cache: dict = field(default_factory=dict)  # (item, flipped) -> (mean, std) of the VAE's latent
    text_cache: dict = field(default_factory=dict)  # item -> (hidden, pooled) when the text encoder is frozen
    idle: list = field(default_factory=list)  # frozen modules waiting on the CPU while their outputs are cached
    epoch_order: dict = field(default_factory=dict)  # epoch -> its batches (trainer.training.batch.batch_indices)
    start_step: int = 0
    fast: bool = False

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    @property
    def micro_per_step(self) -> int:
        return self.cfg.train.grad_accum * self.accelerator.num_processes

    @property
    def trains_text(self) -> bool:
        return any(name.startswith("text_encoder") for name in self.trained)


def resolve_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def open_run(cfg: Config, run_dir: Path, lora: LoraConfig) -> Run:
    """The accelerator, the run folder (config saved, stale stop request cleared) and the dataset, scanned with its
    problems reported by file; refuses before any model loads when the run's files cannot fit on the disk."""
    from accelerate import Accelerator

    tc, started_at = cfg.train, time.time()
    # cpu=True without CUDA lets accelerate run data-parallel over gloo when launched with several processes.
    accelerator = Accelerator(mixed_precision=resolve_precision(tc.mixed_precision),
                              gradient_accumulation_steps=tc.grad_accum, cpu=not torch.cuda.is_available(),
                              **tracker_args(cfg, run_dir))
    main = accelerator.is_main_process
    events = EventLog(run_dir / "events.jsonl" if main else None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        seal_jsonl(run_dir / "events.jsonl")  # a line torn by kill -9 must not swallow this run's first event
        save_config(cfg, run_dir / "config.toml")
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request belongs to the run it stopped
        start_trackers(accelerator, cfg, events)  # TensorBoard follows the events (trainer/training/tracking.py)
    items, problems = ds.scan_dataset(cfg.data)
    for problem in problems:
        events.emit(PROBLEM, path=str(problem.path), reason=problem.reason)
        if main:
            print(f"skipped/warning: {problem}")
    items, validation_items = split_validation(items, cfg, events)  # held-out images (trainer/training/validation.py)
    batches_per_epoch = len(ds.epoch_batches(items, tc.batch_size, tc.seed, 0))
    if main:  # what is about to train, before minutes of loading (trainer/data/summary.py)
        summary = summarize_dataset(items, problems, cfg, accelerator.num_processes)
        events.emit(DATASET, **summary)
        print(format_summary(summary, tc.steps, tc.epochs))
    micro_per_step = tc.grad_accum * accelerator.num_processes
    total_steps = math.ceil(tc.epochs * batches_per_epoch / micro_per_step) if tc.epochs else tc.steps
    disk = check_disk_space(cfg, run_dir, total_steps) if main else {}  # DiskSpaceError names both sizes
    run = Run(cfg, lora, run_dir, accelerator, events, items, problems, batches_per_epoch, total_steps, disk,
              started_at, validation_items=validation_items)
    run.masks = make_masks(cfg, items, events)  # data.masked_loss (trainer/data/masks.py), None when off
    return run


def attach_models(run: Run, base, probe: bool = False) -> None:
    """LoRA on the base (frozen, in the weight dtype; LoRA parameters in fp32), the optimizer and scheduler,
    accelerate's preparation of the trained modules, the EMA and the validator (not in LoRA-drop's `probe` run)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    tc, lora, device, dtype = run.cfg.train, run.lora, run.device, run.weight_dtype
    run.base = base
    set_seed(tc.seed)  # LoRA init draws from the global generators: same seed, same starting adapter
    run.tuners = attach_lora(base, lora, run.total_steps)
    unet, text_encoders, denoiser = base.unet, base.text_encoders(), base.family.DENOISER
    unet.to(device) if lora.variant == "qlora" else unet.to(device, dtype=dtype)
    for text_encoder in (*text_encoders.values(), *base.frozen_text_encoders()):
        text_encoder.to(device, dtype=dtype)
    base.vae.to(device, dtype=torch.float32)  # SD's VAE overflows in fp16, and it runs once per image when cached
    # parts named as files name them: "unet" (or "transformer"), "text_encoder"(_2)
    run.trained = {name: m for name, m in base.parts().items() if lora_parameters(m)}
    cast_training_params(list(run.trained.values()), dtype=torch.float32)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in run.trained.keys() - {denoiser}:
            run.trained[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lrs = [(m, tc.lr_unet if n == denoiser else tc.lr_text_encoder) for n, m in run.trained.items()]
    optimizer = build_optimizer(tc, lora, lrs, fused=device.type == "cuda")
    if lora.variant == "deltalora":
        run.delta = DeltaLora(run.trained, lora.deltalora_lambda, lora.deltalora_start)
    run.lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                                     num_training_steps=run.total_steps)
    # Only trained modules go through prepare (DDP refuses modules without trainable parameters).
    prepared = run.accelerator.prepare(*run.trained.values(), optimizer)
    run.wrapped = dict(zip(run.trained, prepared[:-1]))
    run.optimizer = prepared[-1]
    run.models = {n: run.wrapped.get(n, m) for n, m in base.parts().items()}
    run.params = [p for g in run.optimizer.param_groups for p in g["params"]]
    run.ema = make_ema(tc, run.trained)
    run.validator = make_validator(run.cfg, base, run.validation_items, device, dtype, run.trains_text,
                                   run.main and not probe)


def resume(run: Run) -> None:
    """Continue from train.resume's checkpoint (weights, optimizer, scheduler, RNG, variant state), if any."""
    resume_setting = run.cfg.train.resume
    try:
        step, extra, folder = resume_from(resume_setting, run.run_dir, run.trained, run.optimizer, run.lr_scheduler)
        if folder is not None:
            if run.delta:
                run.delta.load_state(extra)
            load_adalora_state(run.tuners, extra)
            load_ema_state(run.ema, extra)
            load_validation_state(run.validator, extra)
    except ValueError as err:  # a checkpoint of another config, or a damaged one: say which, and what to do
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"train.resume = {resume_setting!r}: cannot continue from this checkpoint: {first}; resume "
                         "from a checkpoint this run's config wrote, or leave train.resume empty to start over") from None
    if resume_setting:  # "latest" with no checkpoint yet (killed before the first) starts over, and says so
        run.events.emit(RESUMED, step=step, checkpoint=str(folder) if folder else None)
    run.start_step = step


def fill_caches(run: Run) -> None:
    """VAE latents (both orientations when flipping) and, with a frozen text encoder and static captions, text
    embeddings. Then the frozen parts whose every output is cached wait on the CPU until a sample needs them
    (SDXL's two text encoders are 1.6 GB in bf16, the VAE 0.3 GB in fp32), as kohya's cached outputs do."""
    from tqdm.auto import tqdm

    cfg, base = run.cfg, run.base
    if cfg.train.cache_latents:
        for i, item in enumerate(tqdm(run.items, desc="caching latents", disable=not run.main)):
            for flip in ((False, True) if cfg.data.flip else (False,)):
                run.latent_cache[i, flip] = encode_latent_dist(base.vae, load_image(item.path, item.bucket, flip))
    if cfg.train.cache_text_embeddings and not run.trains_text and ds.caption_is_static(cfg.data):
        with torch.no_grad():
            for i, item in enumerate(run.items):
                caption = ds.build_caption(item.caption, cfg.data, random.Random(0), item.trigger)
                hidden, pooled = base.family.encode_text(base, base.text_encoders(), [caption], run.device)
                run.text_cache[i] = hidden[0], None if pooled is None else pooled[0]
    encoders = [*base.text_encoders().values(), *base.frozen_text_encoders()]
    run.idle = [base.vae] * bool(run.latent_cache) + encoders * bool(run.text_cache)
    offload(run.idle, run.device)


def offload(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Move frozen modules whose outputs are cached off the GPU (nothing to do on the CPU)."""
    if device.type == "cuda" and modules:
        for module in modules:
            module.to("cpu")
        torch.cuda.empty_cache()


def onload(modules: list[torch.nn.Module], device: torch.device) -> None:
    for module in modules:
        module.to(device)
