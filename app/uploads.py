"""Uploads into a run's dataset folder: type, size and count limits, sanitized names, safe zip extraction
(no '..', absolute paths or symlinks), and the caption grid's rows. No gradio, no torch."""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path, PurePosixPath

from trainer.concepts import CONCEPT_FILE
from trainer.data import IMAGE_EXTENSIONS
from trainer.io import atomic_write_text

IMAGE_EXTS = set(IMAGE_EXTENSIONS)  # the trainer's list (PIL only, no torch), so an accepted upload can train
CAPTION_EXTS = {".txt"}
MAX_FILE_BYTES = 50 * 2**20  # one image or caption
MAX_FILES = 1000  # images + captions in one dataset
MAX_ZIP_BYTES = 1 * 2**30  # uncompressed total of one zip
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
    """Sanitize every part of a relative path; refuse absolute paths, '..' and too deep nesting."""
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
    return PurePosixPath(*[sanitize_name(p) for p in parts])


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


# ----------------------------------------------------------------------------- uploads


def _check_kind(rel: PurePosixPath) -> None:
    if rel.name == CONCEPT_FILE:  # a subfolder's trigger/prefix/repeats (trainer/concepts.py), read as TOML only
        return
    if rel.suffix not in IMAGE_EXTS | CAPTION_EXTS:
        raise UploadError(f"{rel.name}: file type '{rel.suffix or 'none'}' refused "
                          f"(images {', '.join(sorted(IMAGE_EXTS))}, captions .txt, or a .zip of both)")


def _count_files(dataset: Path) -> int:
    return sum(1 for p in dataset.rglob("*") if p.is_file()) if dataset.is_dir() else 0


def _store(dataset: Path, rel: PurePosixPath, data_source, size: int) -> Path:
    _check_kind(rel)
    if size > MAX_FILE_BYTES:
        raise UploadError(f"{rel}: {size / 2**20:.1f} MiB is over the {MAX_FILE_BYTES // 2**20} MiB limit")
    target = dataset / rel
    if not _inside(target.parent if target.parent.exists() else dataset, dataset):
        raise UploadError(f"{rel}: would be written outside the dataset folder")
    if not target.exists() and _count_files(dataset) >= MAX_FILES:
        raise UploadError(f"{rel}: the dataset already holds {MAX_FILES} files (the limit)")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()
    with open(target, "wb") as out:
        while chunk := data_source.read(1 << 20):
            out.write(chunk)
    return target


def _extract_zip(dataset: Path, zip_path: Path, label: str) -> tuple[list[Path], list[str]]:
    stored, problems = [], []
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        return [], [f"{label}: not a valid zip file ({err})"]
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        total = sum(i.file_size for i in infos)
        if total > MAX_ZIP_BYTES:
            return [], [f"{label}: {total / 2**20:.0f} MiB uncompressed is over the {MAX_ZIP_BYTES // 2**20} MiB limit"]
        if len(infos) > MAX_FILES:
            return [], [f"{label}: {len(infos)} files is over the {MAX_FILES} file limit"]
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
            except (zipfile.BadZipFile, OSError, RuntimeError) as err:  # RuntimeError: encrypted member
                problems.append(f"{where}: cannot extract ({err})")
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
    return stored, problems


def dataset_items(run_dir: Path, min_image_size: int = 64) -> tuple[list[dict], str]:
    """One row per image for the caption grid: rel path, caption, status. Plus a dataset-level error."""
    from trainer.config import DataConfig
    from trainer.data import DatasetError, scan_dataset

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
        caption = cap.read_text(encoding="utf-8", errors="replace").strip() if cap.is_file() else ""
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
    """Write RUN/dataset/<image stem>.txt for each {relative image path: caption}. Returns what was refused."""
    dataset = Path(run_dir) / "dataset"
    refused = []
    for rel, caption in captions.items():
        if PurePosixPath(rel).suffix.lower() in CAPTION_EXTS:
            continue  # the grid's row for a caption file without an image: nothing to save
        image = dataset / rel
        if not _inside(image, dataset) or not image.is_file() or image.suffix.lower() not in IMAGE_EXTS:
            refused.append(f"{rel}: not an image of this dataset")
            continue
        atomic_write_text(image.with_suffix(".txt"), (caption or "").strip() + "\n")
    return refused
