"""The noise rule of the flow-matching families (SD3.5): rectified flow, as diffusers' FlowMatchEulerDiscreteScheduler
and sd-scripts' SD3 training do it.

A training step draws a noise level σ in (0, 1), mixes x_t = (1 − σ)·x0 + σ·ε, and the transformer learns the
velocity ε − x0 at timestep t = 1000·σ. σ is drawn as train.timestep_sampling says (SD3 paper, Esser et al. 2024,
section 3.1): logit_normal σ = sigmoid(N(logit_mean, logit_std)), `mode` with mode_scale, or uniform; then shifted
σ' = sσ / (1 + (s − 1)σ) with s = train.flow_shift, by default the base's own scheduler shift (3.0 for SD3.5), the
shift its sampler uses at inference. That default is diffusers' train_dreambooth_lora_sd3.py's rule (logit-normal
u mapped through the scheduler's shifted sigmas) and SimpleTuner's (shift 3); sd-scripts' default is uniform with
shift 1.0 (docs/sd35.md compares them). Min-SNR does not apply: the sampling density is the weighting, every
sample weighs 1 (diffusers' weighting_scheme "logit_normal" likewise leaves the loss unweighted).

The `timesteps` these functions pass around are t = 1000·σ (float), what SD3Transformer2DModel takes.

No torch import at module level: the web UI imports the families (trainer.families) to describe a base.
"""

from __future__ import annotations

import math

TRAIN_TIMESTEPS = 1000  # t = σ·1000, SD3's scheduler num_train_timesteps


def training_scheduler(inference_scheduler, prediction_type: str):
    """(the base's FlowMatchEulerDiscreteScheduler config, "flow"): flow-matching bases have one target."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if prediction_type != "auto":
        raise ValueError(f"model.prediction_type = {prediction_type}: this base is trained by flow matching (it "
                         "predicts the velocity ε − x0); leave model.prediction_type at auto")
    return FlowMatchEulerDiscreteScheduler.from_config(inference_scheduler.config), "flow"


def base_shift(base) -> float:
    """The shift of the base's own scheduler (SD3.5: 3.0)."""
    return float(base.noise_scheduler.config.get("shift", 1.0))


def shift_sigmas(sigmas, shift: float):
    """σ' = sσ / (1 + (s − 1)σ): FlowMatchEulerDiscreteScheduler's static shift."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(train, count: int, generator):
    """`count` noise levels in (0, 1) from `generator` as train.timestep_sampling says, before the shift."""
    import torch

    device = generator.device
    if train.timestep_sampling == "logit_normal":
        u = torch.normal(train.logit_mean, train.logit_std, (count,), generator=generator, device=device).sigmoid()
    else:
        u = torch.rand((count,), generator=generator, device=device)
        if train.timestep_sampling == "mode":  # SD3 paper eq. 20: f(u) = 1 − u − s·(cos²(πu/2) − 1 + u)
            u = 1 - u - train.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u.clamp(1e-5, 1 - 1e-5)  # never exactly data or exactly noise (the target is still defined, t is not)


def draw_timesteps(base, train, count: int, generator, device):
    """`count` training timesteps t = 1000·σ', σ drawn (train.timestep_sampling) and shifted (train.flow_shift)."""
    shift = train.flow_shift or base_shift(base)
    return (shift_sigmas(sample_sigmas(train, count, generator), shift) * TRAIN_TIMESTEPS).to(device)


def validation_timesteps(base, train, count: int, device):
    """`count` fixed timesteps: the middle of `count` equal slices of σ, shifted like training's."""
    import torch

    shift = train.flow_shift or base_shift(base)
    sigmas = torch.tensor([(j + 0.5) / count for j in range(count)], device=device)
    return shift_sigmas(sigmas, shift) * TRAIN_TIMESTEPS


def _sigma(latents, timesteps):
    return (timesteps.float() / TRAIN_TIMESTEPS).to(latents.device).reshape(-1, *[1] * (latents.dim() - 1))


def add_noise(base, latents, noise, timesteps):
    """x_t = (1 − σ)·x0 + σ·ε."""
    sigma = _sigma(latents, timesteps)
    return (1 - sigma) * latents + sigma * noise


def target(base, latents, noise, timesteps):
    """The velocity ε − x0 (diffusers' SD3 script without precondition_outputs; sd-scripts alike)."""
    return noise - latents


def loss_weight(base, timesteps, min_snr_gamma: float):
    """1 per sample: the timestep density already weights flow matching (min-SNR is a DDPM weighting)."""
    import torch

    return torch.ones_like(timesteps, dtype=torch.float32)
