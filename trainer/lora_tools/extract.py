"""`lora extract`: a LoRA from the difference of two checkpoints of one base (a fine-tune and its base).

The method of kohya sd-scripts' networks/extract_lora_from_models.py: ΔW = tuned − original per module, a truncated
SVD of each (up = U·S, down = Vh, alpha = rank), 3×3 convolutions only with a conv rank (LoCon). What differs:

- every Linear and 1×1 Conv2d of the denoiser and the LoRA-able text encoders is a candidate (kohya: its LoRA
  network's target modules), so nothing the fine-tune changed is silently dropped;
- min_diff skips single modules whose largest change is ≤ it (kohya: decides once for all text encoders);
- the rank can be chosen per module by resize_lora.py's dynamic methods (trainer.lora_tools.lowrank);
- kohya clamps up and down to their 0.99 quantile; that only makes the product further from ΔW, so it is off by
  default here (clamp_quantile applies it);
- each module's relative error is measured on the result, and the total over every changed module is reported
  (modules left out count as fully lost).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.lora_files.adapter_files import weight_modules
from trainer.lora_tools.deltas import Delta, load_model
from trainer.lora_tools.lowrank import LowRank, low_rank, relative_error

WORST = 5  # modules the summary names


def check_same_base(source: str, tuned: str, original, changed) -> None:
    """Refuse two checkpoints of different families, in one line."""
    if original.family.NAME != changed.family.NAME:
        raise ValueError(f"{tuned}: a {changed.family.LABEL} checkpoint, but {source} is {original.family.LABEL}: "
                         "extract needs a fine-tune and the base it was tuned from")


def module_rank(weight: torch.Tensor, rank: int | None, conv_rank: int) -> int | None | bool:
    """The rank cap of a module: `rank` for Linear and 1×1 convs, `conv_rank` for larger kernels; False: skip it."""
    if weight.ndim == 4 and tuple(weight.shape[2:]) != (1, 1):
        return conv_rank if conv_rank > 0 else False
    return rank


def clamp(result: LowRank, delta: torch.Tensor, quantile: float) -> LowRank:
    """kohya's clamp of up and down to ±(the `quantile` of their values), the error measured again."""
    values = torch.cat([result.up.flatten(), result.down.flatten()])
    sample = values if values.numel() <= 1 << 24 else values[torch.randperm(values.numel())[: 1 << 24]]
    high = float(torch.quantile(sample, quantile))
    up, down = result.up.clamp(-high, high), result.down.clamp(-high, high)
    return LowRank(down=down, up=up, kept=result.kept, error=relative_error(delta, up, down))


def part_deltas(part: str, original, changed, where: tuple[str, str], options: dict) -> tuple[dict, dict, list]:
    """(deltas, {key: {rank, error, norm}}, [(key, ‖ΔW‖, why)] of changed modules left out) of one part."""
    source, tuned = where
    before, after = weight_modules(original), weight_modules(changed)
    missing = sorted(set(before) ^ set(after))
    if missing:
        raise ValueError(f"{tuned}: {part}.{missing[0]} is in only one of the two checkpoints ({source}): "
                         "not a fine-tune of this base")
    deltas, report, left = {}, {}, []
    for name, module in before.items():
        key = f"{part}.{name}"
        weight, other = module.weight.detach(), after[name].weight.detach()
        if weight.shape != other.shape:
            raise ValueError(f"{tuned}: {key} is {tuple(other.shape)}, {source} has {tuple(weight.shape)}: "
                             "not a fine-tune of this base")
        delta = other.float() - weight.float()
        if not bool(delta.any()):
            continue
        norm = float(torch.linalg.vector_norm(delta.double()))
        cap = module_rank(weight, options["rank"], options["conv_rank"])
        if cap is False:
            left.append((key, norm, "3x3 conv (no --conv-rank)"))
            continue
        if float(delta.abs().max()) <= options["min_diff"]:
            left.append((key, norm, "below --min-diff"))
            continue
        result = low_rank(delta, rank=cap, dynamic=options["dynamic"], param=options["param"])
        if options.get("clamp_quantile"):
            result = clamp(result, delta, options["clamp_quantile"])
        deltas[key] = Delta(tuple(weight.shape), result.down, result.up, 1.0)
        report[key] = {"rank": result.rank, "error": result.error, "norm": norm}
    return deltas, report, left


def extract_deltas(source: str, tuned: str, *, rank: int | None, dynamic: str | None, param: float | None,
                   conv_rank: int = 0, min_diff: float = 0.0, text_encoders: bool = True,
                   clamp_quantile: float | None = None, single_file_config: str | None = None) -> tuple:
    """(deltas {part.module: Delta}, the source Base, report dict) without writing anything."""
    if rank is None and dynamic is None:
        raise ValueError(f"{tuned}: give --rank, or --dynamic with --param (and --rank as the largest rank)")
    original, changed = load_model(source, single_file_config), load_model(tuned, single_file_config)
    check_same_base(source, tuned, original, changed)
    parts, other = original.parts(), changed.parts()
    names = list(parts) if text_encoders else [original.family.DENOISER]
    options = dict(rank=rank, dynamic=dynamic, param=param, conv_rank=conv_rank, min_diff=min_diff,
                   clamp_quantile=clamp_quantile)
    deltas, modules, left = {}, {}, []
    for part in names:
        if part not in other:
            raise ValueError(f"{tuned}: has no {part}, {source} has one: not a fine-tune of this base")
        found = part_deltas(part, parts[part], other[part], (source, tuned), options)
        deltas.update(found[0])
        modules.update(found[1])
        left += found[2]
    return deltas, original, {"modules": modules, "left": left}


def total_error(modules: dict, left: list) -> float:
    """‖ΔW − LoRA‖_F / ‖ΔW‖_F over every changed module (those left out count whole)."""
    lost = sum((m["error"] * m["norm"]) ** 2 for m in modules.values()) + sum(n ** 2 for _, n, _ in left)
    whole = sum(m["norm"] ** 2 for m in modules.values()) + sum(n ** 2 for _, n, _ in left)
    return (lost / whole) ** 0.5 if whole else 0.0


def summary_lines(out: Path, family, modules: dict, left: list, error: float) -> list[str]:
    """What extract did, in words: counts, ranks, the total error and the worst modules."""
    ranks = sorted({m["rank"] for m in modules.values()})
    lines = [f"{out}: {len(modules)} modules of a {family.LABEL} base, rank "
             f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}' if ranks else '-'}, "
             f"relative error {error:.2%} of the whole change"]
    worst = sorted(modules.items(), key=lambda kv: -kv[1]["error"])[:WORST]
    lines += [f"  {key}: rank {m['rank']}, error {m['error']:.2%}" for key, m in worst]
    reasons = {}
    for _, _, why in left:
        reasons[why] = reasons.get(why, 0) + 1
    lines += [f"  left out: {n} changed module(s), {why}" for why, n in reasons.items()]
    return lines


def extract(source: str, tuned: str, out: Path, *, rank: int | None, dynamic: str | None, param: float | None,
            conv_rank: int = 0, min_diff: float = 0.0, text_encoders: bool = True, to: str = "kohya",
            overwrite: bool = False, clamp_quantile: float | None = None,
            single_file_config: str | None = None) -> dict:
    """Write the LoRA whose ΔW is `tuned` − `source` at `rank` (or the dynamic method's rank, capped by `rank`) to
    `out` in the `to` layout; returns {out, family, modules: {key: {rank, error}}, error, summary}."""
    from trainer.lora_tools.write import check_output, new_header, write_lora

    out = Path(out)
    check_output(out, overwrite)  # before loading two checkpoints
    deltas, base, report = extract_deltas(source, tuned, rank=rank, dynamic=dynamic, param=param,
                                          conv_rank=conv_rank, min_diff=min_diff, text_encoders=text_encoders,
                                          clamp_quantile=clamp_quantile, single_file_config=single_file_config)
    if not deltas:
        raise ValueError(f"{tuned}: no module differs from {source} by more than --min-diff {min_diff}: "
                         "nothing to extract")
    modules, left = report["modules"], report["left"]
    error = total_error(modules, left)
    operation = {"operation": "extract", "from": Path(source).name, "tuned": Path(tuned).name, "rank": rank,
                 "dynamic": dynamic, "param": param, "conv_rank": conv_rank, "error": round(error, 6)}
    header = new_header({}, operation, max(m["rank"] for m in modules.values()))
    if conv_rank:  # kohya's LoCon switch: loaders read the conv rank from here
        header["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    write_lora(out, deltas, base.kind, to, header, overwrite=overwrite, unet_config=base.unet.config)
    return {"out": str(out), "family": base.kind,
            "modules": {k: {"rank": m["rank"], "error": m["error"]} for k, m in modules.items()},
            "error": error, "summary": "\n".join(summary_lines(out, base.family, modules, left, error))}
