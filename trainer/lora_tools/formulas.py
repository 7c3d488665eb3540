"""ΔW of one module as the consumers compute it, from a file's tensors: a LoRA's scale·up·down, DoRA's re-normalised
change (ComfyUI/Forge's formula for a kohya dora_scale, peft's for a magnitude vector), LoHa and LoKr (ComfyUI's
LyCORIS formulas; peft's for its own LoKr layout). Read by trainer.lora_tools.deltas.
"""

from __future__ import annotations

import math

import torch

from trainer.lora_tools.lora_file import Delta


def low_rank_delta(group: dict[str, torch.Tensor], down_key: str, up_key: str, scale: float) -> Delta:
    down, up = group[down_key].float(), group[up_key].float()
    shape = (up.shape[0], *down.shape[1:])
    return Delta(shape, down.contiguous(), up.contiguous(), scale)


def dora_delta(delta: Delta, scale: torch.Tensor, weight: torch.Tensor, comfy: bool) -> Delta:
    """The effective ΔW = W' − W of a DoRA module. comfy: ComfyUI/Forge's weight_decompose on a kohya dora_scale
    (output axis: divided by the ORIGINAL weight's row norm + eps; input axis: by the column norm of W + ΔW);
    otherwise peft's (W + ΔW)·m/‖W + ΔW‖ per output row."""
    from trainer.lora_files.dora import EPS, dora_weight, row_norm

    w, d = weight.double(), delta.weight().double()
    if not comfy:
        return Delta(delta.shape, full=(dora_weight(w, d, scale.double()) - w).float())
    combined = w + d
    if scale.shape[0] == w.shape[0]:
        norm = row_norm(w)
    else:  # input axis: the norm of each input column of W + ΔW
        norm = row_norm(combined.transpose(0, 1)).transpose(0, 1)
    return Delta(delta.shape, full=(combined * scale.double().reshape(norm.shape) / (norm + EPS) - w).float())


def lycoris_delta(name: str, group: dict[str, torch.Tensor], shape: tuple[int, ...] | None) -> tuple[Delta, int, float]:
    """ΔW of a LoHa or LoKr module by ComfyUI's formulas (comfy/weight_adapter): LoHa (w1a·w1b)∘(w2a·w2b)·alpha/r with
    r = w1b's rows; LoKr kron(w1, w2)·alpha/dim only when a factor is decomposed (dim = its rank), else scale 1."""
    alpha = float(group["alpha"]) if "alpha" in group else None
    if "hada_w1_a" in group:
        missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - group.keys()
        if missing:
            raise ValueError(f"{name}: LoHa module without {', '.join(sorted(missing))}")
        w1 = group["hada_w1_a"].double() @ group["hada_w1_b"].double().flatten(1)
        w2 = group["hada_w2_a"].double() @ group["hada_w2_b"].double().flatten(1)
        rank = group["hada_w1_b"].shape[0]
        full = w1 * w2 * ((alpha if alpha is not None else rank) / rank)
    else:
        factors, dim = [], None
        for w in ("lokr_w1", "lokr_w2"):
            if w in group:
                factors.append(group[w].double())
            elif f"{w}_a" in group and f"{w}_b" in group:
                factors.append(group[f"{w}_a"].double() @ group[f"{w}_b"].double().flatten(1))
                dim = group[f"{w}_b"].shape[0]
            else:
                raise ValueError(f"{name}: LoKr module without {w} (or {w}_a/{w}_b)")
        w1, w2 = factors
        if len(shape or ()) == 4 and w2.dim() == 2 and w2.numel() * w1.numel() == math.prod(shape):
            w2 = w2.reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        full = torch.kron(w1, w2) * (alpha / dim if dim is not None and alpha is not None else 1.0)
        rank = dim or 0
    if shape is None or math.prod(shape) != full.numel():
        shape = tuple(full.shape)
    return Delta(shape, full=full.float().reshape(shape)), rank, alpha


def peft_lokr(name: str, group: dict, metadata: dict) -> tuple[str, Delta, int, float]:
    """("part.module", ΔW, r, alpha) of one module of peft's LoKr layout: peft scales kron(w1, w2) by alpha/r always
    (peft/tuners/lokr/layer.py), with r and alpha per module from the part's config and its patterns."""
    from trainer.lora_files.kohya import pattern_value

    part, _, module = name.partition(".")
    module = module.removeprefix("text_model.")
    config = {k.removeprefix(part + "."): v for k, v in metadata.items() if k.startswith(part + ".")}
    if "r" not in config:
        raise ValueError(f"{name}: a LoKr module without its peft config (lora_adapter_metadata) to scale it")
    rank = pattern_value(config.get("rank_pattern"), part, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), part, module, config["alpha"])
    raw, _, _ = lycoris_delta(name, group, None)  # no alpha in the group: kron(w1, w2) unscaled
    return f"{part}.{module}", Delta(raw.shape, full=raw.full * (alpha / rank)), rank, float(alpha)
