"""Dataset: find images and captions, pick an aspect-ratio bucket for each, load pixels, build captions, batch.

Everything here is a plain function of its inputs (plus the files on disk), so a resumed run that replays the
same seed and epoch sees exactly the same batches and captions.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from trainer.data.concepts import ConceptError, concept_for, load_concepts
from trainer.config import MAX_REPEATS, DataConfig
from trainer.data.images import IMAGE_EXTENSIONS, choose_bucket
from trainer.data.mask_files import check_mask, mask_path

KOHYA_FOLDER = re.compile(r"^([1-9]\d*)_.+")  # '10_mystyle' -> every image inside is repeated 10 times
ORIENTATION_TAG = 0x0112
MAX_LISTED_PROBLEMS = 10
MAX_CAPTION_BYTES = 64 * 1024  # a caption is a few hundred bytes (CLIP reads 77 tokens); more is a wrong file


class DatasetError(ValueError):
    """The dataset cannot be used at all; the message names the folder or file and the problem."""


@dataclass
class Problem:
    path: Path
    reason: str
    skipped: bool = True  # False: a warning about a file that is still used (animated image, name clash)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Item:
    path: Path  # image file
    caption: str  # raw caption (stripped) or cfg.default_caption, after its concept's caption_prefix; no trigger
    size: tuple[int, int]  # (w, h) after EXIF orientation
    bucket: tuple[int, int]  # (w, h) the image is resized and cropped to
    repeats: int
    folder: str  # parent folder relative to the dataset root, posix style; "" for the root
    trigger: str | None = None  # a concept.toml's trigger word; None = data.trigger
    loss_weight: float = 1.0  # data.reg_weight for regularisation images
    is_reg: bool = False  # from data.reg_path
    caption_state: str = "ok"  # "ok" | "missing" (no caption file) | "empty" (blank file) | "unreadable"
    mask_share: float | None = None  # data.masked_loss: the mean of its mask where it trains; None = no mask


# ----------------------------------------------------------------------------- scanning


def _list_files(root: Path) -> list[Path]:
    """All files under root in a deterministic order. Follows symlinked folders (datasets often reuse
    folders that way) but visits each real folder once, so a link loop cannot hang the scan."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden entries are editor/OS litter (.DS_Store, macOS '._x.jpg' resource forks that are not images).
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    # Same result as ImageOps.exif_transpose(img).size without copying the pixels:
    # orientations 5-8 are the ones that rotate by 90 degrees.
    w, h = img.size
    return (h, w) if img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8) else (w, h)


def _check_image(path: Path, min_size: int) -> tuple[tuple[int, int] | None, str]:
    """(oriented size, "" or a warning) for a usable image, else (None, reason)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error it hints at.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # a full decode: catches truncated files that Image.open/verify let through
                size = _oriented_size(img)
                frames = getattr(img, "n_frames", 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"image too large to decode safely ({err}); raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine"
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for bad files
        return None, f"cannot decode image: {err}"
    if min(size) < min_size:
        return None, f"too small ({size[0]}x{size[1]} px, minimum {min_size})"
    if frames > 1:
        return size, f"animated image ({frames} frames): only the first frame is used"
    return size, ""


class CaptionTooLarge(OSError):
    """A caption file over MAX_CAPTION_BYTES (it is never read whole: a symlink to a huge file costs nothing)."""


def read_caption_bytes(path: Path) -> bytes:
    """At most MAX_CAPTION_BYTES of a caption file; raises CaptionTooLarge past that, without reading further."""
    with open(path, "rb") as f:
        raw = f.read(MAX_CAPTION_BYTES + 1)
    if len(raw) > MAX_CAPTION_BYTES:
        raise CaptionTooLarge(f"caption file is larger than {MAX_CAPTION_BYTES // 1024} KiB (a caption is a line of "
                              "text; is it the right file?); caption ignored, using the default caption")
    return raw


def _read_caption(path: Path) -> str:
    """Caption text with lines joined by ', '. Raises UnicodeDecodeError / OSError (CaptionTooLarge).

    UTF-8 (a BOM written by Windows editors is not caption text) or UTF-16 with its BOM (Notepad's "Unicode");
    any other encoding is refused rather than guessed, so a caption is never silently garbled."""
    raw = read_caption_bytes(path)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16")
    else:
        text = raw.decode("utf-8-sig")
    if "\x00" in text:
        raise UnicodeDecodeError("utf-8", raw, raw.find(b"\x00"), raw.find(b"\x00") + 1, "NUL byte in a text file")
    return ", ".join(line.strip() for line in text.splitlines() if line.strip())


def folder_repeats(rel_parent: Path | str, default: int) -> tuple[int, str]:
    """(repeats, "" or why the folder is refused). The nearest enclosing 'N_name' folder wins, as in kohya's folder
    convention; N is bounded like data.repeats (a stray digit must not make an epoch of 10^11 images)."""
    for part in reversed(Path(rel_parent).parts):
        if m := KOHYA_FOLDER.match(part):
            if len(m.group(1)) > len(str(MAX_REPEATS)) or int(m.group(1)) > MAX_REPEATS:
                return 0, (f"folder '{part}' asks for {m.group(1)} repeats, over the limit of {MAX_REPEATS}: rename it "
                           f"to '<N>_{part.split('_', 1)[1]}' with N <= {MAX_REPEATS} (or use train.epochs)")
            return int(m.group(1)), ""
    return default, ""


def scan_dataset(cfg: DataConfig) -> tuple[list[Item], list[Problem]]:
    """Find every usable image under cfg.path (and cfg.reg_path). Bad files become Problems (skipped, not fatal);
    raises DatasetError when a folder is missing or nothing usable is left."""
    if not cfg.path:
        raise DatasetError("data.path is not set: point it at a folder of images")
    items, problems = _scan_folder(cfg, "data.path", cfg.path)
    if cfg.reg_path:
        root, reg_root = Path(cfg.path).expanduser().resolve(), Path(cfg.reg_path).expanduser().resolve()
        if reg_root.is_relative_to(root) or root.is_relative_to(reg_root):
            raise DatasetError(f"data.reg_path: '{cfg.reg_path}' and data.path '{cfg.path}' must not contain one "
                               "another (regularisation images would also train as style images)")
        reg_items, reg_problems = _scan_folder(cfg, "data.reg_path", cfg.reg_path, reg=True)
        items, problems = items + reg_items, problems + reg_problems
    if cfg.masked_loss:  # masks are decoded and checked now, not at the step that draws them
        items, problems = check_masks("data.masked_loss", items, problems)
    return items, problems


def _scan_folder(cfg: DataConfig, setting: str, folder: str, reg: bool = False) -> tuple[list[Item], list[Problem]]:
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"{setting}: folder '{root}' does not exist")
    if not root.is_dir():
        raise DatasetError(f"{setting}: '{root}' is not a folder")

    cap_ext = cfg.caption_extension if cfg.caption_extension.startswith(".") else "." + cfg.caption_extension
    files = _list_files(root)
    try:
        concepts = load_concepts(root, files)
    except ConceptError as err:
        raise DatasetError(f"{setting}: {err}") from None
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    # `name.mask.png` beside `name.png` is that image's loss mask (trainer/data/masks.py, data.masked_loss), not an image
    stems = {p.with_suffix("") for p in images}
    images = [p for p in images if not (p.stem.endswith(".mask") and p.parent / p.stem[: -len(".mask")] in stems)]
    image_stems = {p.with_suffix("") for p in images}
    items, problems = [], []

    problems += _name_clashes(root, images, cap_ext)
    for path in images:
        rel_parent = path.parent.relative_to(root)
        repeats, refused = folder_repeats(rel_parent, cfg.repeats)
        if refused:
            problems.append(Problem(path, refused))
            continue
        size, reason = _check_image(path, cfg.min_image_size)
        if size is None:
            problems.append(Problem(path, reason))
            continue
        if reason:
            problems.append(Problem(path, reason, skipped=False))
        caption, cap_path, state = "", path.with_suffix(cap_ext), "missing"
        if cap_path.is_file():
            try:
                caption = _read_caption(cap_path)
                state = "ok" if caption else "empty"
            except UnicodeDecodeError as err:
                state = "unreadable"
                problems.append(Problem(cap_path, f"caption file is not UTF-8 ({err}); caption ignored, "
                                                  "using the default caption"))
            except CaptionTooLarge as err:
                problems.append(Problem(cap_path, str(err)))
            except OSError as err:
                state = "unreadable"
                problems.append(Problem(cap_path, f"cannot read caption file ({err}); caption ignored"))
        concept = concept_for(rel_parent, concepts)
        caption = caption or cfg.default_caption
        prefix = (concept.caption_prefix or "").strip()
        if prefix and not caption.startswith(prefix):  # a caption that already starts with it keeps one copy
            caption = ", ".join(filter(None, [prefix, caption]))
        rel_folder = "" if rel_parent == Path(".") else rel_parent.as_posix()
        items.append(Item(
            path=path,
            caption=caption,
            size=size,
            bucket=choose_bucket(size, cfg),
            repeats=concept.repeats or repeats,
            # kohya's tag-frequency key for a regularisation folder is its own name
            folder="/".join(filter(None, [root.resolve().name, rel_folder])) if reg else rel_folder,
            # regularisation images teach the base's own idea of the class: no style trigger unless declared
            trigger=concept.trigger if concept.trigger is not None else ("" if reg else None),
            loss_weight=cfg.reg_weight if reg else 1.0,
            is_reg=reg,
            caption_state=state,
        ))

    by_lower = {p.with_suffix("").as_posix().lower(): p for p in images}
    by_full = {p.as_posix(): p for p in images}
    for path in files:
        name = path.name
        if name.lower().endswith(cap_ext.lower()) and path.parent / name[: -len(cap_ext)] not in image_stems:
            stem = path.parent / name[: -len(cap_ext)]
            if (near := by_full.get(stem.as_posix())) is not None:  # 'a.png.txt'
                hint = f"; it looks meant for '{near.name}', whose caption must be named '{near.stem}{cap_ext}'"
            elif (near := by_lower.get(stem.as_posix().lower())) is not None:  # 'Photo.png' + 'photo.txt'
                hint = (f"; its name differs from image '{near.name}' only in letter case, so it is NOT that image's "
                        f"caption: rename it to '{near.stem}{cap_ext}'")
            else:
                hint = ""
            problems.append(Problem(path, f"caption file has no matching image (ignored){hint}"))

    if not images:
        raise DatasetError(f"{setting}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in folder '{root}'")
    if not items:
        lines = [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        raise DatasetError(f"{setting}: none of the {len(images)} images in folder '{root}' can be used:\n"
                           + "\n".join(lines))
    return items, problems


def _name_clashes(root: Path, images: list[Path], cap_ext: str) -> list[Problem]:
    """Warnings (the images are still used) for names that silently mix up captions or files elsewhere:
    'a.png' + 'A.png' (one file on Windows/macOS, or in a zip extracted there) and 'a.png' + 'a.jpg' (both read
    the same caption 'a.txt')."""
    problems, by_lower, by_stem = [], {}, {}
    for path in images:
        rel = path.relative_to(root).as_posix()
        if (first := by_lower.setdefault(rel.lower(), rel)) != rel:
            problems.append(Problem(path, f"same name as '{first}' except for letter case: both are used, but on "
                                          "Windows/macOS one would overwrite the other; rename one", skipped=False))
        stem = path.with_suffix("")
        if (first_path := by_stem.setdefault(stem, path)) != path and stem.with_name(stem.name + cap_ext).is_file():
            problems.append(Problem(path, f"shares the caption file '{stem.name}{cap_ext}' with '{first_path.name}' "
                                          "(same name, other extension): both are used with that caption; rename "
                                          "one if they need different captions", skipped=False))
    return problems


# ----------------------------------------------------------------------------- buckets


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def build_caption(raw: str, cfg: DataConfig, rng: random.Random, trigger: str | None = None) -> str:
    """The caption for one training step: trigger first, optional tag shuffle, optional dropout to "".
    `trigger`: the image's own trigger (Item.trigger, from a concept.toml); None = cfg.trigger."""
    # Always draw the same two numbers, whatever the settings and caption, so the rng stream (and thus every
    # later caption) does not depend on which branches were taken: a resumed run replays it exactly.
    dropout_roll = rng.random()
    shuffle_seed = rng.getrandbits(32)
    if cfg.caption_dropout > 0 and dropout_roll < cfg.caption_dropout:
        return ""  # unconditional step: no trigger either
    trigger = (cfg.trigger if trigger is None else trigger).strip()
    # The trigger goes first exactly once, even if the caption writer already included it somewhere.
    tags = [t for t in split_tags(raw) if t != trigger]
    if cfg.shuffle_captions:
        fixed, rest = tags[: cfg.keep_tokens], tags[cfg.keep_tokens:]
        random.Random(shuffle_seed).shuffle(rest)
        tags = fixed + rest
    if trigger:
        tags = [trigger] + tags
    return ", ".join(tags)


def caption_is_static(cfg: DataConfig) -> bool:
    """True when build_caption always returns the same text for a caption, so text embeddings can be cached."""
    return not cfg.shuffle_captions and cfg.caption_dropout == 0


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over the raw captions, one count per image (kohya's ss_tag_frequency)."""
    freq: dict[str, dict[str, int]] = {}
    for item in items:
        counts = freq.setdefault(item.folder, {})
        for tag in split_tags(item.caption):
            counts[tag] = counts.get(tag, 0) + 1
    return freq


# ----------------------------------------------------------------------------- batching


def epoch_batches(items: list[Item], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one epoch. Each item appears `repeats` times; a batch never mixes buckets (its images
    must stack into one tensor); a bucket's last batch may be smaller rather than dropping images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"{seed}-{epoch}")  # str seeds hash the same in every process (unlike hash())
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).extend([i] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):  # sorted: dict order must not leak into the rng stream
        idx = by_bucket[bucket]
        rng.shuffle(idx)
        batches += [idx[j: j + batch_size] for j in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def check_masks(setting: str, items: list[Item], problems: list[Problem]) -> tuple[list[Item], list[Problem]]:
    """Items with their mask_share set; images whose mask is empty skipped (a Problem each). Raises DatasetError
    naming the files when a mask cannot be used, or when every mask is empty."""
    kept, broken, empty = [], [], []
    for item in items:
        share, why = check_mask(item)
        where = mask_path(item.path) or item.path
        if why:
            broken.append(f"{where}: {why}")
        elif share == 0.0:
            empty.append(Problem(where, "mask is empty where the image trains (all black, fully transparent or "
                                        "cropped away): this image would train nothing; skipped"))
        else:
            item.mask_share = share
            kept.append(item)
    if broken:  # the first on one line (the CLI's error line), then the next ones
        others = [f"  {line}" for line in broken[1:MAX_LISTED_PROBLEMS]]
        others += [f"  ... and {len(broken) - MAX_LISTED_PROBLEMS} more"] if len(broken) > MAX_LISTED_PROBLEMS else []
        raise DatasetError("\n".join([f"{setting}: mask {broken[0]}; fix or remove it (or turn data.masked_loss off)"
                                      + (f"; {len(broken) - 1} more:" if others else ""), *others]))
    if empty and not kept:  # images without a mask train whole: the run is refused only when nothing would train
        raise DatasetError(f"{setting}: every mask is empty (e.g. {empty[0].path}): with data.masked_loss nothing "
                           "would train; draw the masks white where the style is (or turn data.masked_loss off)")
    return kept, problems + empty
