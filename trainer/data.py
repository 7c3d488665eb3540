"""Dataset: find images and captions, pick an aspect-ratio bucket for each, load pixels, build captions, batch.

Everything here is a plain function of its inputs (plus the files on disk), so a resumed run that replays the
same seed and epoch sees exactly the same batches and captions.
"""

from __future__ import annotations

import math
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, features

if TYPE_CHECKING:
    import torch

from trainer.config import DataConfig

# Compared lowercase. GIF and animated WebP train on their first frame (with a warning); AVIF where Pillow reads it.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"} | ({".avif"} if features.check("avif") else set())
KOHYA_FOLDER = re.compile(r"^([1-9]\d*)_.+")  # '10_mystyle' -> every image inside is repeated 10 times
ORIENTATION_TAG = 0x0112
MAX_LISTED_PROBLEMS = 10


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
    caption: str  # raw caption (stripped) or cfg.default_caption, without the trigger
    size: tuple[int, int]  # (w, h) after EXIF orientation
    bucket: tuple[int, int]  # (w, h) the image is resized and cropped to
    repeats: int
    folder: str  # parent folder relative to the dataset root, posix style; "" for the root


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


def _read_caption(path: Path) -> str:
    """Caption text with lines joined by ', '. Raises UnicodeDecodeError / OSError.

    UTF-8 (a BOM written by Windows editors is not caption text) or UTF-16 with its BOM (Notepad's "Unicode");
    any other encoding is refused rather than guessed, so a caption is never silently garbled."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16")
    else:
        text = raw.decode("utf-8-sig")
    if "\x00" in text:
        raise UnicodeDecodeError("utf-8", raw, raw.find(b"\x00"), raw.find(b"\x00") + 1, "NUL byte in a text file")
    return ", ".join(line.strip() for line in text.splitlines() if line.strip())


def _repeats(rel_parent: Path, default: int) -> int:
    # The nearest enclosing 'N_name' folder wins, as in kohya's folder convention.
    for part in reversed(rel_parent.parts):
        if m := KOHYA_FOLDER.match(part):
            return int(m.group(1))
    return default


def scan_dataset(cfg: DataConfig) -> tuple[list[Item], list[Problem]]:
    """Find every usable image under cfg.path. Bad files become Problems (skipped, not fatal);
    raises DatasetError when the folder is missing or nothing usable is left."""
    if not cfg.path:
        raise DatasetError("data.path is not set: point it at a folder of images")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DatasetError(f"data.path: folder '{root}' does not exist")
    if not root.is_dir():
        raise DatasetError(f"data.path: '{root}' is not a folder")

    cap_ext = cfg.caption_extension if cfg.caption_extension.startswith(".") else "." + cfg.caption_extension
    files = _list_files(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    # `name.mask.png` beside `name.png` is that image's loss mask (trainer/masks.py, data.masked_loss), not an image
    stems = {p.with_suffix("") for p in images}
    images = [p for p in images if not (p.stem.endswith(".mask") and p.parent / p.stem[: -len(".mask")] in stems)]
    image_stems = {p.with_suffix("") for p in images}
    items, problems = [], []

    problems += _name_clashes(root, images, cap_ext)
    for path in images:
        size, reason = _check_image(path, cfg.min_image_size)
        if size is None:
            problems.append(Problem(path, reason))
            continue
        if reason:
            problems.append(Problem(path, reason, skipped=False))
        caption, cap_path = "", path.with_suffix(cap_ext)
        if cap_path.is_file():
            try:
                caption = _read_caption(cap_path)
            except UnicodeDecodeError as err:
                problems.append(Problem(cap_path, f"caption file is not UTF-8 ({err}); caption ignored, "
                                                  "using the default caption"))
            except OSError as err:
                problems.append(Problem(cap_path, f"cannot read caption file ({err}); caption ignored"))
        rel_parent = path.parent.relative_to(root)
        items.append(Item(
            path=path,
            caption=caption or cfg.default_caption,
            size=size,
            bucket=choose_bucket(size, cfg),
            repeats=_repeats(rel_parent, cfg.repeats),
            folder="" if rel_parent == Path(".") else rel_parent.as_posix(),
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
        raise DatasetError(f"data.path: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in folder '{root}'")
    if not items:
        lines = [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        raise DatasetError(f"data.path: none of the {len(images)} images in folder '{root}' can be used:\n"
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


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """kohya-style buckets: for each width (a multiple of step) the tallest height with w*h <= resolution²,
    plus the square. Every bucket holds about the same number of pixels, so memory per step stays flat."""
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    first = -(-min_side // step) * step  # smallest multiple of step >= min_side
    for w in range(first, max_side + 1, step):
        h = min(max_side, max_area // w) // step * step
        if h >= min_side:
            buckets.add((w, h))
    return sorted(buckets)


def choose_bucket(size: tuple[int, int], cfg: DataConfig) -> tuple[int, int]:
    """The (w, h) an image of `size` trains at."""
    if not cfg.bucket:
        return cfg.resolution, cfg.resolution
    w, h = size
    aspect = math.log(w / h)
    buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.min_bucket, cfg.max_bucket)
    bw, bh = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
    if cfg.upscale or (bw <= w and bh <= h):
        return bw, bh
    # No upscaling: the bucket would be bigger than the image on some side, so train the image near its own
    # size instead (blurry upscaled pixels teach the style blur). Floor each side to the step grid.
    step = cfg.bucket_step
    return (max(step, min(w, cfg.max_bucket) // step * step),
            max(step, min(h, cfg.max_bucket) // step * step))


# ----------------------------------------------------------------------------- pixels


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):
        import numpy as np  # lazy: scanning a dataset (the UI) must not pay for numpy/torch imports

        # 16-bit greyscale: Pillow's convert() clips at 255 instead of scaling, which would blow out the image.
        arr = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Transparent pixels keep arbitrary (often black) colour; put them on white like a viewer would.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, L, 1, P, YCbCr, ...


def crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, resized w, resized h): an image of `size` (w, h) is resized to cover `bucket`, then center-cropped."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return (nw - bw) // 2, (nh - bh) // 2, nw, nh


def load_image(path: Path, bucket: tuple[int, int], flip: bool = False) -> "torch.Tensor":
    """Float32 [3, h, w] in [-1, 1]: resized to cover the bucket, center-cropped to it exactly."""
    import numpy as np
    import torch  # lazy: `from trainer.data import scan_dataset` (the web UI) must not import torch

    bw, bh = bucket
    with Image.open(path) as img:
        img = _to_rgb(ImageOps.exif_transpose(img))
    left, top, nw, nh = crop_box(img.size, bucket)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    img = img.crop((left, top, left + bw, top + bh))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- captions


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def build_caption(raw: str, cfg: DataConfig, rng: random.Random) -> str:
    """The caption for one training step: trigger first, optional tag shuffle, optional dropout to ""."""
    # Always draw the same two numbers, whatever the settings and caption, so the rng stream (and thus every
    # later caption) does not depend on which branches were taken: a resumed run replays it exactly.
    dropout_roll = rng.random()
    shuffle_seed = rng.getrandbits(32)
    if cfg.caption_dropout > 0 and dropout_roll < cfg.caption_dropout:
        return ""  # unconditional step: no trigger either
    trigger = cfg.trigger.strip()
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
