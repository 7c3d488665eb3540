"""The mask files of data.masked_loss, read and checked with PIL only (the dataset scan runs in the UI: no torch).

A mask is `name.mask.<image extension>` beside the image (greyscale: white trains, black is ignored) or else the
image's own alpha channel. Every mask is decoded when the dataset is scanned, as images are: a mask that cannot be
used (not an image, 0 bytes, a decompression bomb, another shape than its image) refuses the run before any model
loads, naming the file, instead of killing it at the step that draws it. An image whose mask is empty where it
trains (all black, or cropped away) would train nothing: it is skipped, named; when every mask is empty the run is
refused. trainer/data/masks.py turns the same cropped masks into loss weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, ImageStat

from trainer.data.images import IMAGE_EXTENSIONS, crop_box

MASK_SUFFIX = ".mask"
ASPECT_TOLERANCE = 0.02  # a mask drawn at another scale is stretched onto its image; another shape is a wrong file


def mask_path(image: Path) -> Path | None:
    """`name.mask.png` (or another image extension) beside `image`, if there is one."""
    for ext in sorted(IMAGE_EXTENSIONS):
        candidate = image.with_name(f"{image.stem}{MASK_SUFFIX}{ext}")
        if candidate.is_file():
            return candidate
    return None


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def bucket_mask(image: Path, size: tuple[int, int], bucket: tuple[int, int], flip: bool = False
                ) -> Image.Image | None:
    """The mask ("L", 0-255) of `image` at its bucket, resized, cropped and flipped like trainer.images.load_image;
    None when the image has neither a sidecar mask nor an alpha channel."""
    sidecar = mask_path(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(sidecar or image) as img:
            img = ImageOps.exif_transpose(img)
            if sidecar is not None:
                mask = img.convert("L")
            elif has_alpha(img):
                mask = img.convert("RGBA").getchannel("A")
            else:
                return None
    if mask.size != tuple(size):  # a sidecar drawn at another scale: stretched onto the image
        mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)
    left, top, nw, nh = crop_box(mask.size, bucket)
    if (nw, nh) != mask.size:
        mask = mask.resize((nw, nh), Image.Resampling.BILINEAR)  # no overshoot: a 0 area stays 0
    mask = mask.crop((left, top, left + bucket[0], top + bucket[1]))
    return mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else mask


def _sidecar_problem(sidecar: Path, size: tuple[int, int]) -> str:
    """"" for a sidecar mask that decodes and has its image's shape, else why not."""
    if sidecar.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(sidecar) as img:
                img.load()
                mask_size = ImageOps.exif_transpose(img).size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"mask too large to decode safely ({err})"
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        return f"cannot decode mask: {err}"
    (w, h), (mw, mh) = size, mask_size
    if abs(mw / mh - w / h) > ASPECT_TOLERANCE * (w / h):
        return (f"mask is {mw}x{mh} px but its image is {w}x{h}: a mask must have its image's size (or the same "
                "shape at another scale)")
    return ""


def check_mask(item) -> tuple[float | None, str]:
    """(share of the trained area the mask keeps, or None without a mask; "" or why the mask cannot be used)."""
    sidecar = mask_path(item.path)
    if sidecar is not None and (why := _sidecar_problem(sidecar, item.size)):
        return None, why
    mask = bucket_mask(item.path, item.size, item.bucket)
    if mask is None:
        return None, ""
    return ImageStat.Stat(mask).mean[0] / 255.0, ""
