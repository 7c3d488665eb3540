"""One micro-batch and its loss: `make_batch(run, k)` draws everything random about micro-batch k, and
`diffusion_loss(run, models, batch)` is the denoising loss of the models on it.

Every random choice of micro-batch k (data order, flip, caption shuffle/dropout, latent sample, noise, timestep,
LoRA dropout) comes from generators seeded by (seed, k): a run resumed at step s draws exactly what the
uninterrupted run drew from step s on, so resuming ends at the same weights.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data import dataset as ds
from trainer.data.images import load_image
from trainer.data.masks import batch_masks
from trainer.adapters.variants import adalora_orth_loss

TEST_OOM_AT = int(os.environ.get("STYLE_LORA_TEST_OOM_AT_STEP", "-1"))  # test-only: simulate an OOM at micro-batch k


@dataclass
class Batch:
    indices: list[int]  # positions in run.items
    flips: list[bool]
    captions: list[str]
    latents: torch.Tensor  # scaled VAE latents, float32
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor  # latents noised to `timesteps`, in the run's weight dtype


@torch.no_grad()
def encode_latent_dist(vae, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = vae.encode(image[None].to(vae.device, vae.dtype)).latent_dist
    return dist.mean[0].float(), dist.std[0].float()


def batch_indices(run, k: int) -> list[int]:
    """The items of micro-batch k: epoch k // batches_per_epoch, shuffled by (seed, epoch); one epoch kept."""
    epoch = k // run.batches_per_epoch
    if epoch not in run.epoch_order:
        run.epoch_order.clear()
        run.epoch_order[epoch] = ds.epoch_batches(run.items, run.cfg.train.batch_size, run.cfg.train.seed, epoch)
    return run.epoch_order[epoch][k % run.batches_per_epoch]


def make_batch(run, k: int) -> Batch:
    if k == TEST_OOM_AT:
        raise torch.OutOfMemoryError("CUDA out of memory. (simulated by STYLE_LORA_TEST_OOM_AT_STEP)")
    tc, device = run.cfg.train, run.device
    rng = random.Random(f"{tc.seed}-{k}")
    # noise and timesteps: drawn on the GPU when there is one (no host RNG + copy per step), else on the CPU
    gen = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(tc.seed * 1_000_003 + k)
    torch.manual_seed(tc.seed + k)  # LoRA dropout draws from the global generator
    indices = batch_indices(run, k)
    items = run.items
    flips = [run.cfg.data.flip and rng.random() < 0.5 for _ in indices]
    captions = [ds.build_caption(items[i].caption, run.cfg.data, rng, items[i].trigger) for i in indices]
    means, stds = [], []
    for i, flip in zip(indices, flips):
        if (i, flip) in run.latent_cache:
            mean, std = run.latent_cache[i, flip]
        else:
            mean, std = encode_latent_dist(run.base.vae, load_image(items[i].path, items[i].bucket, flip))
        means.append(mean)
        stds.append(std)
    mean, std = torch.stack(means), torch.stack(stds)

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device).to(device)

    base = run.base
    latents = base.family.scale_latents(base.vae, mean.to(device) + std.to(device) * randn(mean.shape))
    noise = randn(latents.shape)
    if tc.noise_offset:
        noise += tc.noise_offset * randn((latents.shape[0], latents.shape[1], 1, 1))
    timesteps = base.family.draw_timesteps(base, tc, latents.shape[0], gen, device)
    noisy = base.family.add_noise(base, latents, noise, timesteps).to(run.weight_dtype)
    return Batch(indices, flips, captions, latents, noise, timesteps, noisy)


def text_conditioning(run, models: dict, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled or None) of the batch's captions: from the cache when the text encoder is frozen."""
    if run.text_cache:
        hidden = torch.stack([run.text_cache[i][0] for i in batch.indices])
        pooled = [run.text_cache[i][1] for i in batch.indices]
        return hidden, None if pooled[0] is None else torch.stack(pooled)
    encoders = {n: models[n] for n in run.base.text_encoders()}
    # grad only when training the TE, and never inside a no_grad caller (LoRA-drop's importance pass)
    with torch.set_grad_enabled(run.trains_text and torch.is_grad_enabled()):
        return run.base.family.encode_text(run.base, encoders, batch.captions, run.device)


def diffusion_loss(run, models: dict, batch: Batch) -> torch.Tensor:
    """Mean denoising loss of `models` ({"unet" or "transformer", "text_encoder"(_2)}: eager or compiled) on `batch`: MSE to the
    family's target (the noise, or v for v-prediction bases), min-SNR weighted, regularisation images at their
    weight."""
    base, tc, dtype, family = run.base, run.cfg.train, run.weight_dtype, run.base.family
    hidden, pooled = text_conditioning(run, models, batch)
    image_sizes = [(run.items[i].size, run.items[i].bucket, f) for i, f in zip(batch.indices, batch.flips)]
    pred = family.predict(models[family.DENOISER], batch.noisy, batch.timesteps, hidden, pooled, image_sizes, dtype).float()
    target = family.target(base, batch.latents, batch.noise, batch.timesteps)
    weight_map = batch_masks(run.masks, batch.indices, batch.flips, pred)  # masked loss: 0 where masked out, else 1
    loss = (F.mse_loss(pred, target.float(), reduction="none") * weight_map).mean(dim=(1, 2, 3))
    if tc.min_snr_gamma:
        loss = loss * family.loss_weight(base, batch.timesteps, tc.min_snr_gamma)
    reg_weights = [run.items[i].loss_weight for i in batch.indices]  # data.reg_weight for regularisation images
    if any(w != 1.0 for w in reg_weights):
        loss = loss * torch.tensor(reg_weights, device=loss.device)
    loss = loss.mean()
    for name in run.tuners:  # AdaLoRA keeps P and Q near-orthogonal, as in the paper
        loss = loss + run.lora.adalora_orth_reg * adalora_orth_loss(run.trained[name])
    return loss
