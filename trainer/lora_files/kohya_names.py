"""kohya/A1111 LoRA key names of diffusers modules, per base family, and the reverse lookup tables.

SD1.x / SD2.x (kohya sd-scripts trains these on diffusers-named UNets): `lora_unet_<diffusers path, . -> _>` and
`lora_te_text_model_<path>`. SDXL (sd-scripts trains it on Stability's SGM/LDM UNet): UNet keys use the SGM block
names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1`, `output_blocks_2_2_conv`),
and the text encoders are `lora_te1_` (CLIP-L) and `lora_te2_` (OpenCLIP bigG). These are the names A1111/Forge
and ComfyUI map onto their SDXL models, and diffusers' `_maybe_map_sgm_blocks_to_diffusers` maps back; the tests
load our SDXL kohya files through that diffusers path and compare images.

SGM numbering with L = layers_per_block: input block 0 is conv_in, then each down level i has L resnet(+attention)
blocks `1 + i(L+1) + j` and its downsampler `(i+1)(L+1)`; output blocks `i(L+1) + j` for j = 0..L with the
upsampler after the last one (sub-index 2 when the level has attentions, else 1); resnet parts are renamed
(conv1 -> in_layers.2, time_emb_proj -> emb_layers.1, conv2 -> out_layers.3, conv_shortcut -> skip_connection).
"""

from __future__ import annotations

import functools
import re

import torch

PREFIXES = {
    "sd1": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sd2": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}
# lora_te1_ alone is not one: some SD1.x files spell their only text encoder that way.
SGM_MARKERS = ("lora_te2_", "lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
               "lora_unet_label_emb", "lora_unet_time_embed_")

# Real layouts for resolving names without a base model (module names depend on the block layout, not the sizes;
# built on the meta device: no memory).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


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


def kohya_name(part: str, module: str, kind: str = "sd1", layout: tuple | None = None) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in` (SD1/SD2);
    SDXL UNet modules get their SGM names (`layout` = unet_layout of the UNet, default: the real SDXL's)."""
    prefixes = PREFIXES[kind]
    if part not in prefixes:
        raise ValueError(f"{part!r}: a {kind} LoRA has no such part (kohya keys exist for {', '.join(prefixes)})")
    if part.startswith("text_encoder"):
        module = canonical_text_module(module)
    elif kind == "sdxl":
        module = sgm_unet_name(module, layout or unet_layout(SDXL_UNET))
    return prefixes[part] + module.replace(".", "_")


def canonical_text_module(module: str) -> str:
    """A text-encoder module path as files spell it: `text_model.<path>` for everything inside CLIP's text model
    (transformers 5's CLIPTextModel dropped that level; A1111, ComfyUI and older diffusers expect it), but the
    projection of CLIPTextModelWithProjection (SDXL's second encoder) sits beside the text model: `text_projection`,
    so its kohya key is `lora_te2_text_projection`, the name ComfyUI's key map gives clip_g's projection."""
    module = module.removeprefix("text_model.")
    return module if module.split(".")[0] == "text_projection" else f"text_model.{module}"


def module_names(modules: dict[str, torch.nn.Module], kind: str) -> dict[str, tuple[str, str]]:
    """{kohya name: (part, module path)} for every Linear/Conv2d (peft-wrapped or not) of the given models."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # LoRA and LyCORIS (LoHa/LoKr) wrappers alike

    table: dict[str, tuple[str, str]] = {}
    for part, model in modules.items():
        if part not in PREFIXES[kind] or model is None:
            continue
        layout = unet_layout(model.config) if part == "unet" and kind == "sdxl" else None
        for name, module in model.named_modules():
            parts = name.split(".")
            if not name or "base_layer" in parts or any(p.startswith("lora_") for p in parts):
                continue  # peft's own submodules
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, BaseTunerLayer)):
                continue
            if part.startswith("text_encoder"):
                name = name.removeprefix("text_model.")
            try:
                key = kohya_name(part, name, kind, layout)
            except ValueError:
                continue  # a module SGM has no name for cannot be in a kohya file either
            if table.setdefault(key, (part, name)) != (part, name):
                raise ValueError(f"{key}: ambiguous, names both {table[key][1]!r} and {name!r}")
    return table


@functools.cache
def reference_names(kind: str) -> dict[str, tuple[str, str]]:
    """module_names of the real base of this family (SD1/SD2 share one table: same UNet names, and the
    24-layer OpenCLIP-H encoder covers CLIP-L's 12 layers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if kind == "sdxl":
            models = {"unet": UNet2DConditionModel(**SDXL_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                      "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))}
        else:
            models = {"unet": UNet2DConditionModel(**SD15_UNET),
                      "text_encoder": CLIPTextModel(CLIPTextConfig(**OPENCLIP_H))}
    return module_names(models, "sdxl" if kind == "sdxl" else "sd1")


def kohya_file_kind(keys) -> str:
    """'sdxl' when kohya keys use lora_te2_ or SGM UNet names, else 'sd1' (SD1 and SD2 share the layout)."""
    return "sdxl" if any(k.startswith(SGM_MARKERS) for k in keys) else "sd1"


def diffusers_file_kind(keys, header: dict) -> str:
    """Base family of a diffusers-layout LoRA: from its ss_base_model_version, else from its keys."""
    version = header.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith(("sd_v1", "sd_v2")):
        return "sd2" if version.startswith("sd_v2") else "sd1"
    keys = list(keys)
    if any(k.startswith("text_encoder_2.") or "add_embedding" in k for k in keys) or any(
            re.search(r"transformer_blocks\.[1-9]", k) for k in keys):
        return "sdxl"  # only SDXL has a second encoder and transformer depth > 1
    if any(k.startswith(("unet.down_blocks.0.attentions", "unet.down_blocks.3", "unet.up_blocks.3")) for k in keys):
        return "sd1"
    if any(k.startswith("unet.") for k in keys):
        raise ValueError("cannot tell whether this UNet LoRA is for SD1/SD2 or SDXL (no ss_base_model_version "
                         "metadata); pass --base sd1 or --base sdxl")
    return "sd1"


def peft_key(part: str, module: str) -> str:
    # The canonical diffusers file spelling keeps CLIP's `text_model.` level (as trainer.lora_files.export writes it).
    return f"{part}.{canonical_text_module(module)}" if part.startswith("text_encoder") else f"{part}.{module}"
