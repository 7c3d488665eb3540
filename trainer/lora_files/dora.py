"""DoRA in the files other tools read, and any run as a plain LoRA of a chosen rank (truncated SVD).

peft's DoRA weight is W' = (W + ΔW)·m/‖W + ΔW‖, the norm taken per output row (Conv2d: per output channel over
in×kh×kw). What the consumers do with a kohya `dora_scale` s of shape [out, 1(, 1, 1)] (read in their sources):
- ComfyUI and Forge (`weight_decompose`, output-axis branch): W' = (W + ΔW)·s/(‖W‖ + eps), the row norm of the
  ORIGINAL weight, eps = finfo(dtype).eps of the dtype they patch in (fp32 on CPU, fp16 on most GPUs); at strength t
  they blend W + t·(W' − W).
- LyCORIS' own output-axis DoRA: W' = (W + ΔW)·s/‖W + ΔW‖, i.e. s = m.
- A1111 1.10 implements the input axis only: an [out, 1] scale broadcasts against its column norm, silently wrong.
- kohya's merge_lora.py ignores it.
So the kohya file carries s = m·(‖W‖ + eps)/‖W + ΔW‖ (eps of fp32): ComfyUI's formula then gives peft's weight.
The header says so (DORA_SCALE_KEY); this project's readers invert it with the base weights.

For every tool that cannot apply DoRA, `plain_lora_tensors` writes the effective ΔW = W' − W of every layer as a
plain LoRA truncated by SVD at a chosen rank, and measures what the truncation lost.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps
DORA_SCALE_KEY = "style_lora_dora_scale"  # header entry of kohya files whose dora_scale is written for ComfyUI
DORA_SCALE_NOTE = ("comfyui: dora_scale = m·(‖W‖+eps)/‖W+ΔW‖ per output row (eps = fp32 eps), so ComfyUI/Forge's "
                   "(W+ΔW)·dora_scale/(‖W‖+eps) is peft's DoRA weight (W+ΔW)·m/‖W+ΔW‖")
PLAIN_KEY = "style_lora_plain"  # header entry of a plain-LoRA export: rank and measured relative error (JSON)


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖weight‖ per output row (Conv2d: per output channel), shaped [out, 1(, 1, 1)] to broadcast."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))


def comfy_dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The [out, 1(, 1, 1)] dora_scale for which ComfyUI's (W + ΔW)·s/(‖W‖ + eps) equals peft's (W + ΔW)·m/‖W + ΔW‖.
    Computed in float64 and rounded once: W' ≈ W·s/‖W‖, so every ulp of s costs eps·‖W‖ of ΔW."""
    weight = weight.double()
    m = magnitude.double().reshape(row_norm(weight).shape)
    return (m * (row_norm(weight) + EPS) / row_norm(weight + delta.double())).float().contiguous()


def magnitude_from_comfy_scale(scale: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """peft's magnitude m [out] back from a dora_scale written by comfy_dora_scale (same W and ΔW)."""
    weight = weight.double()
    norm = row_norm(weight + delta.double()) / (row_norm(weight) + EPS)
    return (scale.double().reshape(norm.shape) * norm).flatten().float()


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """peft's merged DoRA weight (W + ΔW)·m/‖W + ΔW‖, in the dtype of W + ΔW."""
    combined = weight + delta
    return combined * magnitude.to(combined.dtype).reshape(row_norm(combined).shape) / row_norm(combined)


def truncated_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up [out, k(, 1, 1)], down [k, in(, kh, kw)], ‖ΔW − up·down‖², ‖ΔW‖²) of the best rank-k approximation
    (k = min(rank, out, in·kh·kw)), the singular values split evenly between the factors."""
    matrix = delta.flatten(1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up, down = u[:, :k] * root, root[:, None] * vh[:k]
    lost = float(s[k:].double().pow(2).sum())
    if delta.dim() == 4:
        up, down = up[:, :, None, None], down.reshape(k, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), lost, float(s.double().pow(2).sum())


def effective_delta(f) -> torch.Tensor:
    """W' − W of one layer's trainer.adapters.factors.Factors: the LoRA ΔW, or for DoRA the whole re-normalised change."""
    from trainer.adapters.factors import delta_weight

    if f.magnitude is None:
        return delta_weight(f, (f.up.shape[0], *f.down.shape[1:])).float().cpu()
    weight = f.weight.double().cpu()  # float64: W' − W cancels most of W
    delta = delta_weight(f, weight.shape).double().cpu()
    return (dora_weight(weight, delta, f.magnitude.double().cpu()) - weight).float()


def plain_lora_tensors(factors: dict, rank: int, kind: str | None,
                       unet_config=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every layer's effective ΔW as a plain kohya LoRA of one rank (alpha = rank, scale 1), and what the SVD lost:
    {"rank", "rel_error": {part: ‖ΔW − ΔW_k‖/‖ΔW‖ over the part}, "max_layer_rel_error", "worst_layer"}."""
    from trainer.lora_files.kohya_names import family_of

    pieces, lost, total, worst = {}, {}, {}, (0.0, "")
    for full_name, f in factors.items():
        part, name = full_name.split(".", 1)
        up, down, miss, norm = truncated_lora(effective_delta(f), rank)
        pieces[family_of(kind).kohya_name(part, name.removeprefix("base_model.model."), unet_config)] = (up, down)
        lost[part], total[part] = lost.get(part, 0.0) + miss, total.get(part, 0.0) + norm
        layer_error = (miss / norm) ** 0.5 if norm else 0.0
        worst = max(worst, (layer_error, full_name))
    file_rank = max(down.shape[0] for _, down in pieces.values())
    tensors = {}
    for key, (up, down) in pieces.items():
        pad = file_rank - down.shape[0]  # a layer smaller than the rank: zero rows keep one rank in the file
        tensors[f"{key}.lora_down.weight"] = torch.cat([down, down.new_zeros(pad, *down.shape[1:])]).contiguous()
        tensors[f"{key}.lora_up.weight"] = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], 1).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(file_rank))
    report = {"rank": file_rank,
              "rel_error": {p: (lost[p] / total[p]) ** 0.5 if total[p] else 0.0 for p in lost},
              "max_layer_rel_error": worst[0], "worst_layer": worst[1]}
    return tensors, report
