"""A grid over a run's saves: the grid spec of trainer/preview/xy_grid.py filled from the run (its saves, trigger, base
and sample settings), and `python -m trainer grid`'s headless drawing on an in-process Previewer.

No torch at module level: the web UI builds its specs with `run_spec` and draws through the preview worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import load_config
from trainer.preview.xy_grid import GridError, axis_name, parse_values
from trainer.report.saves import find_save, list_saves

DEFAULT_VALUES = {"strength": "0.5, 1.0", "seeds": "0, 1, 2", "weight2": "0, 0.5, 1.0"}


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's base, trigger, first sample prompt and image settings (what its samples were drawn with)."""
    cfg = load_config(Path(run_dir) / "config.toml")
    prompt = (cfg.sample.prompts or ["{trigger}"])[0]
    return {"base": cfg.model.path, "trigger": cfg.data.trigger, "prompt": prompt,
            "negative": cfg.sample.negative_prompt, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
            "width": cfg.sample.width or cfg.data.resolution, "height": cfg.sample.height or cfg.data.resolution}


def run_spec(run_dir: Path, x: str, y: str = "", values: dict[str, Any] | None = None,
             **settings: Any) -> dict[str, Any]:
    """A grid spec over a run. `values`: axis -> its values as text or list (saves by stem, label or step; default:
    every save, or DEFAULT_VALUES); `settings`: overrides of run_settings and the fixed values (strength, seed,
    prompt, adapter2 = [name, path], weight2). Prompts may hold {trigger}."""
    run_dir = Path(run_dir)
    x, y = axis_name(x), axis_name(y)
    values = dict(values or {})
    saves = list_saves(run_dir)
    usable = [s for s in saves if s.file() is not None]
    if not usable:
        raise GridError(f"{run_dir.name}: no saves with a diffusers file to draw")
    spec: dict[str, Any] = {**run_settings(run_dir), "strength": 1.0, "seed": 0, "adapter2": None, "weight2": 0.5}
    spec.update({k: v for k, v in settings.items() if v is not None})
    chosen = usable
    if "saves" in (x, y) and values.get("saves"):
        chosen = [find_save(usable, str(v)) for v in parse_values("saves", values["saves"])]
    elif "saves" not in (x, y):
        chosen = [next((s for s in usable if s.kind == "final"), usable[-1])]  # the run's downloads by default
    spec["saves"] = {s.stem: str(s.file()) for s in chosen}
    spec["save_labels"] = {s.stem: s.label() for s in chosen}
    for axis, key in ((x, "x"), (y, "y")):
        spec[key] = axis
        if axis == "saves":
            spec[f"{key}_values"] = list(spec["saves"])
        elif axis == "prompts":
            spec[f"{key}_values"] = parse_values(axis, values.get("prompts") or [spec["prompt"]])
        elif axis:
            spec[f"{key}_values"] = parse_values(axis, values.get(axis) or DEFAULT_VALUES[axis])
        else:
            spec[f"{key}_values"] = []
    return spec


def draw_headless(spec: dict[str, Any], out: Path, base: str | None = None, device: str | None = None,
                  progress=print) -> dict[str, Any]:
    """Draw `spec` with an in-process Previewer on the run's base and write the PNG; returns a summary."""
    from trainer.preview.previewer import Previewer
    from trainer.preview.xy_grid import draw_grid

    pv = Previewer(base or spec["base"], device=device)

    def draw(request: dict):
        for name, path in request["files"].items():
            pv.load_adapter(path, name)
        kw = {k: request[k] for k in ("prompt", "negative", "steps", "guidance", "seed", "width", "height")
              if k in request}
        return pv.generate(adapters=request["adapters"], **kw)

    def on_cell(done: int, total: int, t: dict) -> None:
        progress(f"cell {done}/{total}: {t['cell_ms']:.0f} ms (swap {t['swap_ms']:.1f} ms)")

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet, times, _ = draw_grid(spec, draw, out=Path(out), on_cell=on_cell)
    return {"out": str(out), "size": list(sheet.size), "cells": len(times),
            "ms_per_cell": round(sum(t["cell_ms"] for t in times) / len(times), 1)}
