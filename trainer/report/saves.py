"""A run's saves: the `train.save_every` adapters (`<name>-stepNNNNNN…`), the final one and `-best`, listed with what
the run's events say about each step, and the two ways to keep one (`use_save`, `delete_other_saves`).

A save is every file of one stem: `<stem>.safetensors` (kohya layout), `<stem>.diffusers.safetensors` and, for
DoRA, `<stem>.plain.safetensors`. The run's downloads are the final stem `<name>`; "use this save" copies a save's
files over it (the original final is first kept as the save of its own step, so nothing trained is lost until
"delete the other saves"). Both actions are recorded in the run's events.

No torch at module level: the web UI lists saves with it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trainer.events import ADAPTER, REPORT, SAVE_REPORT, SAVE_USED, SAVES_DELETED, STEP, VALIDATION, EventLog, \
    read_events

STEP_STEM = re.compile(r"^(?P<name>.+)-step(?P<step>\d{6})$")
SUFFIXES = (".diffusers.safetensors", ".plain.safetensors", ".safetensors")  # longest first: a stem is what is left


@dataclass
class Save:
    stem: str  # file name without the suffix: "<name>-step000200", "<name>-best" or "<name>"
    kind: str  # "step" | "best" | "final"
    step: int | None  # the training step its weights are from (None: unknown)
    files: list[Path] = field(default_factory=list)
    train_loss: float | None = None
    val_loss: float | None = None
    verdict: str | None = None  # the style report's verdict on this save
    progress: float | None = None  # the report's progress towards the style at strength 1.0
    in_use: bool = False  # the run's downloads are this save's files

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.is_file())

    def label(self) -> str:
        """'step 200', 'best (step 150)', 'final (step 400)': what the grid and the table call it."""
        at = f"step {self.step}" if self.step is not None else "step ?"
        return at if self.kind == "step" else f"{self.kind} ({at})"

    def file(self, layout: str = "diffusers") -> Path | None:
        """The save's diffusers (or kohya) file, None when it has none."""
        path = self.files[0].parent / (self.stem + (".diffusers.safetensors" if layout == "diffusers" else ".safetensors"))
        return path if path in self.files else None


def stem_of(path: Path) -> str:
    name = Path(path).name
    return next(name[: -len(s)] for s in SUFFIXES if name.endswith(s))


def run_name(run_dir: Path) -> str:
    """output.name of the run: the stem of its final files (from config.toml, else the run folder's name)."""
    from trainer.config import ConfigError, load_config

    try:
        return load_config(Path(run_dir) / "config.toml").output.name
    except (OSError, ConfigError):
        return Path(run_dir).name


def _steps_of_files(events: list[dict]) -> dict[str, int]:
    """stem -> the step its latest `adapter` event wrote it at."""
    steps = {}
    for e in events:
        if e.get("type") == ADAPTER:
            for p in e.get("paths", []):
                steps[stem_of(Path(p))] = e.get("step")
    return steps


def list_saves(run_dir: Path, name: str | None = None) -> list[Save]:
    """Every save of a run, by step (the final last of equal steps), with the losses and verdict of its step."""
    run_dir = Path(run_dir)
    name = name or run_name(run_dir)
    events = read_events(run_dir / "events.jsonl")[0]
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(run_dir.glob(f"{glob_escape(name)}*.safetensors")):
        stem = stem_of(p)
        if stem == name or stem == f"{name}-best" or STEP_STEM.match(stem) and STEP_STEM.match(stem)["name"] == name:
            by_stem.setdefault(stem, []).append(p)
    written = _steps_of_files(events)
    used = next((e for e in reversed(events) if e.get("type") == SAVE_USED), None)
    saves = []
    for stem, files in by_stem.items():
        match = STEP_STEM.match(stem)
        kind = "step" if match else "best" if stem.endswith("-best") else "final"
        step = int(match["step"]) if match else written.get(stem)
        if kind == "final" and used:
            step = used.get("step")  # the final files are a copy of the used save
        saves.append(Save(stem, kind, step, files))
    _annotate(saves, events, used)
    order = {"step": 0, "best": 1, "final": 2}
    return sorted(saves, key=lambda s: (s.step if s.step is not None else -1, order[s.kind]))


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _annotate(saves: list[Save], events: list[dict], used: dict | None) -> None:
    """Fill each save's losses (the step's events), verdict (its latest save report) and whether it is in use."""
    train = {e["step"]: e["loss"] for e in events if e.get("type") == STEP and e.get("loss") is not None}
    val = {e["step"]: e["loss"] for e in events if e.get("type") == VALIDATION and e.get("loss") is not None}
    reports = {e.get("stem"): e for e in events if e.get("type") == SAVE_REPORT}
    run_report = next((e for e in reversed(events) if e.get("type") == REPORT), None)
    for s in saves:
        s.train_loss, s.val_loss = train.get(s.step), val.get(s.step)
        report = reports.get(s.stem) or (run_report if s.kind == "final" and not used else None)
        if report:
            s.verdict = report.get("verdict")
            s.progress = (report.get("progress") or {}).get("1.0")
        s.in_use = s.kind == "final" if used is None else (s.stem == used.get("stem") or s.kind == "final")


def find_save(saves: list[Save], key: str) -> Save:
    """The save named by its stem, its label or its step number; ValueError naming the choices otherwise."""
    for s in saves:
        if key in (s.stem, s.label()) or (key.isdigit() and s.step == int(key) and s.kind == "step"):
            return s
    for s in sorted(saves, key=lambda s: s.kind != "final"):  # a bare step only the final or best has: final first
        if key.isdigit() and s.step == int(key):
            return s
    raise ValueError(f"no save {key!r}: this run has {', '.join(s.label() for s in saves) or 'no saves'}")


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)  # a reader (the Runs tab, a download) sees the old file or the new one, never half


def complete_files(save: Save, model: str | None = None) -> list[Path]:
    """Write the kohya or diffusers file a save lacks (converted from the one it has); returns the files written."""
    from trainer.lora_files.convert import convert_file

    written = []
    folder = save.files[0].parent
    kohya, diffusers = folder / f"{save.stem}.safetensors", folder / f"{save.stem}.diffusers.safetensors"
    if kohya.is_file() and not diffusers.is_file():
        written.append(convert_file(kohya, diffusers, "diffusers", model=model))
    elif diffusers.is_file() and not kohya.is_file():
        written.append(convert_file(diffusers, kohya, "kohya", model=model))
    save.files = sorted(set(save.files) | set(written))
    return written


def use_save(run_dir: Path, key: str, model: str | None = None) -> dict:
    """Make a save's files the run's downloads (`<name>.safetensors`, `<name>.diffusers.safetensors`, and `.plain`
    when it has one). The kohya or diffusers file it lacks is written first. The original final is kept as the save
    of its own step the first time. Records a `save_used` event; returns its fields."""
    run_dir = Path(run_dir)
    name = run_name(run_dir)
    saves = list_saves(run_dir, name)
    save = find_save(saves, key)
    if save.kind == "final":
        raise ValueError(f"{save.label()} is already the run's download")
    written = complete_files(save, model)
    final = next((s for s in saves if s.kind == "final"), None)
    events = read_events(run_dir / "events.jsonl")[0]
    kept = []
    if final and not any(e.get("type") == SAVE_USED for e in events) and final.step is not None:
        # the trained final is a save too: kept under its step's name before it is overwritten
        for p in final.files:
            target = run_dir / (f"{name}-step{final.step:06d}" + p.name[len(name):])
            if not target.exists():
                shutil.copyfile(p, target)
                kept.append(target)
    for p in final.files if final else []:
        if not (run_dir / (save.stem + p.name[len(name):])).is_file():
            p.unlink()  # e.g. a .plain file of the final that the chosen save does not have
    copied = []
    for p in save.files:
        dst = run_dir / (name + p.name[len(save.stem):])
        _copy(p, dst)
        copied.append(dst)
    fields = {"stem": save.stem, "step": save.step, "paths": [str(p) for p in copied],
              "converted": [str(p) for p in written], "kept_final": [str(p) for p in kept]}
    EventLog(run_dir / "events.jsonl").emit(SAVE_USED, **fields)
    return fields


def other_saves(run_dir: Path) -> tuple[Save | None, list[Save]]:
    """(the save in use, every other save but the final): what "delete the other saves" would delete."""
    saves = list_saves(run_dir)
    used = next((s for s in saves if s.in_use and s.kind != "final"), None)
    return used, [s for s in saves if s.kind != "final" and s is not used]


def delete_other_saves(run_dir: Path) -> dict:
    """Delete every save but the run's downloads and the save in use; records a `saves_deleted` event with the files
    and the bytes freed. Checkpoints are not saves and stay."""
    run_dir = Path(run_dir)
    _, doomed = other_saves(run_dir)
    files = [p for s in doomed for p in s.files if p.is_file()]
    freed = 0
    for p in files:
        freed += p.stat().st_size
        p.unlink()
    fields = {"stems": [s.stem for s in doomed], "paths": [str(p) for p in files], "bytes": freed}
    EventLog(run_dir / "events.jsonl").emit(SAVES_DELETED, **fields)
    return fields
