"""The noise rule of the UNet families (SD1.x, SD2.x, SDXL): DDPM's discrete timesteps and variance-preserving noise.

A training step draws t uniformly from the base's num_train_timesteps, noises the latent as the base's DDPMScheduler
does (x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε), and the UNet learns ε (epsilon bases) or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (v-prediction
bases: SD2 768-v). Min-SNR weighting (Hang et al. 2023) as diffusers' training scripts compute it: min(SNR, γ)/SNR
for ε, min(SNR, γ)/(SNR + 1) for v. A family whose rule differs (flow matching) brings its own module with these
functions.

No torch import at module level: the web UI imports the families (trainer.families) to describe a base.
"""

from __future__ import annotations


def training_scheduler(inference_scheduler, prediction_type: str):
    """(DDPMScheduler with the base's beta schedule, prediction type): `prediction_type` "auto" takes the base's own."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(inference_scheduler.config)
    if prediction_type == "auto":
        prediction_type = inference_scheduler.config.get("prediction_type", "epsilon")
    scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler, prediction_type


def draw_timesteps(base, train, count: int, generator, device):
    """`count` training timesteps, uniform over the schedule, from `generator` (drawn on its device). `train`
    (TrainConfig): unused, DDPM draws uniformly."""
    import torch

    return torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (count,), generator=generator,
                         device=generator.device).to(device)


def validation_timesteps(base, train, count: int, device):
    """`count` fixed timesteps evenly spread over the schedule (the middle of each of `count` equal slices)."""
    import torch

    n = base.noise_scheduler.config.num_train_timesteps
    return torch.tensor([int((j + 0.5) * n / count) for j in range(count)], device=device)


def add_noise(base, latents, noise, timesteps):
    return base.noise_scheduler.add_noise(latents, noise, timesteps)


def target(base, latents, noise, timesteps):
    """What the UNet is trained to predict: the noise, or v for v-prediction bases."""
    if base.prediction_type == "epsilon":
        return noise
    return base.noise_scheduler.get_velocity(latents, noise, timesteps)


def loss_weight(base, timesteps, min_snr_gamma: float):
    """Min-SNR-γ weight per sample."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(base.noise_scheduler, timesteps)
    return snr.clamp(max=min_snr_gamma) / (snr + 1 if base.prediction_type == "v_prediction" else snr)
