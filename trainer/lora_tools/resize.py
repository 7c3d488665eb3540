"""`lora resize`: any LoRA file (any variant, any layout these tools read) as a plain LoRA of another rank.

Each module's ΔW is factored by SVD (trainer.lora_tools.lowrank: a fixed rank, or kohya resize_lora.py's dynamic
methods). A low-rank ΔW = scale·up·down is factored through its factors (QR of up and downᵀ, SVD of the small core),
which gives the same singular values as the SVD of the full ΔW at a fraction of the cost; a full ΔW (LoHa, LoKr,
DoRA's re-normalised change) through the SVD of ΔW itself. A rank at or above a module's true rank is exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from trainer.lora_tools.deltas import Delta, LoraFile, read_lora
from trainer.lora_tools.lowrank import LowRank, choose_rank, low_rank, relative_error


def factor(delta: Delta, rank: int | None, dynamic: str | None, param: float | None) -> LowRank:
    """`delta` as a LoRA of `rank` (or the dynamic method's rank), with the share of ‖ΔW‖_F kept and the measured
    relative error."""
    out, fan_in = delta.shape[0], math.prod(delta.shape[1:])
    if delta.rank is None or delta.rank * 2 > min(out, fan_in):
        return low_rank(delta.weight(), rank, dynamic, param)
    up = delta.up.double().flatten(1) * delta.scale
    down = delta.down.double().flatten(1)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    a, s, bh = torch.linalg.svd(r_up @ r_down.T)
    if float(s[0]) == 0.0:
        return low_rank(delta.weight(), rank, dynamic, param)
    r = choose_rank(s.float(), dynamic, param, rank)
    new_up = ((q_up @ a[:, :r]) * s[:r]).float()
    new_down = (bh[:r] @ q_down.T).float()
    kept = min(1.0, float(s[:r].pow(2).sum() / s.pow(2).sum()) ** 0.5)
    error = relative_error(delta.weight(), new_up, new_down)
    if len(delta.shape) == 4:
        new_up, new_down = new_up.reshape(*new_up.shape, 1, 1), new_down.reshape(r, *delta.shape[1:])
    return LowRank(down=new_down.contiguous(), up=new_up.contiguous(), kept=kept, error=error)


def factor_all(deltas: dict[str, Delta], rank: int | None, dynamic: str | None, param: float | None,
               conv_rank: int | None = None) -> tuple[dict[str, Delta], dict[str, dict], dict]:
    """Every module factored: (new Deltas, {module: {rank, kept, error}}, totals {kept, error} over the whole file:
    sqrt(Σ kept² / Σ ‖ΔW‖²) and sqrt(Σ residual² / Σ ‖ΔW‖²)). `conv_rank`: the rank (with `dynamic`: the cap) of
    3×3 convolutions, kohya resize_lora.py's --new_conv_rank; None: `rank` for every module."""
    if rank is None and dynamic is None:
        raise ValueError("give --rank R, or --dynamic METHOD --param X")
    for name, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be ≥ 1, not {value}")
    out, stats = {}, {}
    norm_sq = kept_sq = residual_sq = 0.0
    for key, delta in deltas.items():
        kernel = len(delta.shape) == 4 and tuple(delta.shape[2:]) != (1, 1)
        low = factor(delta, conv_rank if kernel and conv_rank else rank, dynamic, param)
        out[key] = Delta(delta.shape, low.down, low.up, 1.0)
        norm = float(delta.weight().double().norm())
        norm_sq, kept_sq, residual_sq = norm_sq + norm**2, kept_sq + (low.kept * norm)**2, residual_sq + (low.error * norm)**2
        stats[key] = {"rank_in": delta.rank, "rank": low.rank, "kept": low.kept, "error": low.error}
    total = {"kept": (kept_sq / norm_sq) ** 0.5 if norm_sq else 1.0,
             "error": (residual_sq / norm_sq) ** 0.5 if norm_sq else 0.0}
    return out, stats, total


def output_layout(file: LoraFile, to: str | None) -> str:
    """The layout to write: --to, else the input's (diffusers/peft spellings -> diffusers, kohya/LyCORIS -> kohya)."""
    if to:
        return to
    return "diffusers" if file.layout in ("diffusers", "peft", "diffusers-old") else "kohya"


def stats_lines(stats: dict[str, dict], total: dict, worst: int = 5) -> list[str]:
    """Human lines: the total share kept and error, and the modules that lost most."""
    lines = [f"kept {total['kept']:.2%} of ‖ΔW‖_F overall; relative error {total['error']:.2e}"]
    for key, s in sorted(stats.items(), key=lambda kv: -kv[1]["error"])[:worst]:
        if s["error"] > 0:
            lines.append(f"  {key}: rank {s['rank']}, kept {s['kept']:.2%}, error {s['error']:.2e}")
    return lines


def resize_file(src: Path, out: Path, *, rank: int | None = None, dynamic: str | None = None,
                param: float | None = None, to: str | None = None, model=None, base: str | None = None,
                overwrite: bool = False, conv_rank: int | None = None) -> dict:
    """Write `src` as a plain LoRA of a new rank at `out`; returns what was kept per module and in total."""
    from trainer.lora_files.convert import base_parts
    from trainer.lora_files.kohya_names import unet_config
    from trainer.lora_tools.write import check_output, new_header, write_lora

    check_output(Path(out), overwrite)  # before any work: a refused output must not cost a long SVD
    parts = base_parts(model)
    file = read_lora(src, model=parts, base=base)
    file.require_base()
    deltas, stats, total = factor_all(file.deltas, rank, dynamic, param, conv_rank)
    new_rank = max(s["rank"] for s in stats.values())
    operation = {"op": "resize", "from": Path(src).name, "rank": rank, "conv_rank": conv_rank, "dynamic": dynamic,
                 "param": param,
                 "kept": round(total["kept"], 6), "error": total["error"]}
    layout = output_layout(file, to)
    write_lora(Path(out), deltas, file.family, layout, new_header(file.header, operation, new_rank), overwrite,
               unet_config(parts or {}))
    ranks = sorted({s["rank"] for s in stats.values()})
    summary = [f"{out}: {layout} LoRA, {len(deltas)} modules, rank {ranks[0]}"
               + (f"..{ranks[-1]}" if len(ranks) > 1 else "") + f" (from a {file.variant} {file.layout} file)",
               *stats_lines(stats, total)]
    return {"out": str(out), "layout": layout, "family": file.family, "variant_in": file.variant, "rank": new_rank,
            "kept": total["kept"], "error": total["error"], "modules": stats, "summary": "\n".join(summary)}
