"""Validation: a held-out image set and a loss that is comparable across steps and runs.

The held-out images come from `data.validation_path` (a folder like data.path) or a seeded `data.validation_split` of
data.path (those images do not train). Every `train.validation_every` steps and at the end, each held-out image is
noised at `train.validation_timesteps` fixed timesteps (evenly spread over the schedule) with fixed noise (seeded by
the run seed, the image and the timestep), its latent is the VAE mean (no sampling), its caption the full one
(trigger, no shuffle or dropout); the loss is the plain MSE of the prediction (no min-SNR weighting), with the
adapter in eval mode (no dropout) and, with train.ema, the EMA weights. Same data, same noise every time: differences
between steps and between runs with the same seed and data are the adapter's.

The `validation` event carries the loss (events.jsonl; the Runs panel plots it beside the training loss).
`train.keep_best` writes `<name>-best.safetensors` (and its diffusers file) whenever the loss reaches a new low.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.data import dataset as ds
from trainer.data.images import load_image
from trainer.config import Config
from trainer.training.batch import encode_latent_dist
from trainer.training.checkpoint import one_number
from trainer.events import BEST, PROBLEM, VALIDATION, VALIDATION_SET

BEST_LOSS, BEST_STEP = "validation.best_loss", "validation.best_step"


def split_validation(items: list, cfg: Config, events) -> tuple[list, list]:
    """(training items, held-out items). The split is seeded by train.seed and keeps at least one image on each side."""
    dc = cfg.data
    if dc.validation_path:
        held_out, problems = scan_validation_folder(dc)
        for problem in problems:
            events.emit(PROBLEM, path=str(problem.path), reason=problem.reason)
    elif dc.validation_split:
        if len(items) < 2:
            raise ValueError(f"data.validation_split: {len(items)} image(s) cannot be split into training and validation")
        order = list(range(len(items)))
        random.Random(f"validation-{cfg.train.seed}").shuffle(order)
        count = min(len(items) - 1, max(1, round(dc.validation_split * len(items))))
        chosen = set(order[:count])
        held_out = [item for i, item in enumerate(items) if i in chosen]
        items = [item for i, item in enumerate(items) if i not in chosen]
    else:
        return items, []
    events.emit(VALIDATION_SET, images=len(held_out), training_images=len(items),
                source=dc.validation_path or f"split {dc.validation_split}")
    return items, held_out


def scan_validation_folder(dc) -> tuple[list, list]:
    """data.validation_path scanned like data.path (its errors name data.validation_path), refused when it is, holds
    or lies inside the dataset: the validation loss would be measured on training images (and keep_best would pick
    by training loss)."""
    root, held = Path(dc.path).expanduser().resolve(), Path(dc.validation_path).expanduser().resolve()
    if held.is_relative_to(root) or root.is_relative_to(held):
        raise ds.DatasetError(f"data.validation_path: '{dc.validation_path}' and data.path '{dc.path}' must not contain "
                              "one another (validation images must be held out of training); pick a separate folder")
    return ds._scan_folder(dc, "data.validation_path", dc.validation_path)


def validation_due(cfg: Config, step: int, total_steps: int, validator) -> bool:
    every = cfg.train.validation_every
    return validator is not None and (step == total_steps or bool(every and step % every == 0))


class Validator:
    """Fixed latents, noise, timesteps and text conditions of the held-out images; `loss()` runs the model on them."""

    def __init__(self, cfg: Config, base, items: list, device, weight_dtype, trains_text: bool):
        self.cfg, self.base, self.device, self.weight_dtype = cfg, base, device, weight_dtype
        self.trains_text = trains_text
        self.best: tuple[float, int] | None = None
        family, k = base.family, cfg.train.validation_timesteps
        self.timesteps = family.validation_timesteps(base, cfg.train, k, device)
        caption_cfg = cfg.data.model_copy(update={"caption_dropout": 0.0, "shuffle_captions": False})
        self.captions = [ds.build_caption(item.caption, caption_cfg, random.Random(0), item.trigger) for item in items]
        self.samples = []
        vae = base.vae
        with torch.no_grad():
            for i, item in enumerate(items):
                mean, _ = encode_latent_dist(vae, load_image(item.path, item.bucket))
                latent = family.scale_latents(vae, mean[None])
                gen = torch.Generator("cpu").manual_seed(cfg.train.seed * 7919 + i)
                noise = torch.randn((k, *latent.shape[1:]), generator=gen).to(device)
                self.samples.append((latent.to(device), noise, (item.size, item.bucket, False)))
            # frozen text encoders: encoded once here (they may leave the GPU during training)
            self.text = None if trains_text else [family.encode_text(base, base.text_encoders(), [c], device)
                                                  for c in self.captions]

    @torch.no_grad()
    def loss(self, unet, text_encoders: dict) -> float:
        modes = {m: m.training for m in (unet, *text_encoders.values())}
        for m in modes:
            m.eval()  # no LoRA / rank dropout
        base, family, k, total = self.base, self.base.family, len(self.timesteps), 0.0
        try:
            for i, (latent, noise, image_size) in enumerate(self.samples):
                hidden, pooled = self.text[i] if self.text else family.encode_text(base, text_encoders,
                                                                                   [self.captions[i]], self.device)
                latents = latent.expand(k, *latent.shape[1:])
                noisy = family.add_noise(base, latents, noise, self.timesteps).to(self.weight_dtype)
                pred = family.predict(unet, noisy, self.timesteps, hidden.expand(k, -1, -1),
                                      None if pooled is None else pooled.expand(k, -1), [image_size] * k,
                                      self.weight_dtype)
                target = family.target(base, latents, noise, self.timesteps)
                total += float(F.mse_loss(pred.float(), target.float()))
        finally:
            for m, mode in modes.items():
                m.train(mode)
        return total / len(self.samples)

    def run(self, step: int, unet, text_encoders: dict, events, ema, save_best) -> float:
        """The `validation` event of this step (EMA weights with train.ema); with train.keep_best, `save_best()` on a
        new lowest loss (it applies the EMA weights itself)."""
        from trainer.training.ema import ema_weights

        with ema_weights(ema):
            value = self.loss(unet, text_encoders)
        improved = self.best is None or value < self.best[0]
        if improved:
            self.best = (value, step)
        events.emit(VALIDATION, step=step, loss=value, best_loss=self.best[0], best_step=self.best[1])
        if improved and self.cfg.train.keep_best:
            paths = save_best()
            events.emit(BEST, step=step, loss=value, paths=[str(p) for p in paths])
        return value


def make_validator(cfg: Config, base, items: list, device, weight_dtype, trains_text: bool,
                   main: bool = True) -> Validator | None:
    """None without held-out images; only the main process validates (it also writes the best adapter)."""
    return Validator(cfg, base, items, device, weight_dtype, trains_text) if items and main else None


def validation_state(validator: Validator | None) -> dict[str, torch.Tensor]:
    if validator is None or validator.best is None:
        return {}
    return {BEST_LOSS: torch.tensor(validator.best[0], dtype=torch.float64),
            BEST_STEP: torch.tensor(validator.best[1], dtype=torch.int64)}


def load_validation_state(validator: Validator | None, tensors: dict[str, torch.Tensor]) -> None:
    if validator is not None and BEST_LOSS in tensors:
        validator.best = (float(one_number(tensors, BEST_LOSS)), int(one_number(tensors, BEST_STEP)))


def best_paths(run_dir: Path, name: str) -> list[Path]:
    return [Path(run_dir) / f"{name}-best.safetensors", Path(run_dir) / f"{name}-best.diffusers.safetensors"]
