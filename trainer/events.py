"""Run events: one JSON object per line in RUN/events.jsonl, appended by the trainer and tailed by the UI.

Append-only and flushed per line, so a reader that remembers its byte offset sees every complete event and a
kill -9 loses at most the line being written (which the reader skips because it has no newline yet).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

STOP_FILE = "stop"  # the UI creates RUN/stop to ask the trainer to save and end early

# The event kinds ("type") of RUN/events.jsonl: written by the trainer, read by app/jobs.py, app/ui.py and the report.
START = "start"  # the run's size, device, variant, fast path (first event after the dataset's)
DATASET = "dataset"  # the dataset summary (trainer/data/summary.py)
PROBLEM = "problem"  # a file skipped or warned about, with the reason
RESUMED = "resumed"  # continued from a checkpoint (or started over: none yet)
FAST_PATH = "fast_path"  # the compiled path's gradient check and whether it is used
STEP = "step"  # one optimizer step: loss, lr, speed, memory
CHECKPOINT = "checkpoint"  # a resumable checkpoint was written
ADAPTER = "adapter"  # adapter files were written (final or every save_every)
SAMPLES = "samples"  # sample images were written
WARNING = "warning"  # an optional step failed; the run goes on
DONE, STOPPED, FAILED = "done", "stopped", "failed"  # how the training ended (the last of these wins)
REPORT_STARTED, REPORT, REPORT_FAILED = "report_started", "report", "report_failed"  # the style report after DONE
VALIDATION_SET, VALIDATION, BEST = "validation_set", "validation", "best"  # held-out loss (trainer/training/validation.py)
# a run's saves (trainer/report/saves.py): the style report on one save, "use this save", "delete the other saves"
SAVE_REPORT_STARTED, SAVE_REPORT, SAVE_REPORT_FAILED = "save_report_started", "save_report", "save_report_failed"
SAVE_USED, SAVES_DELETED = "save_used", "saves_deleted"
ENDS = (DONE, STOPPED, FAILED)
REPORT_ENDS = (REPORT, REPORT_FAILED)


FLUSH_SECONDS = 0.25  # buffered events (per-step progress) reach the file at least this often: 4 writes/s, not 30

# Lines of buffered events not yet written, per file. Kept per path, not per EventLog, so that any unbuffered event
# to the same file (a `failed` written by another EventLog, say) first writes what was buffered: order is kept.
_buffered: dict[Path, list[str]] = {}
_last_write: dict[Path, float] = {}


class EventLog:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.listeners: list = []  # fn(kind, fields) called for every event written (e.g. trainer.training.tracking)

    def emit(self, kind: str, buffered: bool = False, **fields: Any) -> None:
        """Append one event. `buffered`: a frequent event (a training step) that may wait up to FLUSH_SECONDS
        for the next write, so a fast run does not open the file 30 times a second."""
        if self.path is None:
            return
        for listener in self.listeners:
            listener(kind, fields)
        now = time.time()
        lines = _buffered.setdefault(self.path, [])
        lines.append(json.dumps({"time": round(now, 3), "type": kind, **fields}, default=str))
        if not buffered or now - _last_write.get(self.path, 0.0) >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        lines = _buffered.pop(self.path, None) if self.path else None
        if lines:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            _last_write[self.path] = time.time()


@atexit.register
def _flush_all() -> None:
    for path in list(_buffered):
        EventLog(path).flush()


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete events after byte `offset`, and the offset to continue from."""
    path = Path(path)
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # ignore a trailing partial line
    events = []
    for raw in data[:end].splitlines():
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a line torn by a crash; the next run appends after it
    return events, offset + end


_EVENTS: dict[Path, tuple[int, int, list[dict]]] = {}  # events.jsonl -> (inode, bytes read, events so far)
_EVENTS_LOCK = threading.Lock()  # the UI's queue thread and its handlers read at once


def run_events(path: Path) -> list[dict]:
    """Every complete event of an events.jsonl, read on from the byte where the last call stopped: the UI asks every
    second, and the file only grows (a new file, e.g. a re-created run, is read from the start)."""
    key = Path(path).resolve()
    try:
        inode, size = os.stat(key).st_ino, os.stat(key).st_size
    except FileNotFoundError:
        with _EVENTS_LOCK:
            _EVENTS.pop(key, None)
        return []
    with _EVENTS_LOCK:
        known_inode, offset, events = _EVENTS.get(key, (inode, 0, []))
        if known_inode != inode or size < offset:
            offset, events = 0, []
        new, offset = read_events(key, offset)
        events = events + new  # a new list: callers may keep the old one
        _EVENTS[key] = (inode, offset, events)
        return events
