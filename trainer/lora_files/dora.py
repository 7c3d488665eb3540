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
plain LoRA truncated by SVD (at the rank an error target asks for, never larger than the weights it changes), and
measures what the truncation lost. The magnitude rescales whole rows of W, a full-rank change: often no such file
comes near exact, and then it is not written by default (trainer.lora_files.export).
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps
DORA_SCALE_KEY = "style_lora_dora_scale"  # header entry of kohya files whose dora_scale is written for ComfyUI
DORA_SCALE_NOTE = ("comfyui: dora_scale = m·(‖W‖+eps)/‖W+ΔW‖ per output row (eps = fp32 eps), so ComfyUI/Forge's "
                   "(W+ΔW)·dora_scale/(‖W‖+eps) is peft's DoRA weight (W+ΔW)·m/‖W+ΔW‖")
PLAIN_KEY = "style_lora_plain"  # header entry of a plain-LoRA export: rank and measured relative error (JSON)
PLAIN_SKIPPED_KEY = "style_lora_plain_skipped"  # on a DoRA kohya file: the plain LoRA not written, and why (JSON)


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


def effective_delta(f) -> torch.Tensor:
    """W' − W of one layer's trainer.adapters.factors.Factors: the LoRA ΔW, or for DoRA the whole re-normalised change."""
    from trainer.adapters.factors import delta_weight

    if f.magnitude is None:
        return delta_weight(f, (f.up.shape[0], *f.down.shape[1:])).float().cpu()
    weight = f.weight.double().cpu()  # float64: W' − W cancels most of W
    delta = delta_weight(f, weight.shape).double().cpu()
    return (dora_weight(weight, delta, f.magnitude.double().cpu()) - weight).float()


def _layer_size(f) -> tuple[int, int]:
    """(out, in·kh·kw) of the weight a layer's factors change."""
    return f.up.shape[0], f.down[0].numel()


def plain_lora_tensors(factors: dict, rank: int, kind: str | None, unet_config=None, max_error: float = 0.01,
                       deadline=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every layer's effective ΔW as a plain kohya LoRA of one rank (alpha = rank, scale 1), and what the SVD lost.

    rank 0: the largest rank any layer needs to come within `max_error` (trainer.adapters.compact.choose_rank); a
    given rank is taken as is. Either way never above the rank at which the file (one rank, zero-padded: what every
    loader reads) would hold more numbers than the weights it changes. The report is compact.error_report's, plus
    "rank". `deadline` (trainer.adapters.compact.Deadline): checked before each layer's SVD (raises OutOfTime)."""
    from trainer.adapters.compact import choose_rank, dense_svd, error_report, lost_at
    from trainer.lora_files.fused import kohya_tensors
    from trainer.lora_files.kohya_names import family_of

    sizes = {name: _layer_size(f) for name, f in factors.items()}
    weight_numbers = sum(o * i for o, i in sizes.values())
    cap = max(1, weight_numbers // sum(o + i for o, i in sizes.values()))
    q = min(rank, cap) if rank else cap
    svds, ranks = {}, {}
    for i, (name, f) in enumerate(factors.items()):
        if deadline is not None:
            deadline.check(i, len(factors))
        u, s, vh, total, complete = dense_svd(effective_delta(f).flatten(1), min(q, *sizes[name]))
        svds[name] = u[:, :q], s, vh[:q], total, complete  # every singular value, the vectors the file may keep
        ranks[name] = min(q, s.numel()) if rank else choose_rank(s[:q], q, max_error, lost_at(s, total, q, complete))
    file_rank = max(ranks.values())
    entries, lost, totals = [], {}, {}
    family = family_of(kind)
    for name, f in factors.items():
        u, s, vh, totals[name], complete = svds.pop(name)
        k = min(file_rank, s.numel())
        lost[name] = lost_at(s, totals[name], k, complete)
        root = s[:k].sqrt()
        up, down = torch.zeros(u.shape[0], file_rank), torch.zeros(file_rank, vh.shape[1])
        up[:, :k], down[:k] = u[:, :k] * root, root[:, None] * vh[:k]  # zero rows: one rank in the file
        part, module = name.split(".", 1)
        module = module.removeprefix("base_model.model.")
        if f.down.dim() == 4:
            up, down = up[:, :, None, None], down.reshape(file_rank, *f.down.shape[1:])
        group = {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
                 "alpha": torch.tensor(float(file_rank))}
        entries.append((family.kohya_name(part, module, unet_config), family.kohya_slot(part, module), group))
    numbers = file_rank * sum(o + i for o, i in sizes.values())
    return kohya_tensors(entries), {"rank": file_rank, **error_report(lost, totals, max_error, numbers, weight_numbers)}
