"""Uploads into a run's dataset folder: type, size and count limits, sanitized names, safe zip extraction
(no '..', absolute paths or symlinks), and the caption grid's rows. No gradio, no torch."""

from __future__ import annotations

import os
import re
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from trainer.data import caption_edit as ce
from trainer.data.concepts import CONCEPT_FILE
from trainer.data.dataset import IMAGE_EXTENSIONS, folder_repeats, read_caption_bytes
from trainer.io import describe_os_error

IMAGE_EXTS = set(IMAGE_EXTENSIONS)  # the trainer's list (PIL only, no torch), so an accepted upload can train
CAPTION_EXTS = {".txt"}
MAX_FILE_BYTES = 50 * 2**20  # one image or caption
MAX_FILES = 1000  # images + captions in one dataset
MAX_DATASET_BYTES = 4 * 2**30  # everything in one dataset
MAX_ZIP_BYTES = 1 * 2**30  # uncompressed total of one zip
MAX_ZIP_RATIO = 100  # expanded / compressed size of a zip, and of each entry over RATIO_MIN_BYTES (zip bombs)
RATIO_MIN_BYTES = 1 * 2**20  # below this a file may compress better (captions, flat test images)
MAX_DEPTH = 3  # folders inside the dataset (kohya '10_name/' folders)


class UploadError(ValueError):
    """An uploaded file that was refused; the message names the file and the reason."""


def sanitize_name(name: str, max_len: int = 100) -> str:
    """A safe file or folder name from the last path part: [A-Za-z0-9._-], no leading dot, lowercase
    extension, never empty."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    if not dot or not re.fullmatch(r"[A-Za-z0-9]{1,8}", ext) or not stem.strip("."):
        stem, ext = name, ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "file"
    ext = ext.lower()
    stem = stem[: max_len - len(ext) - 1]
    return f"{stem}.{ext}" if ext else stem


def safe_relpath(name: str) -> PurePosixPath:
    """Sanitize every part of a relative path; refuse absolute paths, '..', too deep nesting and kohya 'N_name'
    folders whose repeat count is over the trainer's limit."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise UploadError(f"{name}: absolute path refused")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UploadError(f"{name}: path with '..' refused")
    if not parts:
        raise UploadError(f"{name!r}: empty name")
    if len(parts) - 1 > MAX_DEPTH:
        raise UploadError(f"{name}: nested deeper than {MAX_DEPTH} folders")
    rel = PurePosixPath(*[sanitize_name(p) for p in parts])
    if refused := folder_repeats(rel.parent.as_posix(), 1)[1]:  # '99999999999_x/': refused here, not at training
        raise UploadError(f"{name}: {refused}")
    return rel


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


# ----------------------------------------------------------------------------- uploads


def _check_kind(rel: PurePosixPath) -> None:
    if rel.name == CONCEPT_FILE:  # a subfolder's trigger/prefix/repeats (trainer/data/concepts.py), read as TOML only
        return
    if rel.suffix not in IMAGE_EXTS | CAPTION_EXTS:
        raise UploadError(f"{rel.name}: file type '{rel.suffix or 'none'}' refused "
                          f"(images {', '.join(sorted(IMAGE_EXTS))}, captions .txt, or a .zip of both)")


def _usage(dataset: Path) -> tuple[int, int]:
    """(files, bytes) in the dataset now."""
    sizes = [p.stat().st_size for p in dataset.rglob("*") if p.is_file()] if dataset.is_dir() else []
    return len(sizes), sum(sizes)


def _target(dataset: Path, rel: PurePosixPath, size: int) -> Path:
    """Where `rel` goes, after the checks that need no data: type, size, quotas, a name taken by a folder (or a
    folder name taken by a file), escaping the dataset. Raises UploadError."""
    _check_kind(rel)
    if size > MAX_FILE_BYTES:
        raise UploadError(f"{rel}: {size / 2**20:.1f} MiB is over the {MAX_FILE_BYTES // 2**20} MiB limit")
    target = dataset / rel
    for folder in reversed(rel.parents[:-1]):  # each folder on the way, outermost first
        if (dataset / folder).exists() and not (dataset / folder).is_dir():
            raise UploadError(f"{rel}: the dataset holds a file named '{folder}' where this needs a folder "
                              "(it already exists in the dataset); rename one of them or start a new dataset")
    if target.is_dir():
        raise UploadError(f"{rel}: a folder of that name already exists in the dataset (from an earlier zip?); "
                          "rename the file or start a new dataset")
    if not _inside(target.parent if target.parent.exists() else dataset, dataset):
        raise UploadError(f"{rel}: would be written outside the dataset folder")
    files, used = _usage(dataset)
    if not target.exists() and files >= MAX_FILES:
        raise UploadError(f"{rel}: the dataset already holds {MAX_FILES} files (the limit)")
    if used + size > MAX_DATASET_BYTES:
        raise UploadError(f"{rel}: the dataset would grow past {MAX_DATASET_BYTES // 2**30} GiB (the limit)")
    return target


def _store(dataset: Path, rel: PurePosixPath, data_source, size: int) -> Path:
    """Write one file transactionally: to a hidden temporary name beside the target, checked to hold exactly the
    `size` bytes it declared, then renamed. A refused or broken file never replaces (or empties) a good one."""
    target = _target(dataset, rel, size)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        copied = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := data_source.read(1 << 20):
                copied += len(chunk)
                if copied > size:  # never more than declared: the quotas were checked against the declared sizes
                    break
                out.write(chunk)
        if copied != size:
            held = "more" if copied > size else copied
            raise UploadError(f"{rel}: holds {held} bytes, not the {size} its size field says (a damaged or forged "
                              "archive); not stored: re-create the zip")
        if target.is_symlink():
            target.unlink()
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def zip_quota_problem(infos: list[zipfile.ZipInfo], label: str) -> str:
    """Why an archive is refused as a whole before anything is extracted (expanded size, entry count, compression
    ratio), or "". Each entry is then held to its declared size while it is written (_store)."""
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if total > MAX_ZIP_BYTES:
        return (f"{label}: {total / 2**20:.0f} MiB uncompressed is over the {MAX_ZIP_BYTES // 2**20} MiB limit; "
                "nothing was extracted (split it into smaller zips)")
    if len(infos) > MAX_FILES:
        return f"{label}: {len(infos)} files is over the {MAX_FILES} file limit; nothing was extracted"
    for where, size, compressed in [(label, total, packed),
                                    *((f"{label}:{i.filename}", i.file_size, i.compress_size) for i in infos)]:
        if size > RATIO_MIN_BYTES and size > MAX_ZIP_RATIO * max(compressed, 1):
            return (f"{where}: expands {size // max(compressed, 1)}x ({compressed / 2**20:.2f} MiB to "
                    f"{size / 2**20:.0f} MiB), over the {MAX_ZIP_RATIO}x compression ratio limit (a zip bomb?); "
                    "nothing was extracted")
    return ""


def _extract_zip(dataset: Path, zip_path: Path, label: str) -> tuple[list[Path], list[str]]:
    stored, problems = [], []
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        return [], [f"{label}: not a valid zip file ({err})"]
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if quota := zip_quota_problem(infos, label):
            return [], [quota]
        for info in infos:
            where = f"{label}:{info.filename}"
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                problems.append(f"{where}: symlink refused")
                continue
            name = info.filename
            if PurePosixPath(name.replace("\\", "/")).name.startswith(".") or "__MACOSX" in name:
                continue  # OS litter (.DS_Store, macOS resource forks)
            try:
                rel = safe_relpath(name)
                with zf.open(info) as src:
                    stored.append(_store(dataset, rel, src, info.file_size))
            except UploadError as err:
                problems.append(f"{label}: {err}")
            except (zipfile.BadZipFile, RuntimeError, EOFError) as err:  # RuntimeError: encrypted member
                problems.append(f"{where}: cannot extract ({err}); not stored: re-create the zip")
            except OSError as err:
                reason = describe_os_error(err, "the dataset folder", with_file=False)
                problems.append(f"{where}: cannot store: {reason}")
    return stored, problems


def add_files(run_dir: Path, files: list[str | Path], names: list[str] | None = None) -> tuple[list[Path], list[str]]:
    """Copy uploaded files (images, .txt captions, .zip of both) into RUN/dataset with sanitized names.
    `names` are the original names when `files` are temp paths. Returns (stored paths, refusal messages);
    one bad file never stops the others. Same sanitized name = the same dataset item (replaced)."""
    dataset = Path(run_dir) / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    stored, problems = [], []
    for i, file in enumerate(files):
        src = Path(file)
        label = Path(names[i]).name if names else src.name
        try:
            if not src.is_file():
                raise UploadError(f"{label}: not a file")
            if src.suffix.lower() == ".zip" or label.lower().endswith(".zip"):
                got, bad = _extract_zip(dataset, src, label)
                stored += got
                problems += bad
                continue
            with open(src, "rb") as fh:
                stored.append(_store(dataset, PurePosixPath(sanitize_name(label)), fh, src.stat().st_size))
        except UploadError as err:
            problems.append(str(err))
        except OSError as err:  # disk full, permissions...: this file is refused, the rest of the batch goes on
            problems.append(f"{label}: cannot store: {describe_os_error(err, 'the dataset folder', with_file=False)}")
    return stored, problems


def dataset_items(run_dir: Path, min_image_size: int = 64) -> tuple[list[dict], str]:
    """One row per image for the caption grid: rel path, caption, status. Plus a dataset-level error."""
    from trainer.config import DataConfig
    from trainer.data.dataset import DatasetError, scan_dataset

    dataset = Path(run_dir) / "dataset"
    if not dataset.is_dir():
        return [], ""
    try:
        _, problems = scan_dataset(DataConfig(path=str(dataset), min_image_size=min_image_size))
        error = ""
    except DatasetError as err:
        problems, error = [], str(err).replace(str(dataset) + "/", "")
    rows = []
    bad = {Path(p.path): p.reason for p in problems if p.skipped}
    warned: dict[Path, list[str]] = {}
    for p in problems:
        if not p.skipped:
            warned.setdefault(Path(p.path), []).append(p.reason)
    for path in sorted(p for p in dataset.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        rel = path.relative_to(dataset).as_posix()
        cap = path.with_suffix(".txt")
        try:  # never read whole: the scan above names a caption file that is too large
            caption = read_caption_bytes(cap).decode("utf-8", errors="replace").strip() if cap.is_file() else ""
        except OSError:  # CaptionTooLarge included
            caption = ""
        if error:  # nothing usable: the error lists the first problems by path
            status = next((line.split(": ", 1)[1] for line in error.splitlines() if line.strip().startswith(rel + ": ")),
                          "not usable (see the message above)")
        elif path in bad:
            status = bad[path]
        elif cap in bad:
            status = bad[cap]
        elif not caption:
            status = "missing caption (trains on the trigger word alone)"
        else:
            status = "ok"
        if path in warned and not error and path not in bad:
            status += "; warning: " + "; ".join(warned[path])
        rows.append({"file": rel, "path": str(path), "caption": caption, "status": status})
    stems = {Path(r["path"]).with_suffix("") for r in rows}
    for p in problems:  # captions that reach no image (a name that differs in case, 'a.png.txt'...): a row each
        path = Path(p.path)
        if p.skipped and path.suffix.lower() in CAPTION_EXTS and path.with_suffix("") not in stems:
            rows.append({"file": path.relative_to(dataset).as_posix(), "path": str(path), "caption": "",
                         "status": p.reason})
    if not any(Path(r["path"]).suffix.lower() in IMAGE_EXTS for r in rows) and not error:
        error = f"no images yet: drop {'/'.join(e[1:].upper() for e in sorted(IMAGE_EXTS))} files, .txt captions or a .zip"
    return rows, error


def save_captions(run_dir: Path, captions: dict[str, str]) -> list[str]:
    """Write RUN/dataset/<image stem>.txt for each {relative image path: caption}, as one undoable operation under
    the dataset's caption lock (trainer/data/caption_journal.py). Returns what was refused."""
    dataset = Path(run_dir) / "dataset"
    refused, writes = [], {}
    for rel, caption in captions.items():
        if PurePosixPath(rel).suffix.lower() in CAPTION_EXTS:
            continue  # the grid's row for a caption file without an image: nothing to save
        image = dataset / rel
        if not _inside(image, dataset) or not image.is_file() or image.suffix.lower() not in IMAGE_EXTS:
            refused.append(f"{rel}: not an image of this dataset")
            continue
        cap = image.with_suffix(".txt")
        try:
            unchanged = ce.read_caption(cap) == (caption or "").strip()
        except (UnicodeDecodeError, OSError):
            unchanged = False
        if not unchanged:
            writes[cap] = caption or ""
    if not writes:
        return refused
    try:
        with ce.caption_lock(dataset, "save captions"):
            undo = ce.start_undo("save captions")
            refused += ce.write_captions(dataset, writes, undo)
            ce.finish_undo(dataset, undo)
    except ce.EditError as err:
        refused.append(str(err).replace(str(dataset) + ": ", ""))
    return refused
