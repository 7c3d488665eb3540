"""Write a diffusers SD3/3.5 pipeline as ONE checkpoint in Stability's layout (sd3.5_medium.safetensors and the like):
the inverse of diffusers' single-file conversion (diffusers/loaders/single_file_utils.py), rule for rule:

  model.diffusion_model.*            convert_sd3_transformer_checkpoint_to_diffusers: Stability's MMDiT names
                                     (trainer.families.sd3.sai_name), q/k/v fused into one `qkv` (torch.chunk(3) there),
                                     qk-norms `ln_q`/`ln_k`, (shift, scale) halves swapped where diffusers swaps them
  first_stage_model.*                convert_ldm_vae_checkpoint: LDM's `down.i.block.j`, reversed `up`, `mid.block_1`,
                                     `attn_1.q` as 1x1 convs (conv_attn_to_linear squeezes them)
  text_encoders.clip_l.transformer.* convert_ldm_clip_checkpoint(..., "text_encoders.clip_l.transformer."): the
  text_encoders.clip_g.transformer.* transformers state dict under a prefix
  text_encoders.t5xxl.transformer.*  convert_sd3_t5_checkpoint_to_diffusers: likewise
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from trainer.families.sd3 import sai_name

MMDIT, VAE = "model.diffusion_model.", "first_stage_model."
TEXT = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
        "text_encoder_3": "text_encoders.t5xxl.transformer."}
_QK_NORM = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
            "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
            "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}


def swap_scale_shift(weight):
    """diffusers' swap_scale_shift swaps two halves: its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_to_sai(state: dict, num_layers: int) -> dict:
    """SD3Transformer2DModel state dict -> Stability's MMDiT names (unprefixed)."""
    out, fused = {}, {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        block = re.match(r"transformer_blocks\.(\d+)\.(.+)", module)
        if key == "pos_embed.pos_embed":  # the patch embedding's position table (a buffer)
            out["pos_embed"] = value
        elif module == "norm_out.linear":  # AdaLayerNormContinuous: diffusers swaps final_layer's halves
            out[f"final_layer.adaLN_modulation.1.{param}"] = swap_scale_shift(value)
        elif block and block[2] == "norm1_context.linear":  # the last block's context is pre-only: swapped too
            last = int(block[1]) == num_layers - 1
            out[f"joint_blocks.{block[1]}.context_block.adaLN_modulation.1.{param}"] = (
                swap_scale_shift(value) if last else value)
        elif block and block[2] in _QK_NORM:
            out[f"joint_blocks.{block[1]}.{_QK_NORM[block[2]]}.{param}"] = value
        else:
            name, slot = sai_name(module)  # ValueError: a module the converter would drop
            if slot is None:
                out[f"{name}.{param}"] = value
            else:
                fused.setdefault(f"{name}.{param}", {})[slot] = value
    for key, parts in fused.items():  # torch.chunk(qkv, 3) in diffusers: q, k, v stacked along the output rows
        assert sorted(parts) == [0, 1, 2], key
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def vae_to_ldm(state: dict, num_up_blocks: int) -> dict:
    """AutoencoderKL state dict -> LDM VAE names (unprefixed)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
        if m:
            if value.ndim == 2:  # LDM's attention projections are 1x1 convs
                value = value[:, :, None, None]
            out[f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"] = value
            continue
        new = key.replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda r: f"mid.block_{int(r[1]) + 1}", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        # the decoder's up blocks run in reverse: diffusers' up_blocks.i is LDM's up.(n - 1 - i)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets",
                     lambda r: f"decoder.up.{num_up_blocks - 1 - int(r[1])}.block", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                     lambda r: f"decoder.up.{num_up_blocks - 1 - int(r[1])}.upsample", new)
        assert new != key or key.startswith(("encoder.conv", "decoder.conv")), f"vae: no LDM name for {key}"
        out[new] = value
    return out


def state(module) -> dict:
    """A module's state dict, tied tensors untied (safetensors stores each tensor once)."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def write_sd3_single_file(folder: str | Path, path: str | Path, text_encoders=tuple(TEXT)) -> Path:
    """The pipeline at `folder` as one Stability-layout .safetensors at `path`, with these of its text encoders."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
    tensors = {MMDIT + k: v for k, v in
               mmdit_to_sai(state(pipe.transformer), pipe.transformer.config.num_layers).items()}
    tensors |= {VAE + k: v for k, v in vae_to_ldm(state(pipe.vae), len(pipe.vae.config.up_block_types)).items()}
    for part, prefix in TEXT.items():
        if part in text_encoders:
            # T5's encoder.embed_tokens (tied to `shared`) is stored too, as in Stability's files
            tensors |= {prefix + k: v for k, v in state(getattr(pipe, part)).items()}
    save_file(tensors, str(path))
    return Path(path)


def real_clip_shapes(folder: str | Path, seed: int = 1) -> Path:
    """Give the tiny pipeline at `folder` the two traits of the real SD3.5 CLIPs that diffusers' single-file loader
    relies on, so the file round-trips exactly:

    - CLIP-L's text_projection is the identity (Stability's reference code pools CLIP-L unprojected; the loader sets
      `torch.eye` whatever the file holds);
    - the CLIPs differ in width (768 vs 1280): the loader tells `clip_l` and `clip_g` apart for each text encoder by
      comparing position-embedding widths, and loads `clip_l` into both when they are equal. The tiny CLIP-G is made
      narrower (16), keeping the pooled width (32 + 32) and the T5 padding (16 + 32 <= 64) the MMDiT expects.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    clip_l = CLIPTextModel.config_class.from_pretrained(folder / "text_encoder")
    model = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(*model.text_projection.weight.shape))
    model.save_pretrained(folder / "text_encoder")
    config = CLIPTextModel.config_class.from_pretrained(folder / "text_encoder_2")
    assert config.hidden_size == clip_l.hidden_size == 32, "tiny_sd3's CLIP widths changed: revisit this helper"
    config.hidden_size, config.intermediate_size = 16, 32
    torch.manual_seed(seed)
    CLIPTextModelWithProjection(config).save_pretrained(folder / "text_encoder_2")
    return folder
