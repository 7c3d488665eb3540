"""Pixels: aspect-ratio buckets, the crop each image gets, and loading an image as the VAE's input tensor.

Plain functions of their inputs, so a resumed run loads exactly the pixels the uninterrupted run did.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, features

from trainer.config import DataConfig

# Compared lowercase. GIF and animated WebP train on their first frame (with a warning); AVIF where Pillow reads it.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"} | ({".avif"} if features.check("avif") else set())

if TYPE_CHECKING:
    import torch


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


def to_rgb(img: Image.Image) -> Image.Image:
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
    import torch  # lazy: `from trainer.data.dataset import scan_dataset` (the web UI) must not import torch

    bw, bh = bucket
    with Image.open(path) as img:
        img = to_rgb(ImageOps.exif_transpose(img))
    left, top, nw, nh = crop_box(img.size, bucket)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    img = img.crop((left, top, left + bw, top + bh))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- captions
