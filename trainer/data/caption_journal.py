"""The write lock and the undo history of a dataset folder's captions.

Every operation that changes captions (captioning with a model, a bulk edit, the UI's Save captions) holds the
folder's lock for its whole length, so two operations never interleave, and records what it changes in a journal
of its own, FOLDER/.caption-undo/NNNNNN.json: each caption file's bytes before and its text after. Undo takes the
newest journal, puts back each file the operation changed (a file changed again since is left alone, and named),
and deletes that journal: the one before it is the next undo. Journals stay until undone or cleared. No torch.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from trainer.io import atomic_path, atomic_write_text

UNDO_DIR = ".caption-undo"  # hidden: the dataset scan, uploads and run zips skip dot entries
LOCK_FILE = "lock"
LISTED = 5  # file names shown in a message before "..."
CAPTION_MODE = 0o666  # less the umask, as any editor would write a text file


class EditError(ValueError):
    """A caption edit that cannot run; the message names the folder, file or option."""


class Undone(NamedTuple):
    label: str
    restored: list[str]  # caption files put back, relative to the folder
    changed_since: list[str]  # files the operation changed that were changed again later: left as they are
    finished: bool  # False: the operation was interrupted (killed) before it finished

    def message(self) -> str:
        text = f"'{self.label}' undone: {len(self.restored)} caption files restored"
        if not self.finished:
            text += " (that operation was interrupted before it finished)"
        if self.changed_since:
            names = ", ".join(self.changed_since[:LISTED]) + (" ..." if len(self.changed_since) > LISTED else "")
            text += f"; {len(self.changed_since)} changed again since and left as they are: {names}"
        return text


@contextmanager
def caption_lock(folder: Path, label: str) -> Iterator[None]:
    """Hold FOLDER's caption lock for one operation (across threads and processes); refuse when another holds it."""
    import fcntl

    folder = Path(folder)
    if not folder.is_dir():
        raise EditError(f"{folder}: not a folder")
    (folder / UNDO_DIR).mkdir(exist_ok=True)
    with open(folder / UNDO_DIR / LOCK_FILE, "a+", encoding="utf-8") as fh:  # closing it releases the lock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another operation"
            raise EditError(f"{folder}: captions are being changed by {holder}; wait until it finishes, "
                            "then try again") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"'{label}' (process {os.getpid()})")
        fh.flush()
        yield


def start_undo(label: str) -> dict:
    """A new undo record for one operation; pass it to every write_captions call of that operation."""
    return {"label": label, "time": time.time(), "finished": None, "files": {}}


def _journals(folder: Path) -> list[Path]:
    return sorted((folder / UNDO_DIR).glob("[0-9]*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)


def _new_journal(folder: Path) -> str:
    """The next journal's file name, created here exclusively (two writers never share one)."""
    (folder / UNDO_DIR).mkdir(exist_ok=True)
    journals = _journals(folder)
    n = int(journals[-1].stem) + 1 if journals and journals[-1].stem.isdigit() else 1
    while True:
        try:
            with open(folder / UNDO_DIR / f"{n:06d}.json", "x"):
                return f"{n:06d}.json"
        except FileExistsError:
            n += 1


def record(folder: Path, undo: dict, old: dict[str, bytes | None], new: dict[str, str]) -> None:
    """Save, before the files are written, each file's bytes before this operation (once) and its new text."""
    for rel, text in new.items():
        entry = undo["files"].setdefault(rel, {"old": None if old[rel] is None else
                                               old[rel].decode("utf-8", "surrogateescape")})
        entry["new"] = text
    if "journal" not in undo:
        undo["journal"] = _new_journal(folder)
    # ASCII JSON: a non-UTF-8 old caption travels as escaped surrogates and comes back byte for byte
    atomic_write_text(folder / UNDO_DIR / undo["journal"], json.dumps(undo, indent=1))


def finish_undo(folder: Path, undo: dict) -> None:
    """Mark the operation finished (an operation that wrote nothing has no journal)."""
    if "journal" in undo:
        undo["finished"] = time.time()
        atomic_write_text(Path(folder) / UNDO_DIR / undo["journal"], json.dumps(undo, indent=1))


def _read_journal(path: Path) -> dict:
    try:
        undo = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(undo.get("files"), dict):
            raise ValueError("no 'files'")
        return undo
    except (OSError, ValueError, AttributeError) as err:
        raise EditError(f"{path}: unreadable undo record ({err}); delete it to undo the ones before it") from None


def undo_last(folder: Path, is_caption_path) -> Undone:
    """Put back what the newest recorded operation changed. `is_caption_path(path)`: whether undo may write it."""
    folder = Path(folder)
    journals = _journals(folder)
    if not journals:
        raise EditError(f"{folder}: nothing to undo")
    path = journals[-1]
    undo = _read_journal(path)
    for rel in undo["files"]:
        if not is_caption_path(folder / rel):
            raise EditError(f"{path}: refuses to touch '{rel}' (not a caption file inside {folder})")
    restored, changed_since = [], []
    for rel, entry in undo["files"].items():
        target = folder / rel
        now = target.read_bytes() if target.is_file() else None
        if not isinstance(entry, dict) or now != (entry.get("new", "").strip() + "\n").encode("utf-8"):
            changed_since.append(rel)
        elif entry.get("old") is None:
            target.unlink()
            restored.append(rel)
        else:
            with atomic_path(target, CAPTION_MODE) as tmp:  # exactly the old bytes, even an encoding we could not edit
                tmp.write_bytes(entry["old"].encode("utf-8", "surrogateescape"))
            restored.append(rel)
    path.unlink()
    return Undone(str(undo.get("label", "edit")), restored, changed_since, bool(undo.get("finished")))


def clear_undo(folder: Path) -> int:
    """Forget the undo history of FOLDER's captions; returns how many operations it held."""
    journals = _journals(Path(folder))
    for path in journals:
        path.unlink()
    return len(journals)
