"""Masked loss (data.masked_loss), as kohya's --masked_loss: a per-image mask weights the loss per latent pixel.

The mask is `name.mask.<image extension>` beside the image (greyscale: white trains, black is ignored) or else the
image's own alpha channel (the image itself is composited on white as always). It gets the image's EXIF rotation,
resize, crop and flip, then is averaged down to the latent grid (area), and multiplies the per-pixel loss before its
mean, exactly as kohya does. A latent pixel whose mask is 0 gives no gradient at all. Images with neither train on
their whole area (one `warning` event lists how many).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.config import Config
from trainer.events import WARNING
from trainer.data.mask_files import MASK_SUFFIX, bucket_mask


def load_mask(image: Path, size: tuple[int, int], bucket: tuple[int, int], flip: bool) -> torch.Tensor | None:
    """Float32 [h, w] in [0, 1] at the bucket size, cropped and flipped like trainer.images.load_image; None without one."""
    import numpy as np

    mask = bucket_mask(image, size, bucket, flip)
    return None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


class MaskCache:
    """The latent-grid masks of the training images, loaded once per (image, flip)."""

    def __init__(self, items: list, events):
        self.items = items
        self.cache: dict[tuple[int, bool, tuple[int, int]], torch.Tensor] = {}
        # the dataset scan checked every mask (trainer/data/mask_files.py) and skipped the empty ones
        self.masked = [item.mask_share is not None for item in items]
        missing = [item.path.name for item, has in zip(items, self.masked) if not has]
        if missing:
            events.emit(WARNING, reason=f"data.masked_loss: {len(missing)} image(s) have no mask (no "
                        f"name{MASK_SUFFIX}.png, no alpha channel) and train on their whole area, e.g. {missing[0]}")

    def latent_mask(self, i: int, flip: bool, grid: tuple[int, int]) -> torch.Tensor:
        key = (i, flip, grid)
        if key not in self.cache:
            item = self.items[i]
            mask = load_mask(item.path, item.size, item.bucket, flip) if self.masked[i] else None
            if mask is None:
                self.cache[key] = torch.ones(1, *grid)
            else:
                self.cache[key] = F.interpolate(mask[None, None], size=grid, mode="area")[0]
        return self.cache[key]


def make_masks(cfg: Config, items: list, events) -> MaskCache | None:
    return MaskCache(items, events) if cfg.data.masked_loss else None


def batch_masks(masks: MaskCache | None, indices: list[int], flips: list[bool], pred: torch.Tensor):
    """[B, 1, h, w] loss weights of a micro-batch on pred's device, or 1.0 without masked loss."""
    if masks is None:
        return 1.0
    grid = tuple(pred.shape[-2:])
    return torch.stack([masks.latent_mask(i, f, grid) for i, f in zip(indices, flips)]).to(pred.device)
