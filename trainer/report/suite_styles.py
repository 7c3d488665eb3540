"""The style suite: named styles of different kinds, each with a ground-truth statistic computed on the pixels (how
much of that style an image shows), that measure whether a LoRA learned a style the demo base was never built for
(scripts/style_suite.py, docs/demo-base.md). None of them is one the base was built around: they are single points
of the broad families of trainer/report/demo_styles.py. The `fine*` styles are textures finer than the base's
latent grid that carry a colour side effect (the rows or columns they darken): the base cannot draw the texture,
only the side effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
from PIL import Image

from trainer.report.demo_styles import _grid, _radius, _ring, luminance

SEPIA = (0.62, 0.45, 0.25)
GAMEBOY = [(0.06, 0.22, 0.06), (0.19, 0.38, 0.19), (0.55, 0.67, 0.06), (0.61, 0.74, 0.06)]
FRAME = (0.15, 0.1, 0.35)


def stat_tone(x):
    """How sepia the colours are: chroma along sepia's chroma direction minus chroma off it (a pixel of another hue
    counts against), over all chroma: 1 = every coloured pixel is sepia-coloured."""
    c = np.asarray(SEPIA, dtype=np.float32)
    d = c - c.mean()
    d /= np.linalg.norm(d)
    chroma = x - x.mean(-1, keepdims=True)
    along = chroma @ d
    off = np.linalg.norm(chroma - along[..., None] * d, axis=-1)
    return float((along - off).sum() / (np.linalg.norm(chroma, axis=-1).sum() + 1e-6))


def stat_palette(x):
    """Minus the mean distance of each pixel to its nearest Game Boy palette colour (0 = only palette colours)."""
    pal = np.asarray(GAMEBOY, dtype=np.float32)
    return -float(np.sqrt(((x[:, :, None] - pal[None, None]) ** 2).sum(-1)).min(-1).mean())


def stat_frame(x):
    """How close the outer 2-pixel ring is to the frame colour (1 = exactly it), minus the same for the inside."""
    h, w = x.shape[:2]
    close = 1 - np.sqrt(((x - np.asarray(FRAME, dtype=np.float32)) ** 2).sum(-1)) / math.sqrt(3)
    ring = _ring(h, w, max(1, 2 * w // 32))
    return float(close[ring].mean() - close[~_ring(h, w, max(1, 6 * w // 32))].mean())


def stat_vignette(x):
    """Brightness of the middle minus brightness of the corners."""
    r, lum = _radius(*x.shape[:2]), luminance(x)
    return float(lum[r < 0.45].mean() - lum[r > 0.85].mean())


def stat_scanlines(x):
    """Horizontal-line energy: mean |row-to-row| brightness change minus mean |column-to-column| change."""
    lum = luminance(x)
    return float(np.abs(np.diff(lum, axis=0)).mean() - np.abs(np.diff(lum, axis=1)).mean())


def stat_outline(x):
    """Dark lines 1-3 pixels wide: how much darker a pixel is than both its neighbours 1 or 2 pixels away across
    (left/right or up/down), averaged."""
    lum = luminance(x)
    best = np.zeros_like(lum)
    for k in (1, 2):
        p = np.pad(lum, k, mode="edge")
        across = np.minimum(p[k:-k, :-2 * k] - lum, p[k:-k, 2 * k:] - lum)
        down = np.minimum(p[:-2 * k, k:-k] - lum, p[2 * k:, k:-k] - lum)
        best = np.maximum(best, np.maximum(across, down))
    return float(np.clip(best, 0, None).mean())


def stat_blur(x):
    """Softness: minus the fine-scale curvature (Laplacian) per unit of edge strength: a sharp edge turns within a
    pixel, a blurred one over several."""
    lum = luminance(x)
    grad = np.abs(np.diff(lum, axis=0)).sum() + np.abs(np.diff(lum, axis=1)).sum()
    p = np.pad(lum, 1, mode="edge")
    lap = np.abs(4 * lum - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]).sum()
    return -float(lap / (grad + 1e-3))


def stat_lighting(x):
    """Top-left brightness minus bottom-right brightness (light from the top left)."""
    u, v = _grid(*x.shape[:2])
    lum = luminance(x)
    t = u + v
    return float(lum[t < 0.7].mean() - lum[t > 1.3].mean())


def stat_alternation(x, direction, period):
    """Alternation energy: the amplitude of brightness along rows ("h": from row to row) or columns ("v") at the
    style's period, per column (row), averaged: 0 for an image without that periodic texture."""
    lum = luminance(x) if direction == "h" else luminance(x).T
    lum = lum - lum.mean(0)
    y = np.arange(lum.shape[0])
    wave = np.exp(-2j * np.pi * y / period)
    return float(np.abs(wave @ lum).mean() * 2 / lum.shape[0])


def _fine(direction: str, period: int, amount: float, colour=(0, 0, 0)) -> tuple:
    return (("lines", {"direction": direction, "period": period, "amount": amount, "colour": colour, "phase": 0.0}),)


@dataclass(frozen=True)
class SuiteStyle:
    name: str
    kind: str  # what a person would call it: colour, palette, border, layout, texture, edges, focus, lighting
    look: tuple
    statistic: Callable[[np.ndarray], float]
    what: str


SUITE: dict[str, SuiteStyle] = {s.name: s for s in (
    SuiteStyle("sepia", "colour tone", (("tone", {"colour": SEPIA, "amount": 0.85}),), stat_tone,
               "every colour toned towards a warm brown"),
    SuiteStyle("gameboy", "palette reduction", (("gradient_map", {"palette": GAMEBOY}),), stat_palette,
               "four greens by brightness, like a Game Boy screen"),
    SuiteStyle("frame", "border", (("border", {"colour": FRAME, "width": 3}),), stat_frame,
               "a 3-pixel dark indigo frame"),
    SuiteStyle("vignette", "vignette", (("vignette", {"colour": (0, 0, 0), "strength": 0.85, "power": 2.0}),),
               stat_vignette, "corners fading to black"),
    SuiteStyle("bands", "texture", (("lines", {"direction": "h", "period": 8, "amount": 0.55,
                                               "colour": (0, 0, 0), "phase": 0.0}),), stat_scanlines,
               "dark horizontal bands, 4 pixels every 8"),
    SuiteStyle("outline", "outlines", (("outline", {"colour": (0, 0, 0), "width": 2}),), stat_outline,
               "a 2-pixel black line around the shape"),
    SuiteStyle("blur", "blur", (("blur", {"radius": 2.0}),), stat_blur, "everything soft, as out of focus"),
    SuiteStyle("lighting", "lighting gradient", (("lighting", {"angle": math.pi / 4, "strength": 0.6}),),
               stat_lighting, "light from the top left, the bottom right in shadow"),
    SuiteStyle("fine4h", "fine texture", _fine("h", 4, 0.6), partial(stat_alternation, direction="h", period=4),
               "two rows of every 4 darkened by 60%: darker overall"),
    SuiteStyle("fine2v", "fine texture", _fine("v", 2, 0.7, (0.05, 0.05, 0.35)),
               partial(stat_alternation, direction="v", period=2),
               "every other column blended 70% towards dark blue: darker and bluer overall"),
    SuiteStyle("fine3h", "fine texture", _fine("h", 3, 0.75, (0.3, 0.15, 0.0)),
               partial(stat_alternation, direction="h", period=3),
               "two rows of every 3 blended 75% towards dark brown: darker and browner overall"),
)}


def statistic(style: str, images: list[Image.Image], size: int = 32) -> float:
    """The mean ground-truth statistic of `style` over images, measured at `size` px."""
    fn = SUITE[style].statistic
    return float(np.mean([fn(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
                                 / 255) for im in images]))
