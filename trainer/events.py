"""Run events: one JSON object per line in RUN/events.jsonl, appended by the trainer and tailed by the UI.

Append-only and flushed per line, so a reader that remembers its byte offset sees every complete event and a
kill -9 loses at most the line being written (which the reader skips because it has no newline yet).
"""

from __future__ import annotations

import atexit
import json
import time
from pathlib import Path
from typing import Any

STOP_FILE = "stop"  # the UI creates RUN/stop to ask the trainer to save and end early


FLUSH_SECONDS = 0.25  # buffered events (per-step progress) reach the file at least this often: 4 writes/s, not 30

# Lines of buffered events not yet written, per file. Kept per path, not per EventLog, so that any unbuffered event
# to the same file (a `failed` written by another EventLog, say) first writes what was buffered: order is kept.
_buffered: dict[Path, list[str]] = {}
_last_write: dict[Path, float] = {}


class EventLog:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.listeners: list = []  # fn(kind, fields) called for every event written (e.g. trainer.tracking)

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
