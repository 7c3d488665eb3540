"""CLIP text encoders as the Stable Diffusion families use them: tokenising captions, and how files spell the modules.

No torch import at module level: the web UI imports the families to describe a base.
"""

from __future__ import annotations

# Real text-encoder sizes, for reference models built on the meta device (module names only: no memory).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280)


def token_ids(tokenizer, captions: list[str], device):
    """The captions padded/truncated to the tokenizer's length (77), on `device`."""
    return to_device(tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids, device)


def to_device(tensor, device):
    """Copy a small CPU tensor made this step to `device`. On CUDA through pinned memory and non_blocking: a plain
    copy from pageable memory waits for the GPU to finish all queued work (a host sync every step)."""
    import torch

    if torch.device(device).type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def canonical_text_module(module: str) -> str:
    """A text-encoder module path as files spell it: `text_model.<path>` for everything inside CLIP's text model
    (transformers 5's CLIPTextModel dropped that level; A1111, ComfyUI and older diffusers expect it), but the
    projection of CLIPTextModelWithProjection (SDXL's second encoder) sits beside the text model: `text_projection`,
    so its kohya key is `lora_te2_text_projection`, the name ComfyUI's key map gives clip_g's projection."""
    module = module.removeprefix("text_model.")
    return module if module.split(".")[0] == "text_projection" else f"text_model.{module}"


def kohya_key(prefixes: dict[str, str], family: str, part: str, module: str) -> str:
    """`<prefix of part><module path, . -> _>`, the kohya spelling; text-encoder paths canonical first."""
    if part not in prefixes:
        raise ValueError(f"{part!r}: a {family} LoRA has no such part (kohya keys exist for {', '.join(prefixes)})")
    if part.startswith("text_encoder"):
        module = canonical_text_module(module)
    return prefixes[part] + module.replace(".", "_")
