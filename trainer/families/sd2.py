"""Stable Diffusion 2.x: SD1's pipeline and files with OpenCLIP-H (1024-wide text states), linear transformer
projections in the UNet and, for the 768-v models, v-prediction (read from the base's scheduler, no flag).

Everything not defined here is SD1's (trainer.families.sd1): the same pipeline class, conditioning, noise rule
(with the prediction type the base says) and kohya key spelling. What differs is how it is told apart and what its
files say: ss_base_model_version `sd_v2`, ss_v2, and the ModelSpec architecture of a 768-v or 512 base.
"""

from __future__ import annotations

from trainer.families.clip import kohya_key
from trainer.families.sd1 import (DEFAULT_TARGETS, DENOISER, DENOISER_CLASS, DIFFUSERS_NOTE, DIFFUSERS_TOOLS, KOHYA_NOTE, KOHYA_TOOLS,  # noqa: F401 (SD1's)
                                  BLOCKS_HELP, FROZEN_TEXT_ENCODERS, KOHYA_LAYOUT, KOHYA_PREFIXES, PIPELINE_CLASS,
                                  TEXT_ENCODERS, TOKENIZERS, add_noise, block_names, block_of, draw_timesteps, encode_text, kohya_slot, loss_weight,
                                  native_size, pipeline, pipeline_kwargs, predict, reference_models, scale_latents,
                                  target, training_scheduler, validation_timesteps)

NAME = "sd2"
LABEL = "SD 2.x"
KOHYA_VERSION = "sd_v2"
V2 = True


def matches_configs(unet_config: dict, components: set[str]) -> bool:
    return bool(unet_config.get("use_linear_projection")) or unet_config.get("cross_attention_dim") == 1024


def matches_checkpoint_keys(keys: set[str]) -> bool:
    return any(k.startswith("cond_stage_model.model.") for k in keys)  # OpenCLIP-H


def matches_version(version: str) -> bool:
    return version.startswith("sd_v2")


def matches_kohya_keys(keys: set[str]) -> bool:
    return False  # spelled as SD1's: the keys cannot tell them apart (the metadata can)


def matches_diffusers_keys(keys: set[str]) -> bool:
    return False  # as SD1's


def kohya_name(part: str, module: str, unet_config=None) -> str:
    return kohya_key(KOHYA_PREFIXES, NAME, part, module)


def label(unet_config: dict) -> str:
    return LABEL


def kohya_version(unet_config=None) -> str:
    """ss_base_model_version of a LoRA for this base (families with several sizes name the size)."""
    return KOHYA_VERSION


def modelspec_architecture(v_prediction: bool, unet_config=None) -> str:
    return "stable-diffusion-v2-768-v/lora" if v_prediction else "stable-diffusion-v2-512/lora"


def default_resolution(v_prediction: bool) -> int:
    return 768 if v_prediction else 512


def build_tiny(folder, seed: int = 0):
    """A tiny SD2.x-layout (768-v style: v-prediction, linear projections) pipeline."""
    from trainer.families.tiny_xl import build_tiny_sd2

    return build_tiny_sd2(folder, seed)
