"""The Saves tab's content as plain values, and its actions: the saves table, the grid drawn cell by cell through the
preview worker (progress and cancel between cells), the style report on saves as a queued child process, "use this
save" and "delete the other saves". No gradio, no torch: the grid is planned and composed by
trainer/preview/xy_grid.py (PIL only); anything that needs torch runs in `python -m trainer` child processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from app import jobs, preview_client
from trainer.events import SAVE_REPORT, SAVE_REPORT_FAILED, SAVE_REPORT_STARTED
from trainer.preview.xy_grid import AXES, GridError, draw_grid
from trainer.report.save_grid import run_spec
from trainer.report.saves import delete_other_saves, list_saves, other_saves

COLUMNS = ["save", "step", "train loss", "val loss", "verdict", "progress (1.0)", "size", "in use"]
_REPORTS: dict[str, subprocess.Popen] = {}  # run folder -> its running `trainer report` child (one at a time)


def _num(x: float | None, fmt: str = "{:.4f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "—"


def saves_table(run_dir: Path | None) -> list[list[Any]]:
    """One row per save: label, step, losses at that step, the style verdict, size, whether it is the download."""
    if run_dir is None:
        return []
    rows = []
    for s in list_saves(run_dir):
        rows.append([s.label(), s.step if s.step is not None else "—", _num(s.train_loss), _num(s.val_loss),
                     s.verdict or "—", _num(s.progress, "{:.0%}"), f"{s.bytes / 1e6:.1f} MB",
                     "yes" if s.in_use else ""])
    return rows


def save_choices(run_dir: Path | None) -> list[tuple[str, str]]:
    return [(s.label(), s.stem) for s in list_saves(run_dir)] if run_dir else []


def report_state(run_dir: Path, events: list[dict]) -> str:
    """A line about the save reports: running, or the last one's outcome."""
    proc = _REPORTS.get(str(run_dir))
    last = next((e for e in reversed(events) if e.get("type") in (SAVE_REPORT_STARTED, SAVE_REPORT,
                                                                   SAVE_REPORT_FAILED)), None)
    if proc is not None and proc.poll() is None:
        at = f" (now: {last.get('stem')})" if last and last["type"] == SAVE_REPORT_STARTED else ""
        return f"Style reports running{at}…"
    if last and last["type"] == SAVE_REPORT_FAILED:
        return f"Style report of {last.get('stem')} failed: {last.get('reason')}"
    return ""


def start_reports(outputs: Path, run_dir: Path, which: str) -> str:
    """Queue the style report on one save (its stem) or all: one `python -m trainer report` child per run at a time."""
    key = str(run_dir)
    proc = _REPORTS.get(key)
    if proc is not None and proc.poll() is None:
        return "Style reports are already running for this run; they are queued one after the other."
    log = open(run_dir / "save-reports.log", "ab")
    _REPORTS[key] = subprocess.Popen([sys.executable, "-m", "trainer", "report", str(run_dir), "--save", which],
                                     stdout=log, stderr=subprocess.STDOUT, env=jobs.child_env(outputs), cwd=Path.cwd())
    log.close()
    return f"Style report on {'every save' if which == 'all' else which} started (RUN/save-reports.log)."


def wait_reports(run_dir: Path, timeout: float | None = None) -> int | None:
    proc = _REPORTS.get(str(run_dir))
    return proc.wait(timeout) if proc is not None else None


def use(outputs: Path, run_dir: Path, stem: str) -> str:
    """'Use this save' in a child process (writing a missing kohya or diffusers file needs torch)."""
    proc = subprocess.run([sys.executable, "-m", "trainer", "saves", str(run_dir), "--use", stem], capture_output=True,
                          text=True, env=jobs.child_env(outputs), cwd=Path.cwd(), timeout=600)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")] or ["error: use this save failed"]
        raise ValueError(lines[-1].removeprefix("error: "))
    fields = json.loads(proc.stdout.strip().splitlines()[-1])
    made = f"; written for it: {', '.join(Path(p).name for p in fields['converted'])}" if fields["converted"] else ""
    return f"The run's downloads are now **{stem}** (step {fields['step']}){made}."


def delete_question(run_dir: Path) -> str:
    used, doomed = other_saves(run_dir)
    if not doomed:
        return ""
    size = sum(s.bytes for s in doomed)
    keep = f"the downloads and {used.label()}" if used else "the downloads (the final adapter)"
    return (f"Delete {len(doomed)} saves ({', '.join(s.label() for s in doomed)}), {size / 1e6:.1f} MB? "
            f"Kept: {keep}. This cannot be undone.")


def delete(run_dir: Path) -> str:
    fields = delete_other_saves(run_dir)
    return f"Deleted {len(fields['stems'])} saves: {fields['bytes'] / 1e6:.1f} MB freed."


# ----------------------------------------------------------------------------- the grid


def grid_spec(run_dir: Path, form: dict[str, Any], second: tuple[str, str] | None) -> dict[str, Any]:
    """The grid spec from the tab's fields (axes, their values, the fixed strength/seed/prompt, image settings)."""
    values = {"saves": form.get("saves") or None, "strength": form.get("strengths"), "prompts": form.get("prompts"),
              "seeds": form.get("seeds"), "weight2": form.get("weights2")}
    prompts = [p for p in str(form.get("prompts") or "").splitlines() if p.strip()]
    return run_spec(run_dir, form["x"], form.get("y") or "", {k: v for k, v in values.items() if v},
                    prompt=prompts[0] if prompts else None, strength=float(form.get("strength", 1.0)),
                    seed=int(form.get("seed") or 0), adapter2=list(second) if second else None,
                    weight2=float(form.get("weight2", 0.5)), steps=int(form["steps"]),
                    guidance=float(form["guidance"]))


def draw_through_worker(outputs: Path, spec: dict[str, Any], out: Path, on_cell: Callable[[int, int, dict], None],
                        cancelled: Callable[[], bool]) -> tuple[Any, list[dict], bool]:
    """Draw every cell as one `generate` request to the preview worker of the run's base: the same request a
    single Generate sends, so a cell is that image."""
    from PIL import Image

    worker = preview_client.get_worker(spec["base"], outputs)
    busy = preview_client.training_run(outputs)
    if busy and worker.ready and worker.ready.get("device") != "cpu":
        raise preview_client.PreviewError(f"training run {busy} is using the GPU; draw the grid when it ends")

    def draw(request: dict):
        reply = worker.request("generate", out=str(preview_client._image_path(outputs)), **request)
        with Image.open(reply["image"]) as im:
            return im.convert("RGB"), {"swap_ms": reply["swap_ms"], "gen_ms": reply["gen_ms"]}

    return draw_grid(spec, draw, out=out, on_cell=on_cell, cancelled=cancelled)


class GridJob:
    """One grid being drawn in a thread; the tab polls `progress` and may `cancel` between cells."""

    def __init__(self, outputs: Path, spec: dict[str, Any], out: Path):
        self.done, self.total, self.times = 0, len(spec["x_values"]) * max(1, len(spec["y_values"])), []
        self.out, self.error, self.complete, self.finished = out, "", False, threading.Event()
        self._cancel = threading.Event()
        threading.Thread(target=self._run, args=(outputs, spec), daemon=True, name="saves-grid").start()

    def _run(self, outputs: Path, spec: dict[str, Any]) -> None:
        def on_cell(done: int, total: int, t: dict) -> None:
            self.done, self.total = done, total
            self.times.append(t)
        try:
            _, _, self.complete = draw_through_worker(outputs, spec, self.out, on_cell, self._cancel.is_set)
        except (GridError, preview_client.PreviewError, OSError, ValueError) as err:
            self.error = str(err).splitlines()[0]
        finally:
            self.finished.set()

    def cancel(self) -> None:
        self._cancel.set()

    def status(self) -> str:
        per = sum(t["cell_ms"] for t in self.times) / len(self.times) if self.times else None
        swap = sum(t["swap_ms"] for t in self.times) / len(self.times) if self.times else None
        timing = f" · {per:.0f} ms per cell (swap {swap:.1f} ms)" if per is not None else ""
        if self.error:
            return f"**Could not draw the grid**: {self.error}"
        if not self.finished.is_set():
            return f"Drawing cell {min(self.done + 1, self.total)}/{self.total}…{timing}"
        if not self.complete:
            return f"Cancelled after {self.done}/{self.total} cells{timing}" if self.done else "Cancelled."
        return f"Grid done: {self.total} cells{timing}. The PNG holds its settings (text chunks)."


AXIS_CHOICES = [(f"{name} ({what})", name) for name, what in AXES.items()]
