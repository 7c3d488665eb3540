"""Bulk caption edits over a dataset folder, with one level of undo.

Every command that changes captions (a bulk edit, or captioning with a model) first records the old text of each
caption file it touches in FOLDER/.caption-undo.json, then writes the new ones atomically; `undo_last` puts the
old texts back (and deletes captions that did not exist before). No torch, no gradio: the UI uses this too.
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Callable

from trainer.data.dataset import IMAGE_EXTENSIONS, _list_files, _read_caption, split_tags
from trainer.io import atomic_path, atomic_write_text

UNDO_FILE = ".caption-undo.json"  # hidden: the dataset scan, uploads and run zips skip dot files
CAPTION_EXT = ".txt"


class EditError(ValueError):
    """A bulk edit that cannot run; the message names the folder, file or option."""


# ----------------------------------------------------------------------------- files


def list_images(folder: Path, only: list[str] | None = None) -> list[Path]:
    """The images under `folder` (same order and rules as the training scan), or the `only` ones (paths relative
    to the folder, e.g. the UI's selection); a selected name that is not an image of the folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EditError(f"{folder}: not a folder")
    images = [p for p in _list_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if only is None:
        return images
    by_rel = {p.relative_to(folder).as_posix(): p for p in images}
    unknown = [rel for rel in only if rel not in by_rel]
    if unknown:
        raise EditError(f"{folder}: not images of this folder: {', '.join(unknown[:5])}")
    return [by_rel[rel] for rel in dict.fromkeys(only)]


def caption_file(image: Path, ext: str = CAPTION_EXT) -> Path:
    return image.with_suffix(ext if ext.startswith(".") else "." + ext)


def read_caption(path: Path) -> str | None:
    """The caption text (lines joined with ', '), or None when there is no caption file. Raises
    UnicodeDecodeError/OSError for a file that cannot be read as text."""
    return _read_caption(path) if path.is_file() else None


def start_undo(label: str) -> dict:
    """A new undo record; pass it to every write_captions call of one command."""
    return {"label": label, "time": time.time(), "files": {}}


def write_captions(folder: Path, captions: dict[Path, str], undo: dict) -> None:
    """Write {caption path: text}, each atomically, after recording the old contents in the undo file."""
    folder = Path(folder)
    if not captions:
        return  # a command that changes nothing keeps the previous command's undo
    for path in captions:
        rel = path.relative_to(folder).as_posix()
        if rel not in undo["files"]:  # the text before this command, not before its previous batch
            undo["files"][rel] = path.read_bytes().decode("utf-8", "surrogateescape") if path.is_file() else None
    # ASCII JSON: a non-UTF-8 old caption travels as escaped surrogates and comes back byte for byte
    atomic_write_text(folder / UNDO_FILE, json.dumps(undo, indent=1))
    for path, text in captions.items():
        atomic_write_text(path, text.strip() + "\n")


def undo_last(folder: Path) -> tuple[str, int]:
    """Put back the captions of the last command that changed any. Returns (its label, files restored)."""
    folder = Path(folder)
    path = folder / UNDO_FILE
    try:
        undo = json.loads(path.read_text(encoding="utf-8"))
        files = dict(undo["files"])
    except FileNotFoundError:
        raise EditError(f"{folder}: nothing to undo") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EditError(f"{path}: unreadable undo record ({err})") from None
    for rel in files:
        target = folder / rel
        if not target.resolve().is_relative_to(folder.resolve()) or target.suffix.lower() in IMAGE_EXTENSIONS:
            raise EditError(f"{path}: refuses to touch '{rel}' (not a caption file inside {folder})")
    for rel, old in files.items():
        if old is None:
            (folder / rel).unlink(missing_ok=True)
        else:
            with atomic_path(folder / rel) as tmp:  # exactly the old bytes, even an encoding we could not edit
                tmp.write_bytes(old.encode("utf-8", "surrogateescape"))
    path.unlink()
    return str(undo.get("label", "edit")), len(files)


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
    changes, changed, problems = {}, [], []
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
            changed.append(image.relative_to(folder).as_posix())
    write_captions(folder, changes, undo)
    return changed, problems


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
