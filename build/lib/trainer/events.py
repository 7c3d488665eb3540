"""Run events: one JSON object per line in RUN/events.jsonl, appended by the trainer and tailed by the UI.

Append-only and flushed per line, so a reader that remembers its byte offset sees every complete event and a
kill -9 loses at most the line being written (which the reader skips because it has no newline yet).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

STOP_FILE = "stop"  # the UI creates RUN/stop to ask the trainer to save and end early


class EventLog:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None

    def emit(self, kind: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": round(time.time(), 3), "type": kind, **fields}, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


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
