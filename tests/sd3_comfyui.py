"""ComfyUI's SD3 LoRA loading, emulated from its source for tests/test_sd3.py: its key map (comfy/utils.py
mmdit_to_diffusers, comfy/lora.py model_lora_keys_unet / model_lora_keys_clip) and patch (tests.test_export.
comfyui_weight, tests.test_lycoris.comfyui_lycoris), on a StableDiffusion3Pipeline's weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_export import comfyui_weight
from tests.test_lycoris import comfyui_lycoris

FP32_EPS = torch.finfo(torch.float32).eps

# comfy/utils.py MMDIT_MAP_BLOCK and MMDIT_MAP_BASIC (the .weight entries): Stability's name <- diffusers' name
COMFY_BLOCK = {
    "context_block.adaLN_modulation.1": "norm1_context.linear", "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
    "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.adaLN_modulation.1": "norm1.linear", "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k", "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k", "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2"}
COMFY_BASIC = {
    "context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "x_embedder.proj": "pos_embed.proj",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
COMFY_QKV = (("attn.to_{}", "x_block.attn.qkv"), ("attn.add_{}_proj", "context_block.attn.qkv"),
             ("attn2.to_{}", "x_block.attn2.qkv"))
LORA_CLIP_MAP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def mmdit_to_diffusers(config) -> dict[str, tuple[str, tuple | None, bool]]:
    """comfy.utils.mmdit_to_diffusers: diffusers module -> (Stability module, (first row, rows) of a fused qkv or
    None, halves swapped). ComfyUI's offset is depth·64 and its swapped adaLN is block depth−1, with depth =
    x_embedder width // 64: on the real bases that is the hidden size and the last block; the tiny one's width is 32,
    so the hidden size and the last block stand in for them here (test_full_size_* checks the real identity)."""
    offset, blocks = config.num_attention_heads * config.attention_head_dim, config.num_layers
    out = {}
    for i in range(blocks):
        for pattern, qkv in COMFY_QKV:
            for j, c in enumerate("qkv"):
                out[f"transformer_blocks.{i}.{pattern.format(c)}"] = (f"joint_blocks.{i}.{qkv}", (j * offset, offset),
                                                                      False)
        out.update({f"transformer_blocks.{i}.{d}": (f"joint_blocks.{i}.{s}", None, False)
                    for s, d in COMFY_BLOCK.items()})
    out.update({d: (s, None, False) for s, d in COMFY_BASIC.items()})
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, True)  # swap_scale_shift
    out[f"transformer_blocks.{blocks - 1}.norm1_context.linear"] = (
        f"joint_blocks.{blocks - 1}.context_block.adaLN_modulation.1", None, True)
    return out


def sai_weights(transformer, key_map) -> dict[str, torch.Tensor]:
    """The Stability (ComfyUI) state dict of a diffusers MMDiT's mapped weights: q, k, v rows joined into qkv."""
    weights = {}
    for module, (sai, rows, swap) in key_map.items():
        try:
            w = transformer.get_submodule(module).weight.detach()
        except AttributeError:
            continue  # e.g. the last block's to_add_out, a block without attn2
        w = w.double() if w.device.type != "meta" else w
        if rows:
            full = weights.setdefault(sai, w.new_zeros(3 * rows[1], *w.shape[1:]))
            full[rows[0]:rows[0] + rows[1]] = w
        else:
            weights[sai] = torch.cat(w.chunk(2)[::-1]) if swap else w
    return weights


def comfy_unet_keys(weights) -> dict[str, str]:
    return {"lora_unet_" + k.replace(".", "_"): k for k in weights}  # model_lora_keys_unet, SAI spelling


def comfy_clip_keys(text_encoders: dict) -> dict[str, tuple[str, str]]:
    """model_lora_keys_clip for SD3's clip_l and clip_g: kohya key -> (part, module)."""
    out = {}
    for part, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for b in range(text_encoders[part].config.num_hidden_layers):
            out.update({f"{prefix}text_model_encoder_layers_{b}_{c.replace('.', '_')}":
                        (part, f"encoder.layers.{b}.{c}") for c in LORA_CLIP_MAP})
        out[f"{prefix}text_projection"] = (part, "text_projection")
    return out


def te_weight(model, module):
    layer = model.get_submodule(module if module == "text_projection" else f"text_model.{module}")
    return layer.weight.detach().double()


def comfy_deltas(path: Path, pipe) -> dict[tuple[str, str], torch.Tensor]:
    """{(part, diffusers module): W' − W} of a kohya file patched into `pipe`'s weights the way ComfyUI does (every
    key must be consumed: ComfyUI logs the rest as 'lora key not loaded'); fused qkv split back by its offsets."""
    groups: dict[str, dict] = {}
    for key, tensor in load_file(path).items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor.double()
    key_map = mmdit_to_diffusers(pipe.transformer.config)
    sai = sai_weights(pipe.transformer, key_map)
    unet_keys, tes = comfy_unet_keys(sai), {p: getattr(pipe, p) for p in ("text_encoder", "text_encoder_2")}
    clip_keys, sai_delta, out = comfy_clip_keys(tes), {}, {}
    for name, g in groups.items():
        patch = comfyui_lycoris if any(k.startswith(("hada_", "lokr_")) for k in g) else \
            lambda w, g: comfyui_weight(w, g, eps=FP32_EPS)
        if name in unet_keys:
            w = sai[unet_keys[name]]
            sai_delta[unet_keys[name]] = patch(w, g) - w
        else:
            assert name in clip_keys, f"lora key not loaded: {name}"
            w = te_weight(tes[clip_keys[name][0]], clip_keys[name][1])
            out[clip_keys[name]] = patch(w, g) - w
    for module, (name, rows, swap) in key_map.items():
        if name in sai_delta:
            d = sai_delta[name][rows[0]:rows[0] + rows[1]] if rows else sai_delta[name]
            out[("transformer", module)] = torch.cat(d.chunk(2)[::-1]) if swap else d
    return out
