"""SDXL: two text encoders (CLIP-L and OpenCLIP bigG with projection), a UNet also conditioned on the pooled text
and six size/crop "time ids" per image, DDPM noise (epsilon).

Detection: the UNet takes pooled text + time ids (`addition_embed_type = "text_time"`) and the pipeline has a second
text encoder; the refiner (text_time but no first text encoder) is refused: it is an img2img model that style LoRAs
skip. A single-file checkpoint has its second encoder under `conditioner.embedders.1`.

Conditioning (as StableDiffusionXLPipeline.encode_prompt): the penultimate hidden states of both encoders
concatenated, the second encoder's projected pooled output, and per image `time_ids = (orig_h, orig_w, crop_top,
crop_left, target_h, target_w)` from the real original size and the bucket crop (mirrored for flipped images, as
kohya does).

kohya keys: sd-scripts trains SDXL on Stability's SGM/LDM UNet, so UNet keys use SGM block names
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1`, `output_blocks_2_2_conv`), and the
text encoders are `lora_te1_` (CLIP-L) and `lora_te2_` (bigG). These are the names A1111/Forge and ComfyUI map onto
their SDXL models, and diffusers' `_maybe_map_sgm_blocks_to_diffusers` maps back.
SGM numbering with L = layers_per_block: input block 0 is conv_in, then each down level i has L resnet(+attention)
blocks `1 + i(L+1) + j` and its downsampler `(i+1)(L+1)`; output blocks `i(L+1) + j` for j = 0..L with the
upsampler after the last one (sub-index 2 when the level has attentions, else 1); resnet parts are renamed
(conv1 -> in_layers.2, time_emb_proj -> emb_layers.1, conv2 -> out_layers.3, conv_shortcut -> skip_connection).

No torch import at module level: the web UI imports the families to describe a base.
"""

from __future__ import annotations

from trainer.families.clip import CLIP_L, OPENCLIP_BIGG, kohya_key, token_ids, to_device
from trainer.families.ddpm import (add_noise, draw_timesteps, loss_weight, target,  # noqa: F401 (SD's noise rule)
                                   training_scheduler, validation_timesteps)
from trainer.families.sd1 import (DEFAULT_TARGETS, DENOISER, DENOISER_CLASS, DIFFUSERS_NOTE, DIFFUSERS_TOOLS, KOHYA_NOTE, KOHYA_TOOLS,  # noqa: F401 (as SD1's)
                                  BLOCKS_HELP, FROZEN_TEXT_ENCODERS, block_names, block_of, kohya_slot, native_size,
                                  scale_latents)

NAME = "sdxl"
LABEL = "SDXL"
PIPELINE_CLASS = "StableDiffusionXLPipeline"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_LAYOUT = "sdxl"
KOHYA_VERSION = "sdxl_base_v1-0"
V2 = False

# lora_te1_ alone is not one: some SD1.x files spell their only text encoder that way.
SGM_MARKERS = ("lora_te2_", "lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
               "lora_unet_label_emb", "lora_unet_time_embed_")
REFERENCE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


# ----------------------------------------------------------------------------- detection


def matches_configs(unet_config: dict, components: set[str]) -> bool:
    if unet_config.get("addition_embed_type") != "text_time":
        return False
    if "text_encoder" not in components:
        raise ValueError("this is an SDXL refiner (no first text encoder): train style LoRAs on the SDXL base")
    if "text_encoder_2" not in components:
        raise ValueError("SDXL-type UNet (text_time conditioning) without a second text encoder")
    return True


def matches_checkpoint_keys(keys: set[str]) -> bool:
    return any(k.startswith("conditioner.embedders.1.") for k in keys)  # the second text encoder


def matches_version(version: str) -> bool:
    return version.startswith("sdxl")


def matches_kohya_keys(keys: set[str]) -> bool:
    return any(k.startswith(SGM_MARKERS) for k in keys)


def matches_diffusers_keys(keys: set[str]) -> bool:
    import re

    # only SDXL has a second encoder, the add_embedding and transformer depth > 1
    return any(k.startswith("text_encoder_2.") or "add_embedding" in k or re.search(r"transformer_blocks\.[1-9]", k)
               for k in keys)


def label(unet_config: dict) -> str:
    return LABEL


# ----------------------------------------------------------------------------- loading and conditioning


def pipeline_kwargs(model_cfg) -> dict:
    return {}


def pipeline(base, unet, text_encoders: dict):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=base.vae, unet=unet, scheduler=base.sample_scheduler, tokenizer=base.tokenizer,
                                     tokenizer_2=base.tokenizer_2, **text_encoders)


def encode_text(base, text_encoders: dict, captions: list[str], device):
    """(penultimate hidden states of both encoders concatenated [B, 77, D1+D2], pooled projection [B, P])."""
    import torch

    hidden = []
    for name, tokenizer in (("text_encoder", base.tokenizer), ("text_encoder_2", base.tokenizer_2)):
        out = text_encoders[name](token_ids(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder (with projection) returns text_embeds first
    return torch.cat(hidden, dim=-1), pooled


def predict(unet, noisy, timesteps, hidden, pooled, image_sizes: list, dtype):
    """The UNet's prediction with SDXL's added conditions: pooled text and the time ids of each image's
    (original size, bucket, flipped)."""
    import torch

    time_ids = torch.stack([sdxl_time_ids(size, bucket, flip) for size, bucket, flip in image_sizes])
    added = {"text_embeds": pooled.to(dtype), "time_ids": to_device(time_ids, pooled.device).to(dtype)}
    return unet(noisy, timesteps, hidden.to(dtype), added_cond_kwargs=added).sample


def sdxl_time_ids(size: tuple[int, int], bucket: tuple[int, int], flip: bool):
    """SDXL's 6 size/crop conditions of an image of `size` (w, h) resized and center-cropped to `bucket` (w, h)
    as trainer.data.images.load_image does it; a flipped image's crop is measured from the other side, like kohya."""
    import torch

    from trainer.data.images import crop_box

    (w, h), (bw, bh) = size, bucket
    left, top, resized_w, _ = crop_box(size, bucket)
    if flip:
        left = resized_w - left - bw
    return torch.tensor([h, w, top, left, bh, bw], dtype=torch.float32)


# ----------------------------------------------------------------------------- files


def kohya_name(part: str, module: str, unet_config=None) -> str:
    """UNet modules get their SGM names (for the layout of `unet_config`, default: the real SDXL's)."""
    if part == "unet":
        module = sgm_unet_name(module, unet_layout(unet_config or REFERENCE_UNET))
    return kohya_key(KOHYA_PREFIXES, NAME, part, module)


def unet_layout(config) -> tuple[int, tuple[bool, ...]]:
    """(layers_per_block, which up levels have attentions) of a UNet config: all the SGM numbering needs."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ValueError(f"per-level layers_per_block {layers} has no SGM block numbering")
        layers = layers[0]
    return layers, tuple("CrossAttn" in t for t in config["up_block_types"])


def sgm_unet_name(module: str, layout: tuple[int, tuple[bool, ...]]) -> str:
    """diffusers UNet module path -> SGM/LDM path, e.g. down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in."""
    layers, up_attention = layout
    if module in _TOP:
        return _TOP[module]
    p = module.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET.get(rest[0], rest[0]), *rest[1:]])

    if p[0] == "down_blocks" and len(p) > 4:
        i, what, j = int(p[1]), p[2], int(p[3])
        if what == "downsamplers":
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
        n = 1 + i * (layers + 1) + j
        if what in ("resnets", "attentions"):
            return f"input_blocks.{n}.0.{resnet(p[4:])}" if what == "resnets" else f"input_blocks.{n}.1.{'.'.join(p[4:])}"
    if p[0] == "mid_block" and len(p) > 3:
        what, j = p[1], int(p[2])
        if what in ("resnets", "attentions"):
            return f"middle_block.{2 * j}.{resnet(p[3:])}" if what == "resnets" else f"middle_block.1.{'.'.join(p[3:])}"
    if p[0] == "up_blocks" and len(p) > 4:
        i, what, j = int(p[1]), p[2], int(p[3])
        if what == "upsamplers":
            return f"output_blocks.{i * (layers + 1) + layers}.{2 if up_attention[i] else 1}.conv"
        n = i * (layers + 1) + j
        if what in ("resnets", "attentions"):
            return f"output_blocks.{n}.0.{resnet(p[4:])}" if what == "resnets" else f"output_blocks.{n}.1.{'.'.join(p[4:])}"
    raise ValueError(f"unet.{module}: no SGM (kohya SDXL) name for this module")


def reference_models() -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel(**REFERENCE_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))}


def kohya_version(unet_config=None) -> str:
    """ss_base_model_version of a LoRA for this base (families with several sizes name the size)."""
    return KOHYA_VERSION


def modelspec_architecture(v_prediction: bool, unet_config=None) -> str:
    return "stable-diffusion-xl-v1-base/lora"


def default_resolution(v_prediction: bool) -> int:
    return 1024


def build_tiny(folder, seed: int = 0):
    from trainer.families.tiny_xl import build_tiny_sdxl

    return build_tiny_sdxl(folder, seed)
