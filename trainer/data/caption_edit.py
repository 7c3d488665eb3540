"""Bulk caption edits over a dataset folder, with an undo history.

A caption is only ever written to a caption extension (.txt, .caption, or another text extension that no image
loader claims), and an existing file is only replaced when it is a caption we can read as text: captioning never
touches an image. Each operation records what it changes in its own journal and holds the folder's lock while it
runs (trainer/data/caption_journal.py), so `undo_last` puts back exactly what the last operation changed. No torch, no
gradio: the UI uses this too.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Callable

from PIL import Image

from trainer.data import caption_journal as journal
from trainer.data.caption_journal import EditError, Undone, caption_lock, clear_undo, finish_undo, start_undo  # noqa: F401
from trainer.data.dataset import IMAGE_EXTENSIONS, MAX_CAPTION_BYTES, _list_files, _read_caption, split_tags
from trainer.io import atomic_write_text

CAPTION_EXT = ".txt"
EXTENSION = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_-]{0,15}")
# the project's own files beside the images: a caption must never be written over one of them
NOT_CAPTIONS = {".toml", ".json", ".jsonl", ".safetensors", ".log", ".zip", ".py", ".onnx", ".csv"}


# ----------------------------------------------------------------------------- files


def check_caption_extension(ext: str, setting: str = "--caption-extension") -> str:
    """`ext` with its dot, when captions may be written to it; else EditError naming `setting`."""
    given, ext = ext, ext if ext.startswith(".") else "." + ext
    if not EXTENSION.fullmatch(ext):
        raise EditError(f"{setting} '{given}' is not a file extension (letters and digits after one dot); "
                        "use .txt or .caption")
    if ext.lower() in IMAGE_EXTENSIONS or ext.lower() in Image.registered_extensions():
        raise EditError(f"{setting} '{ext}' is an image type, so captions would overwrite images; "
                        "use .txt or .caption")
    if ext.lower() in NOT_CAPTIONS:
        raise EditError(f"{setting} '{ext}' is not a caption file type; use .txt or .caption")
    return ext


def is_caption_path(path: Path, folder: Path | None = None) -> bool:
    """Whether a caption may be written at `path`: a caption extension, inside `folder` when given."""
    try:
        check_caption_extension(path.suffix)
    except EditError:
        return False
    return folder is None or Path(path).resolve().is_relative_to(Path(folder).resolve())


def list_images(folder: Path, only: list[str] | None = None) -> list[Path]:
    """The images under `folder` (same order and rules as the training scan), or the `only` ones (paths relative
    to the folder, e.g. the UI's selection); a selected name that is not an image of the folder is an error.
    Only regular files: opening a FIFO named 'pipe.png' would wait forever for a writer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EditError(f"{folder}: not a folder")
    images = [p for p in _list_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if only is None:
        return images
    by_rel = {p.relative_to(folder).as_posix(): p for p in images}
    unknown = [rel for rel in only if rel not in by_rel]
    if unknown:
        raise EditError(f"{folder}: not images of this folder: {', '.join(unknown[:5])}")
    return [by_rel[rel] for rel in dict.fromkeys(only)]


def not_regular_files(folder: Path) -> list[Path]:
    """Entries named like images that are not regular files (FIFOs, sockets, devices): skipped, and named."""
    return [p for p in _list_files(Path(folder)) if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_file()]


def caption_file(image: Path, ext: str = CAPTION_EXT) -> Path:
    return image.with_suffix(ext if ext.startswith(".") else "." + ext)


def read_caption(path: Path) -> str | None:
    """The caption text (lines joined with ', '), or None when there is no caption file. Raises
    UnicodeDecodeError/OSError for a file that cannot be read as text."""
    return _read_caption(path) if path.is_file() else None


def _why_not_writable(path: Path, text: str) -> str:
    """"" when `text` may be written at `path`, else why not (one phrase)."""
    if not is_caption_path(path):
        return f"'{path.suffix}' is not a caption extension; nothing written"
    if len(text.strip().encode("utf-8")) + 1 > MAX_CAPTION_BYTES:
        return f"the caption would be larger than {MAX_CAPTION_BYTES // 1024} KiB, the most training reads; not written"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return "exists and is not a regular file; not replaced"
    if path.exists():
        try:
            _read_caption(path)
        except (UnicodeDecodeError, OSError):
            return "exists and is not a caption we can read as text; not replaced"
    return ""


def write_captions(folder: Path, captions: dict[Path, str], undo: dict) -> list[str]:
    """Write {caption path: text}, each atomically, after recording the old contents in the operation's journal.
    A path that is not a caption extension, or an existing file that is not a readable caption, is left alone.
    Returns one problem per file not written ("rel: why"). The caller holds the folder's caption_lock."""
    folder = Path(folder)
    problems, todo = [], {}
    for path, text in captions.items():
        rel = path.relative_to(folder).as_posix()
        why = _why_not_writable(path, text)
        if why:
            problems.append(f"{rel}: {why}")
        else:
            todo[rel] = text.strip()
    if not todo:
        return problems
    old = {rel: (folder / rel).read_bytes() if (folder / rel).is_file() else None for rel in todo}
    journal.record(folder, undo, old, todo)
    for rel, text in todo.items():
        atomic_write_text(folder / rel, text + "\n", journal.CAPTION_MODE)
    return problems


def undo_last(folder: Path) -> Undone:
    """Put back the captions the last operation changed (see trainer/data/caption_journal.py)."""
    folder = Path(folder)
    return journal.undo_last(folder, partial(is_caption_path, folder=folder))


# ----------------------------------------------------------------------------- edits of one caption


def _norm_tag(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())  # 'Long_Hair' and 'long hair' are one booru tag


def tidy(caption: str) -> str:
    """Whitespace collapsed, no empty comma-separated parts, no space before punctuation."""
    text = " ".join(caption.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return ", ".join(p.strip() for p in text.split(",") if p.strip(" .;:"))


def add_prefix(caption: str, prefix: str) -> str:
    prefix = prefix.strip().rstrip(",").strip()
    if not prefix or caption.strip().startswith(prefix):
        return caption
    return f"{prefix}, {caption.strip()}" if caption.strip() else prefix


def add_suffix(caption: str, suffix: str) -> str:
    suffix = suffix.strip().lstrip(",").strip()
    if not suffix or caption.strip().endswith(suffix):
        return caption
    return f"{caption.strip()}, {suffix}" if caption.strip() else suffix


def replace_text(caption: str, find: str, replacement: str) -> str:
    """Literal, case-sensitive find/replace; replacing a whole tag by "" leaves no empty ', ,'."""
    if not find or find not in caption:
        return caption
    return tidy(caption.replace(find, replacement))


def remove_tag(caption: str, tag: str) -> str:
    """Drop every comma-separated tag equal to `tag` (case, spaces and underscores ignored)."""
    tags = split_tags(caption)
    kept = [t for t in tags if _norm_tag(t) != _norm_tag(tag)]
    return caption if len(kept) == len(tags) else ", ".join(kept)


def looks_like_tags(caption: str) -> bool:
    """'1girl, long hair, watercolor (medium)' yes; 'a watercolor painting of a cat' no."""
    return all(len(part.split()) <= 3 for part in caption.split(","))


def strip_words(caption: str, words: list[str], as_tags: bool | None = None) -> str:
    """Remove style words from a caption (style LoRAs need content-only captions). Tags: every tag that contains
    one of the words is dropped. Sentences: the words are cut out, and 'a <cut> painting of a cat' style leftovers
    ('a of a cat') are closed up ('a cat')."""
    words = [w.strip() for w in words if w.strip()]
    if not words:
        return caption
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)
    if as_tags if as_tags is not None else looks_like_tags(caption):
        return ", ".join(t for t in split_tags(caption) if not pattern.search(t.replace("_", " ")))
    text = pattern.sub(" ", caption)
    text = re.sub(r"(?i)\b(?:a|an|the)\s+(?:of|with)\s+", "", " ".join(text.split()))
    return tidy(text)


# ----------------------------------------------------------------------------- bulk


def bulk_edit(folder: Path, edit: Callable[[str], str], undo: dict, only: list[str] | None = None,
              create_missing: bool = False, ext: str = CAPTION_EXT) -> tuple[list[str], list[str]]:
    """Apply `edit` to the caption of each image (or the `only` ones). Images without a caption file are left
    alone unless `create_missing` (prefix/suffix: the new caption is just the added text).
    Returns (images whose caption changed, problems by file)."""
    folder = Path(folder)
    ext = check_caption_extension(ext)
    changes, changed, problems = {}, {}, []
    for image in list_images(folder, only):
        path = caption_file(image, ext)
        try:
            old = read_caption(path)
        except (UnicodeDecodeError, OSError) as err:
            problems.append(f"{path.relative_to(folder)}: caption not edited, cannot read it as UTF-8 text ({err})")
            continue
        if old is None and not create_missing:
            continue
        new = edit(old or "").strip()
        if new != (old or "").strip() or (old is None and new):
            changes[path] = new
            changed[path.relative_to(folder).as_posix()] = image.relative_to(folder).as_posix()
    refused = write_captions(folder, changes, undo)
    problems += refused
    for line in refused:
        changed.pop(line.split(": ", 1)[0], None)
    return list(changed.values()), problems


def tag_table(folder: Path, ext: str = CAPTION_EXT) -> list[tuple[str, int, list[str]]]:
    """(tag, images that have it, those images relative to the folder), most frequent first; one count per
    image, as kohya's ss_tag_frequency."""
    folder = Path(folder)
    where: dict[str, list[str]] = {}
    for image in list_images(folder):
        try:
            caption = read_caption(caption_file(image, ext)) or ""
        except (UnicodeDecodeError, OSError):
            continue
        for tag in dict.fromkeys(split_tags(caption)):
            where.setdefault(tag, []).append(image.relative_to(folder).as_posix())
    return sorted(((tag, len(imgs), imgs) for tag, imgs in where.items()), key=lambda row: (-row[1], row[0]))


def plan_edits(strip: str = "", remove_tags: list[str] = (), replace: tuple[str, str] | None = None,
               prefix: str = "", suffix: str = "") -> list[tuple[str, Callable[[str], str], bool]]:
    """(label, caption -> caption, create captions for images without one), in the order they apply: strip style
    words, remove tags, find/replace, prefix, suffix (so a prefix such as the trigger is never stripped)."""
    edits: list[tuple[str, Callable[[str], str], bool]] = []
    words = [w.strip() for w in strip.split(",") if w.strip()]
    if words:
        edits.append((f"strip {', '.join(words)}", partial(strip_words, words=words), False))
    for tag in (t for t in remove_tags if t.strip()):
        edits.append((f"remove tag {tag.strip()}", partial(remove_tag, tag=tag), False))
    if replace and replace[0]:
        find, repl = replace
        edits.append((f"replace {find!r} -> {repl!r}", partial(replace_text, find=find, replacement=repl), False))
    if prefix.strip():
        edits.append((f"prefix {prefix.strip()}", partial(add_prefix, prefix=prefix), True))
    if suffix.strip():
        edits.append((f"suffix {suffix.strip()}", partial(add_suffix, suffix=suffix), True))
    return edits


def apply_edits(folder: Path, edits: list[tuple[str, Callable[[str], str], bool]], undo: dict,
                only: list[str] | None = None, ext: str = CAPTION_EXT) -> list[str]:
    """Run planned edits in order (one undo step when they share `undo`); returns one message per edit/problem."""
    messages = []
    for label, edit, create in edits:
        changed, problems = bulk_edit(folder, edit, undo, only, create, ext)
        messages += problems
        messages.append(f"{label}: {len(changed)} captions changed")
    return messages
