"""Stable Diffusion 3 / 3.5 (Medium, Large): an MMDiT transformer over 16-channel latents, three text encoders
(CLIP-L and OpenCLIP bigG with projections, and T5-XXL), flow matching (trainer.families.flow).

Detection: the denoiser is an SD3Transformer2DModel (config with `joint_attention_dim` and `caption_projection_dim`);
a single-file checkpoint has `joint_blocks` (Stability's MMDiT names). Medium is the MMDiT-X shape (a second,
image-only attention `attn2` in its first 13 blocks); 3.5 adds RMS qk-norm, which SD3.0 lacks.

Conditioning (as StableDiffusion3Pipeline.encode_prompt): both CLIPs' penultimate hidden states side by side,
zero-padded to T5's width and joined with T5's 256 token states along the sequence; the pooled text is both CLIPs'
projections side by side. T5 is frozen (its outputs are cached per caption); with `model.t5 = "off"` it is not
loaded and its states are zeros, as the pipeline does without it.

Files: diffusers' layout names the denoiser `transformer.` (SD3LoraLoaderMixin); kohya/SAI files use Stability's
MMDiT names as sd-scripts' networks/lora_sd3.py writes them (`lora_unet_joint_blocks_3_x_block_attn_qkv`), where q, k
and v are ONE fused Linear: our separate q/k/v LoRAs become one module whose down is the three downs stacked and whose
up is block-diagonal (trainer.lora_files.kohya fuses and splits, exactly); `lora_te1_`/`lora_te2_` are the CLIPs.

No torch import at module level: the web UI imports the families to describe a base.
"""

from __future__ import annotations

from trainer.families.clip import CLIP_L, OPENCLIP_BIGG, kohya_key, token_ids
from trainer.families.flow import (add_noise, draw_timesteps, loss_weight, target,  # noqa: F401 (flow matching)
                                   training_scheduler, validation_timesteps)
from trainer.families.sd1 import native_size  # noqa: F401 (latent sample size x the VAE's factor, as SD1's)

NAME = "sd3"
LABEL = "SD 3.5"
PIPELINE_CLASS = "StableDiffusion3Pipeline"
DENOISER = "transformer"
DENOISER_CLASS = "SD3Transformer2DModel"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the CLIPs: LoRA-able
TOKENIZERS = ("tokenizer", "tokenizer_2")
FROZEN_TEXT_ENCODERS = ("text_encoder_3",)  # T5: conditions, never trained (cached per caption)
# diffusers' train_dreambooth_lora_sd3.py: the joint attention of both streams ("attn." keeps Medium's attn2 out)
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
KOHYA_PREFIXES = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_LAYOUT = "sd3"
KOHYA_VERSION = "5-large"  # ss_base_model_version of a file that does not say its size (kohya_version below)
V2 = False
# diffusers reads no kohya SD3 keys; Forge reads no diffusers SD3 keys and ComfyUI reads them at alpha = rank (it
# ignores diffusers' adapter metadata); A1111 has no SD3 (docs/sd35.md)
KOHYA_TOOLS = "ComfyUI and Forge (Stability's MMDiT names, fused qkv)"
DIFFUSERS_TOOLS = "diffusers (`pipe.load_lora_weights`) and this app's Preview"
KOHYA_NOTE = ("alpha = rank in every module, the trained scale folded in; diffusers reads no SD3 kohya keys: "
              "use the `.diffusers.safetensors` file there")
DIFFUSERS_NOTE = (" (ComfyUI and Forge: use the `.safetensors` file; Forge reads no diffusers SD3 keys, ComfyUI reads "
                  "them without their alpha)")
# lora.blocks: the MMDiT's joint blocks, as sd-scripts' networks/lora_sd3.py selects them (train_block_indices)
BLOCKS_HELP = "block.N: the MMDiT's transformer_blocks[N] (kohya: joint_blocks_N)"
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length, what the preview and the report sample with
T5_CACHE_SIZE = 4096  # captions whose T5 states are kept (shuffled captions would grow it without end)

# Stability's MMDiT names (ComfyUI's comfy.utils.mmdit_to_diffusers, diffusers' single-file SD3 converter) of the
# diffusers modules inside a joint block; (name, slot) where q, k, v share one fused `qkv` Linear.
_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
}
_TOP = {
    "context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
}
# SD3.5 Large's MMDiT (stabilityai/stable-diffusion-3.5-large transformer/config.json) with Medium's attn2 in the
# first 13 blocks: the union of both bases' module names, for reading kohya files without a base model.
REFERENCE_MMDIT = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)


# ----------------------------------------------------------------------------- detection


def matches_configs(unet_config: dict, components: set[str]) -> bool:
    return "joint_attention_dim" in unet_config and "caption_projection_dim" in unet_config


def matches_checkpoint_keys(keys: set[str]) -> bool:
    return any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys)


def matches_version(version: str) -> bool:
    return version in {v for v, _ in _SIZES.values()} or version.startswith("sd3")


def matches_kohya_keys(keys: set[str]) -> bool:
    return any(k.startswith(("lora_unet_joint_blocks_", "lora_unet_context_embedder", "lora_unet_x_embedder",
                             "lora_unet_final_layer", "lora_te3_")) for k in keys)


def matches_diffusers_keys(keys: set[str]) -> bool:
    return any(k.startswith("transformer.transformer_blocks.") or k.startswith("transformer.context_embedder")
               for k in keys)


def label(unet_config: dict) -> str:
    """'SD 3.5 Medium' (MMDiT-X: dual attention), 'SD 3.5 Large' (qk-norm, plain joint blocks), 'SD 3 Medium'."""
    if unet_config.get("dual_attention_layers"):
        return "SD 3.5 Medium"
    return "SD 3.5 Large" if unet_config.get("qk_norm") else "SD 3 Medium"


# ----------------------------------------------------------------------------- loading and conditioning


def pipeline_kwargs(model_cfg) -> dict:
    """model.t5 = "off": T5 and its tokenizer are not loaded (about 9 GB in bf16)."""
    return {"text_encoder_3": None, "tokenizer_3": None} if model_cfg.t5 == "off" else {}


def pipeline(base, unet, text_encoders: dict):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=unet, scheduler=base.sample_scheduler, vae=base.vae,
                                    tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, tokenizer_3=base.tokenizer_3,
                                    text_encoder_3=base.text_encoder_3, **text_encoders)


def t5_states(base, captions: list[str], device, dtype):
    """T5's last hidden states [B, 256, D] of `captions` (zeros without T5), cached per caption: T5 is frozen."""
    import torch

    width = base.unet.config.joint_attention_dim
    if base.text_encoder_3 is None:
        return torch.zeros((len(captions), T5_TOKENS, width), device=device, dtype=dtype)
    cache = base.frozen_text_cache
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    if missing:
        with torch.no_grad():
            ids = base.tokenizer_3(missing, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            states = base.text_encoder_3(ids.to(base.text_encoder_3.device))[0]
        for caption, state in zip(missing, states):
            if len(cache) >= T5_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[caption] = state
    return torch.stack([cache[c] for c in captions]).to(device, dtype)


def encode_text(base, text_encoders: dict, captions: list[str], device):
    """(joint text states [B, 77 + 256, D_T5], pooled [B, P_L + P_G]) as StableDiffusion3Pipeline.encode_prompt."""
    import torch

    hidden, pooled = [], []
    for name, tokenizer in (("text_encoder", base.tokenizer), ("text_encoder_2", base.tokenizer_2)):
        out = text_encoders[name](token_ids(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    t5 = t5_states(base, captions, clip.device, clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def predict(unet, noisy, timesteps, hidden, pooled, image_sizes: list, dtype):
    """The MMDiT's velocity for a batch at timesteps t = 1000·σ."""
    return unet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden.to(dtype),
                pooled_projections=pooled.to(dtype)).sample


def scale_latents(vae, sample):
    """SD3's VAE latents are shifted, then scaled: (z − shift_factor)·scaling_factor."""
    return (sample - vae.config.shift_factor) * vae.config.scaling_factor


# ----------------------------------------------------------------------------- files


def sai_name(module: str) -> tuple[str, int | None]:
    """diffusers MMDiT module path -> (Stability's name, slot in a fused qkv or None)."""
    if module in _TOP:
        return _TOP[module], None
    parts = module.split(".")
    if parts[0] == "transformer_blocks" and len(parts) > 2:
        name, slot = _BLOCK.get(".".join(parts[2:]), (None, None))
        if name is not None:
            return f"joint_blocks.{parts[1]}.{name}", slot
    raise ValueError(f"transformer.{module}: no Stability MMDiT (kohya SD3) name for this module")


def kohya_name(part: str, module: str, unet_config=None) -> str:
    """MMDiT modules get Stability's names (q, k and v of one attention share their fused qkv's name)."""
    if part == DENOISER:
        module = sai_name(module)[0]
    return kohya_key(KOHYA_PREFIXES, NAME, part, module)


def kohya_slot(part: str, module: str) -> tuple[int, int] | None:
    """(where `module`'s output rows sit, of how many) in the fused weight its kohya name stands for: q (0, 3),
    k (1, 3), v (2, 3); None for a module of its own (or one without a kohya name: kohya_name says why)."""
    try:
        slot = sai_name(module)[1] if part == DENOISER else None
    except ValueError:
        return None
    return None if slot is None else (slot, 3)


def block_names(unet_config) -> tuple[str, ...]:
    """The lora.blocks names of this MMDiT (its config): block.0 … block.N."""
    return tuple(f"block.{i}" for i in range(unet_config["num_layers"]))


def block_of(module: str) -> str | None:
    """`transformer_blocks.3.attn.to_q` -> `block.3`; None outside the joint blocks (embedders, the final layer)."""
    level, _, rest = module.partition(".")
    index = rest.split(".", 1)[0]
    return f"block.{index}" if level == "transformer_blocks" and index.isdigit() else None


def reference_models() -> dict:
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {"transformer": SD3Transformer2DModel(**REFERENCE_MMDIT),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, projection_dim=768)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))}


# sd-scripts' names of the three sizes: ss_base_model_version (library/sd3_utils.py: the MMDiT's model_type) and the
# ModelSpec architecture (library/sai_model_spec.py)
_SIZES = {"SD 3.5 Large": ("5-large", "stable-diffusion-3-5-large"),
          "SD 3.5 Medium": ("5-medium", "stable-diffusion-3-5-medium"),
          "SD 3 Medium": ("medium", "stable-diffusion-3-medium")}


def kohya_version(unet_config=None) -> str:
    """ss_base_model_version as sd-scripts writes it for this size (Large when the size is not known)."""
    return _SIZES[label(unet_config)][0] if unet_config else KOHYA_VERSION


def modelspec_architecture(v_prediction: bool, unet_config=None) -> str:
    """kohya library/sai_model_spec.py's SD3 architectures, + '/lora' (Large when the size is not known)."""
    return _SIZES[label(unet_config) if unet_config else "SD 3.5 Large"][1] + "/lora"


def default_resolution(v_prediction: bool) -> int:
    return 1024


def build_tiny(folder, seed: int = 0):
    from trainer.families.tiny_sd3 import build_tiny_sd35

    return build_tiny_sd35(folder, seed)
