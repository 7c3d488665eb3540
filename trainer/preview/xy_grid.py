"""The X/Y grid: one image per (x, y) cell, each cell one ordinary `generate` with its own settings, composed into a
labelled PNG whose text chunks hold the settings.

The grid is planned here as plain data (`plan`): every cell is the request a single Generate would send (prompt,
seed, adapter files and weights, image settings), so a cell is the same image as that Generate, bit for bit. Who draws
the cells is the caller's: the web UI sends each cell to the preview worker (progress and cancel between cells), the
CLI calls an in-process Previewer. Both compose with `compose` and write with `save_png`, so they write the same PNG.

No torch here: the web UI plans and composes with it (PIL only).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

# axis -> what it varies. "saves": which adapter file; "strength": its weight; "prompts": the prompt ({trigger}
# replaced); "seeds": the seed; "weight2": the second adapter's weight.
AXES = {"saves": "save", "strength": "strength", "prompts": "prompt", "seeds": "seed", "weight2": "second adapter weight"}
ALIASES = {"save": "saves", "strengths": "strength", "prompt": "prompts", "seed": "seeds", "second": "weight2",
           "none": "", "": ""}
TEXT_KEY = "style_lora_grid"  # PNG text chunk: the grid's settings as JSON
LABEL_MIN_CELL = 128  # cells smaller than this (the 32 px demo base) are enlarged by a whole factor, nearest-neighbour
SETTINGS = ("negative", "steps", "guidance", "width", "height")


class GridError(ValueError):
    """A grid that cannot be drawn as asked; the message says which axis or value."""


def axis_name(name: str | None) -> str:
    """The canonical axis name ('' = no axis); GridError for an unknown one."""
    key = (name or "").strip().lower()
    key = ALIASES.get(key, key)
    if key and key not in AXES:
        raise GridError(f"unknown grid axis {name!r}: pick one of {', '.join(AXES)}")
    return key


def parse_values(axis: str, text: str | list) -> list:
    """An axis's values from text: numbers separated by commas (strength, weight2, seeds), prompts one per line (or
    separated by '|'), saves by name. A list is taken as it is."""
    if isinstance(text, list):
        items = text
    elif axis == "prompts":
        items = [p.strip() for p in str(text).replace("|", "\n").splitlines()]
    else:
        items = [v.strip() for v in str(text).replace(";", ",").split(",")]
    items = [v for v in items if v != ""]
    if axis in ("strength", "weight2", "seeds"):
        try:
            items = [int(v) if axis == "seeds" else float(v) for v in items]
        except (TypeError, ValueError):
            raise GridError(f"{AXES[axis]} axis: {text!r} is not a comma-separated list of "
                            f"{'whole numbers' if axis == 'seeds' else 'numbers'}") from None
    return items


def plan(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells of a grid, row by row: each {'row', 'col', 'request'} where request is what a single Generate
    sends: prompt, seed, files {name: path}, adapters {name: weight} and the image settings.

    spec: x, x_values, y, y_values (y may be ''), saves {name: path} (the adapter when saves is not an axis: the first),
    strength, seed, prompt, trigger, adapter2 [name, path] or None, weight2, and SETTINGS."""
    x, y = axis_name(spec.get("x")), axis_name(spec.get("y"))
    if not x:
        raise GridError("pick an X axis")
    if x == y:
        raise GridError(f"X and Y are both {AXES[x]}: pick two different axes")
    xs, ys = list(spec.get("x_values") or []), list(spec.get("y_values") or []) if y else [None]
    for axis, values in ((x, xs), (y, ys)):
        if axis and not values:
            raise GridError(f"the {AXES[axis]} axis has no values")
    saves = dict(spec.get("saves") or {})
    if not saves:
        raise GridError("no adapter: pick a run with saves or an adapter")
    for axis, values in ((x, xs), (y, ys)):
        missing = [v for v in values if axis == "saves" and v not in saves]
        if missing:
            raise GridError(f"save axis: no save named {missing[0]!r} (saves: {', '.join(saves)})")
    if "weight2" in (x, y) and not spec.get("adapter2"):
        raise GridError("the second adapter weight axis needs a second adapter")
    cells = []
    for r, yv in enumerate(ys):
        for c, xv in enumerate(xs):
            cells.append({"row": r, "col": c, "request": cell_request(spec, {x: xv, **({y: yv} if y else {})})})
    return cells


def cell_request(spec: dict[str, Any], at: dict[str, Any]) -> dict[str, Any]:
    """One cell's generate request: the spec's settings with the axes' values at this cell put in."""
    save = at.get("saves", next(iter(spec["saves"])))
    prompt = at.get("prompts", spec.get("prompt", ""))
    request = {"prompt": str(prompt).replace("{trigger}", spec.get("trigger") or "").strip(),
               "seed": int(at.get("seeds", spec.get("seed", 0))),
               "files": {save: str(spec["saves"][save])},
               "adapters": {save: float(at.get("strength", spec.get("strength", 1.0)))}}
    if spec.get("adapter2"):
        name2, path2 = spec["adapter2"]
        if name2 == save:
            raise GridError(f"the second adapter {name2!r} is also a save of the grid: pick another one")
        request["files"][name2] = str(path2)
        request["adapters"][name2] = float(at.get("weight2", spec.get("weight2", 0.5)))
    request.update({k: spec[k] for k in SETTINGS if k in spec})
    return request


def labels(spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(x labels, y labels) as drawn on the image."""
    def label(axis: str, v) -> str:
        if axis == "saves":
            return str((spec.get("save_labels") or {}).get(v, v))
        if axis in ("strength", "weight2"):
            return f"{'2nd weight' if axis == 'weight2' else 'strength'} {v:g}"
        if axis == "seeds":
            return f"seed {v}"
        return str(v).replace("{trigger}", spec.get("trigger") or "").strip()

    x, y = axis_name(spec.get("x")), axis_name(spec.get("y"))
    return [label(x, v) for v in spec["x_values"]], [label(y, v) for v in spec.get("y_values") or []] if y else []


def run(cells: list[dict], draw: Callable[[dict], tuple[Any, dict]],
        on_cell: Callable[[int, int, dict], None] | None = None,
        cancelled: Callable[[], bool] | None = None) -> tuple[list, list[dict]]:
    """Draw every cell with `draw(request) -> (PIL image, timings)`, in order; `on_cell(done, total, timings)` after
    each; `cancelled()` is asked before each cell (True: stop, the images so far are returned)."""
    images, times = [], []
    for k, cell in enumerate(cells):
        if cancelled and cancelled():
            break
        t0 = time.perf_counter()
        image, t = draw(cell["request"])
        t = {**t, "cell_ms": round((time.perf_counter() - t0) * 1000, 1)}
        images.append(image)
        times.append(t)
        if on_cell:
            on_cell(k + 1, len(cells), t)
    return images, times


def _fit(draw, text: str, width: int, font) -> str:
    """`text` cut with '…' to fit `width` pixels (a long prompt must not run into the next column)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def scale_of(cell_size: tuple[int, int]) -> int:
    """The whole enlargement factor of a cell (1 for cells of LABEL_MIN_CELL px or more)."""
    return max(1, LABEL_MIN_CELL // max(cell_size))


def compose(images: list, cols: int, x_labels: list[str], y_labels: list[str], x_title: str = "",
            y_title: str = ""):
    """The labelled sheet: a header band with the x labels, a left band with the y labels, cells in row order
    (enlarged by scale_of, nearest-neighbour: every drawn pixel kept exactly). Missing cells (cancelled) stay white."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = images[0].size
    k = scale_of((w, h))
    cw, ch = w * k, h * k
    rows = max(1, len(y_labels))
    font = ImageFont.load_default(size=12)
    top, left = 34, (max(90, min(220, cw)) if y_labels else 0)
    sheet = Image.new("RGB", (left + cols * cw, top + rows * ch), "white")
    pen = ImageDraw.Draw(sheet)
    pen.text((left + 4, 2), f"x: {x_title}" + (f"   y: {y_title}" if y_title else ""), fill="gray", font=font)
    for c, text in enumerate(x_labels):
        pen.text((left + c * cw + 4, 18), _fit(pen, text, cw - 8, font), fill="black", font=font)
    for r, text in enumerate(y_labels):
        pen.text((4, top + r * ch + ch // 2 - 6), _fit(pen, text, left - 8, font), fill="black", font=font)
    for i, image in enumerate(images):
        cell = image.convert("RGB")
        if k > 1:
            cell = cell.resize((cw, ch), Image.Resampling.NEAREST)
        sheet.paste(cell, (left + (i % cols) * cw, top + (i // cols) * ch))
    return sheet


def cell_box(sheet_size: tuple[int, int], cols: int, rows: int, row: int, col: int, cell_size: tuple[int, int],
             has_y: bool) -> tuple[int, int, int, int]:
    """Where cell (row, col) lies on a composed sheet (left, top, right, bottom), in sheet pixels."""
    k = scale_of(cell_size)
    cw, ch = cell_size[0] * k, cell_size[1] * k
    left = sheet_size[0] - cols * cw if has_y else 0
    top = sheet_size[1] - rows * ch
    return left + col * cw, top + row * ch, left + (col + 1) * cw, top + (row + 1) * ch


def settings_text(spec: dict[str, Any], times: list[dict] | None = None) -> dict[str, str]:
    """The PNG text chunks: the grid's settings as JSON (TEXT_KEY) and a readable 'parameters' line."""
    public = {k: v for k, v in spec.items() if k not in ("saves", "adapter2")}
    public["saves"] = {name: str(path).rsplit("/", 1)[-1] for name, path in (spec.get("saves") or {}).items()}
    if spec.get("adapter2"):
        public["adapter2"] = [spec["adapter2"][0], str(spec["adapter2"][1]).rsplit("/", 1)[-1]]
    public["x_labels"], public["y_labels"] = labels(spec)
    if times:
        public["cell_ms"] = [t.get("cell_ms") for t in times]
    line = (f"{spec.get('prompt', '')}\nNegative prompt: {spec.get('negative', '')}\nSteps: {spec.get('steps')}, "
            f"CFG scale: {spec.get('guidance')}, Seed: {spec.get('seed')}, Size: {spec.get('width')}x"
            f"{spec.get('height')}, Lora strength: {spec.get('strength')}, X: {spec.get('x')}, Y: {spec.get('y') or '-'}")
    return {TEXT_KEY: json.dumps(public, sort_keys=True), "parameters": line}


def save_png(sheet, path, spec: dict[str, Any], times: list[dict] | None = None) -> None:
    """Write the sheet as PNG with settings_text in its text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings_text(spec, times).items():
        info.add_text(key, value)
    sheet.save(path, format="PNG", pnginfo=info)


def draw_grid(spec: dict[str, Any], draw: Callable[[dict], tuple[Any, dict]], out=None,
              on_cell: Callable[[int, int, dict], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> tuple[Any, list[dict], bool]:
    """Plan, draw and compose a grid (and write it to `out` when given). Returns (sheet, timings, complete)."""
    cells = plan(spec)
    images, times = run(cells, draw, on_cell, cancelled)
    if not images:
        return None, times, False
    x_labels, y_labels = labels(spec)
    y = axis_name(spec.get("y"))
    sheet = compose(images, len(x_labels), x_labels, y_labels, AXES[axis_name(spec["x"])], AXES[y] if y else "")
    if out is not None:
        save_png(sheet, out, spec, times)
    return sheet, times, len(images) == len(cells)
