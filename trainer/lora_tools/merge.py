"""`lora merge`: one LoRA whose ΔW is the weighted sum of several files' ΔW.

Exact by default: a module's merged LoRA stacks the inputs' factors (down = [down_1; down_2; ...], up =
[w_1·s_1·up_1, w_2·s_2·up_2, ...]), so its rank is the sum of theirs. With --rank or --dynamic the sum is factored
by SVD (trainer.lora_tools.resize.factor) and the error against the exact sum is measured and reported. Files must
be for one base family; a module only some files change is merged from those.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.lora_tools.deltas import Delta, LoraFile, read_lora
from trainer.lora_tools.resize import factor_all, output_layout, stats_lines


def stack(deltas: list[Delta], weights: list[float]) -> Delta:
    """The exact weighted sum of low-rank Deltas of one module, as one Delta of the summed rank."""
    first = deltas[0]
    down = torch.cat([d.down.float() for d in deltas])
    up = torch.cat([d.up.float() * (d.scale * w) for d, w in zip(deltas, weights)], dim=1)
    return Delta(first.shape, down, up, 1.0)


def weighted_sum(files: list[LoraFile], weights: list[float], exact: bool) -> dict[str, Delta]:
    """{module: Σ w·ΔW}: stacked factors when `exact` (every input low-rank), else full ΔW where needed."""
    keys = sorted({k for f in files for k in f.deltas})
    out = {}
    for key in keys:
        members = [(f.deltas[key], w, f) for f, w in zip(files, weights) if key in f.deltas]
        shapes = {tuple(d.shape) for d, _, _ in members}
        if len(shapes) > 1:
            raise ValueError(f"{key}: the files change it with different shapes {sorted(shapes)} (LoRAs for "
                             "different bases?)")
        if all(d.rank is not None for d, _, _ in members):
            out[key] = stack([d for d, _, _ in members], [w for _, w, _ in members])
        elif exact:
            full = next(f for d, _, f in members if d.rank is None)
            raise ValueError(f"{full.path}: a {full.variant} file changes {key} by a full-rank ΔW, which no exact "
                             "LoRA of a useful size holds; pass --rank R or --dynamic METHOD --param X")
        else:
            total = sum(d.weight() * w for d, w, _ in members)
            out[key] = Delta(members[0][0].shape, full=total)
    return out


def check_one_family(files: list[LoraFile]) -> None:
    """Refuse files for different bases, in one line."""
    from trainer import families

    first = files[0]
    for f in files[1:]:
        if f.family != first.family:
            raise ValueError(f"{f.path} is a LoRA for {families.get(f.family).LABEL}, {first.path} for "
                             f"{families.get(first.family).LABEL}: files for different bases cannot be merged")


def merge_files(items: list[tuple[Path, float]], out: Path, *, rank: int | None = None, dynamic: str | None = None,
                param: float | None = None, to: str | None = None, model=None, base: str | None = None,
                overwrite: bool = False) -> dict:
    """Merge weighted LoRA files into `out`; returns the merged ranks and, when factored, the measured error."""
    from trainer.lora_files.convert import base_parts
    from trainer.lora_files.kohya_names import unet_config
    from trainer.lora_tools.write import check_output, new_header, write_lora

    if len(items) < 1:
        raise ValueError("merge: give at least one FILE[:WEIGHT]")
    check_output(Path(out), overwrite)
    parts = base_parts(model)
    files = [read_lora(path, model=parts, base=base) for path, _ in items]
    check_one_family(files)
    for file in files:
        file.require_base()
    weights = [w for _, w in items]
    exact = rank is None and dynamic is None
    summed = weighted_sum(files, weights, exact)
    stats, total = {}, {"kept": 1.0, "error": 0.0}
    if not exact:
        summed, stats, total = factor_all(summed, rank, dynamic, param)
    new_rank = max(d.rank for d in summed.values())
    operation = {"op": "merge", "files": [[Path(p).name, w] for p, w in items], "rank": rank, "dynamic": dynamic,
                 "param": param, "error": total["error"]}
    layout = output_layout(files[0], to)
    write_lora(Path(out), summed, files[0].family, layout, new_header(files[0].header, operation, new_rank),
               overwrite, unet_config(parts or {}))
    inputs = ", ".join(f"{Path(p).name}×{w:g}" for p, w in items)
    summary = [f"{out}: {layout} LoRA of {inputs}, {len(summed)} modules, rank up to {new_rank}"]
    summary += stats_lines(stats, total) if stats else ["exact: the ranks of the inputs are stacked"]
    return {"out": str(out), "layout": layout, "family": files[0].family, "rank": new_rank, "exact": exact,
            "kept": total["kept"], "error": total["error"], "modules": stats or {k: {"rank": d.rank} for k, d in
                                                                               summed.items()},
            "summary": "\n".join(summary)}
