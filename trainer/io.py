"""Atomic file writes: a crash or kill -9 never leaves a half-written config, adapter or checkpoint."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (power loss, not just a killed process). No-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`. `mode`: the
    permissions a plain open() would give (e.g. 0o666, less the umask) instead of the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    if mode is not None:
        os.chmod(tmp, mode & ~current_umask())
    try:
        yield Path(tmp)
        fsync_file(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def seal_jsonl(path: Path) -> None:
    """End a JSON-lines file that a kill -9 left mid-line with a newline, so the torn line stays one bad line
    (skipped by readers) instead of swallowing the next event appended to it."""
    path = Path(path)
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def describe_os_error(err: OSError, what: str = "", with_file: bool = True) -> str:
    """One line for a user: which file, what went wrong, what to do. `what` names the setting or file when the error
    does not carry a file name (or with_file=False: when that name is a temporary the user never saw)."""
    import errno

    where = err.filename if err.filename is not None and with_file else what
    where = f"{where}: " if where else ""
    advice = {
        errno.ENOSPC: "the disk is full; free some space (or use another disk) and try again",
        errno.EDQUOT: "the disk quota is used up; free some space (or use another disk) and try again",
        errno.EISDIR: "is a folder, not a file; give a file path",
        errno.ENOTDIR: "a part of this path is a file, not a folder; pick another path",
        errno.EACCES: "permission denied; pick a place you can write to (or fix the folder's permissions)",
        errno.EPERM: "operation not permitted; pick a place you can write to",
        errno.EROFS: "the file system is read-only; pick another folder",
        errno.ENOENT: "no such file or folder; check the path",
        errno.EEXIST: "already exists; pick another name",
    }.get(err.errno)
    return f"{where}{advice or (err.strerror or str(err) or type(err).__name__)}"


MAX_HEADER_BYTES = 100_000_000  # a real header is kilobytes; more means a broken or hostile file


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes and `__metadata__`), without torch and
    without reading a tensor. Raises ValueError for a file that is not one."""
    import json
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a readable .safetensors file (too short for one)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a readable .safetensors file (its header claims {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable .safetensors file (unreadable header: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a readable .safetensors file (its header is not a table)")
    return header


def make_unique_dir(root: Path, name: str, suffix=None) -> Path:
    """root/<name>, else root/<name>-2, -3 ... (or -<suffix(n)>): created here, exclusively (mkdir fails when the
    folder exists), so an earlier run is never overwritten and two runs started at once never share a folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = root / (name if n == 1 and suffix is None else f"{name}-{suffix(n) if suffix else n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1

