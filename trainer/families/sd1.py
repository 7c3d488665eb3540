"""Stable Diffusion 1.x: one CLIP-L text encoder, a UNet conditioned on its last hidden states, DDPM noise (epsilon).

The worked example of docs/adding-a-base.md: every name below is part of the family protocol (trainer.families.Family)
that the loop, the files, the preview and the UI ask instead of testing which base they have.

Detection: SD1.x is what is left when no other family claims a base (FAMILIES lists it last): a UNet with 1x1-conv
transformer projections and 768-wide cross-attention; a single-file checkpoint with a CLIP-L `cond_stage_model`.
kohya keys (sd-scripts trains SD1/SD2 on diffusers-named UNets): `lora_unet_<diffusers path, . -> _>` and
`lora_te_text_model_<path>`.

No torch import at module level: the web UI imports the families to describe a base.
"""

from __future__ import annotations

from trainer.families.clip import OPENCLIP_H, kohya_key, token_ids
from trainer.families.ddpm import (add_noise, draw_timesteps, loss_weight, target,  # noqa: F401 (SD's noise rule)
                                   training_scheduler, validation_timesteps)

NAME = "sd1"  # in events (base_kind), `convert --base`, `build-tiny --kind`
LABEL = "SD 1.x"  # what the UI shows
PIPELINE_CLASS = "StableDiffusionPipeline"
DENOISER = "unet"  # the denoiser's pipeline attribute and folder, also its part name in LoRA files
DENOISER_CLASS = "UNet2DConditionModel"
TEXT_ENCODERS = ("text_encoder",)  # pipeline attributes, also the part names of LoRA files
TOKENIZERS = ("tokenizer",)
FROZEN_TEXT_ENCODERS: tuple[str, ...] = ()  # encoders that condition but never get LoRA (SD3's T5)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # lora.unet_targets when unset: the attention
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_LAYOUT = "sd1"  # families whose kohya keys are spelled alike name the same layout (SD2's are SD1's)
KOHYA_VERSION = "sd_v1"  # ss_base_model_version (sd-scripts library/sdxl_model_util.py, train_network.py)
V2 = False  # ss_v2
# Which tools load each file exactly (docs/consumers.md measures them): the Runs panel's which-file-where lines
KOHYA_TOOLS = "A1111/Forge, ComfyUI, kohya `merge_lora.py`, diffusers"
DIFFUSERS_TOOLS = "diffusers (`pipe.load_lora_weights`) and this app's Preview"
KOHYA_NOTE = "one rank, alpha = rank, the trained scale folded in"
DIFFUSERS_NOTE = " (no key loads in A1111/ComfyUI)"

# lora.blocks (trainer.adapters.blocks): the UNet's levels as diffusers numbers them. kohya's block_dims (sd-scripts
# networks/lora.py, get_block_index) counts finer, three per level: its IN01-IN11 are down.0-down.3 (IN00, conv_in,
# takes no LoRA), MID is mid, OUT00-OUT11 are up.0-up.3 (SDXL's 23: input_blocks 1-8, middle_block, output_blocks 0-8).
BLOCKS_HELP = "down.N, mid, up.N: the UNet's down_blocks[N], mid_block, up_blocks[N]"
# The real SD1.5 UNet and a 24-layer CLIP text model (OpenCLIP-H's depth covers CLIP-L's 12 layers), built on the
# meta device to resolve kohya names without a base model: module names depend on the layout, not on the sizes.
REFERENCE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


# ----------------------------------------------------------------------------- detection


def matches_configs(unet_config: dict, components: set[str]) -> bool:
    """Whether a diffusers pipeline (its UNet config and the names of its present components) is this family."""
    return True  # the fallback: asked last


def matches_checkpoint_keys(keys: set[str]) -> bool:
    """Whether a single-file (original LDM) checkpoint with these tensor names is this family."""
    return True  # the fallback: asked last


def matches_version(version: str) -> bool:
    """Whether a LoRA file's ss_base_model_version names this family."""
    return version.startswith("sd_v1")


def matches_kohya_keys(keys: set[str]) -> bool:
    """Whether kohya keys are spelled this family's way (SD1 and SD2 share one spelling: the fallback)."""
    return True


def label(unet_config: dict) -> str:
    """What the UI shows for a base with this denoiser config (families with several sizes name the size)."""
    return LABEL


def matches_diffusers_keys(keys: set[str]) -> bool:
    """Whether a diffusers-layout LoRA's keys show this family without metadata: SD1/SD2 UNets have attention in
    their first down level and four levels."""
    return any(k.startswith(("unet.down_blocks.0.attentions", "unet.down_blocks.3", "unet.up_blocks.3")) for k in keys)


# ----------------------------------------------------------------------------- loading and conditioning


def pipeline_kwargs(model_cfg) -> dict:
    """Extra from_pretrained/from_single_file arguments (trainer.config.ModelConfig: a family may read its own
    settings, e.g. SD3's model.t5)."""
    return {"safety_checker": None, "requires_safety_checker": False}


def pipeline(base, unet, text_encoders: dict):
    """A diffusers inference pipeline over these parts."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=base.vae, unet=unet, scheduler=base.sample_scheduler, tokenizer=base.tokenizer,
                                   **text_encoders, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def encode_text(base, text_encoders: dict, captions: list[str], device):
    """(hidden states [B, 77, D], None) of `captions`: the last hidden states of CLIP, what StableDiffusionPipeline
    feeds at inference. `text_encoders` maps "text_encoder" to the module to run (trained, wrapped or frozen)."""
    return text_encoders["text_encoder"](token_ids(base.tokenizer, captions, device))[0], None


def predict(unet, noisy, timesteps, hidden, pooled, image_sizes: list, dtype):
    """The UNet's prediction for a batch. `pooled` and `image_sizes` ((size, bucket, flipped) per image) are SDXL's
    extra conditions: unused here."""
    return unet(noisy, timesteps, hidden.to(dtype)).sample


def scale_latents(vae, sample):
    """A VAE latent sample as the denoiser sees it."""
    return sample * vae.config.scaling_factor


# ----------------------------------------------------------------------------- files


def block_names(unet_config) -> tuple[str, ...]:
    """The lora.blocks names of this denoiser (its config): down.0 … down.N, mid, up.0 … up.N."""
    mid = ("mid",) if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") else ()
    return (*(f"down.{i}" for i in range(len(unet_config["down_block_types"]))), *mid,
            *(f"up.{i}" for i in range(len(unet_config["up_block_types"]))))


def block_of(module: str) -> str | None:
    """The lora.blocks name of a denoiser module path (`down_blocks.1.attentions.0.proj_in` -> `down.1`); None for
    a module outside every block (conv_in, the time embedding, conv_out)."""
    level, _, rest = module.partition(".")
    if level == "mid_block":
        return "mid"
    index = rest.split(".", 1)[0]
    if level in ("down_blocks", "up_blocks") and index.isdigit():
        return f"{level.removesuffix('_blocks')}.{index}"
    return None


def kohya_name(part: str, module: str, unet_config=None) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`; text-encoder modules
    as files spell them (`text_model.` kept, see trainer.families.clip.canonical_text_module)."""
    return kohya_key(KOHYA_PREFIXES, NAME, part, module)


def kohya_slot(part: str, module: str) -> tuple[int, int] | None:
    """(where the module's output rows sit, of how many) in a fused weight that several modules share one kohya name
    for (SD3's q/k/v: trainer.lora_files.fused); None: the module has its own kohya name (every module here)."""
    return None


def reference_models() -> dict:
    """{part: model on the meta device} of the real base, for kohya names without a base model."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel(**REFERENCE_UNET),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**OPENCLIP_H))}


def kohya_version(unet_config=None) -> str:
    """ss_base_model_version of a LoRA for this base (families with several sizes name the size)."""
    return KOHYA_VERSION


def modelspec_architecture(v_prediction: bool, unet_config=None) -> str:
    """SAI ModelSpec architecture of a LoRA for this base (kohya library/sai_model_spec.py); `unet_config`: the
    denoiser's, where the family has several sizes (None: the file does not say)."""
    return "stable-diffusion-v1/lora"


def default_resolution(v_prediction: bool) -> int:
    """The training side kohya's metadata assumes when a file does not say."""
    return 512


# ----------------------------------------------------------------------------- sizes and tests


def native_size(unet_config: dict, vae_config: dict) -> int:
    """The image side the base was built for: the UNet's sample size times the VAE's downsampling."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def build_tiny(folder, seed: int = 0):
    """Write a tiny random pipeline of this family to `folder` (tests, `python -m trainer build-tiny`)."""
    from trainer.families.tiny import build_tiny_sd15

    return build_tiny_sd15(folder, seed)
