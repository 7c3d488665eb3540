"""What the UNet is conditioned on besides the noisy latent, per base family.

SD1/SD2: the last hidden states of the one CLIP text encoder (what StableDiffusionPipeline feeds at inference).
SDXL (as StableDiffusionXLPipeline.encode_prompt does it): the penultimate hidden states of both encoders,
concatenated; the pooled, projected output of the second; and six "time ids" per image: original size (h, w),
crop top-left (y, x) and target size (h, w), so the model learns which pixels were cropped away. Training with
the image's real original size and crop is what kohya and the diffusers SDXL script do.
"""

from __future__ import annotations

import torch


def encode_text(base, text_encoders: dict[str, torch.nn.Module], captions: list[str],
                device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [B, 77, D], pooled [B, P] for SDXL else None) of `captions`. `text_encoders` maps
    "text_encoder"/"text_encoder_2" to the modules to run (trained, wrapped or frozen)."""
    def ids(tokenizer) -> torch.Tensor:
        return to_device(tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids, device)

    if base.kind != "sdxl":
        return text_encoders["text_encoder"](ids(base.tokenizer))[0], None
    hidden = []
    for name, tokenizer in (("text_encoder", base.tokenizer), ("text_encoder_2", base.tokenizer_2)):
        out = text_encoders[name](ids(tokenizer), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder (with projection) returns text_embeds first
    return torch.cat(hidden, dim=-1), pooled


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Copy a small CPU tensor made this step to `device`. On CUDA through pinned memory and non_blocking: a plain
    copy from pageable memory waits for the GPU to finish all queued work (a host sync every step)."""
    if torch.device(device).type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def sdxl_time_ids(size: tuple[int, int], bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """SDXL's 6 size/crop conditions of an image of `size` (w, h) resized and center-cropped to `bucket` (w, h)
    as trainer.data.images.load_image does it; a flipped image's crop is measured from the other side, like kohya."""
    from trainer.data.images import crop_box

    (w, h), (bw, bh) = size, bucket
    left, top, resized_w, _ = crop_box(size, bucket)
    if flip:
        left = resized_w - left - bw
    return torch.tensor([h, w, top, left, bh, bw], dtype=torch.float32)


def unet_kwargs(pooled: torch.Tensor | None, time_ids: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """Extra UNet forward arguments: SDXL's added conditions, nothing for SD1/SD2."""
    if pooled is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": to_device(time_ids, pooled.device).to(dtype)}}
