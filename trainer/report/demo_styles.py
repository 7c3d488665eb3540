"""Procedural looks on demo images: the broad random families the demo base is trained on (the named style suite
built from them is trainer/report/suite_styles.py; docs/demo-base.md).

Every transform works on an RGB float array in [0, 1] (H x W x 3) plus the shape's mask (H x W, True inside the
shape), so outlines and shadows know where the shape is. `random_look` draws a random combination from the
families (random colours, widths, periods, strengths): what the base learns to draw.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
Look = list[tuple[str, dict]]


def luminance(x: np.ndarray) -> np.ndarray:
    return x @ LUMA


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: (u across, v down)."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    return (u + 0.5) / w, (v + 0.5) / h


def _ring(h: int, w: int, k: int) -> np.ndarray:
    """True on the outer k pixels of an h x w image."""
    ring = np.ones((h, w), bool)
    ring[k:h - k, k:w - k] = False
    return ring


def _radius(h: int, w: int) -> np.ndarray:
    """Distance of each pixel centre from the middle: 0 there, 1 in the corners."""
    u, v = _grid(h, w)
    return np.sqrt((u - 0.5) ** 2 + (v - 0.5) ** 2) / math.sqrt(0.5)


def _shift_max(m: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square, numpy only."""
    out = m.copy()
    p = np.pad(m, r)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= p[r + dy:r + dy + m.shape[0], r + dx:r + dx + m.shape[1]]
    return out


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, edges replicated."""
    p = np.pad(x, r, mode="edge")
    out = np.zeros_like(x)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += p[dy:dy + x.shape[0], dx:dx + x.shape[1]]
    return out / (2 * r + 1) ** 2


# ----------------------------------------------------------------------------- transforms


def tone(x, mask, colour, amount):
    """Global colour toning: each pixel's brightness in the tone colour, blended in."""
    c = np.asarray(colour, dtype=np.float32)
    toned = np.clip(luminance(x)[..., None] * c / max(float(c @ LUMA), 0.15), 0, 1)
    return x + amount * (toned - x)


def saturation(x, mask, factor):
    grey = luminance(x)[..., None]
    return np.clip(grey + factor * (x - grey), 0, 1)


def contrast(x, mask, factor, shift):
    return np.clip((x - 0.5) * factor + 0.5 + shift, 0, 1)


def invert(x, mask):
    return 1.0 - x


def gradient_map(x, mask, palette):
    """Palette reduction: each pixel becomes the palette colour at its brightness rank (dark to light)."""
    pal = np.asarray(sorted(palette, key=lambda c: float(np.asarray(c) @ LUMA)), dtype=np.float32)
    idx = np.clip((luminance(x) * len(pal)).astype(int), 0, len(pal) - 1)
    return pal[idx]


def nearest_palette(x, mask, palette):
    pal = np.asarray(palette, dtype=np.float32)
    d = ((x[:, :, None, :] - pal[None, None]) ** 2).sum(-1)
    return pal[d.argmin(-1)]


def posterize(x, mask, levels):
    return np.round(x * (levels - 1)) / (levels - 1)


def border(x, mask, colour, width):
    h, w = x.shape[:2]
    out = x.copy()
    out[_ring(h, w, max(1, int(round(width * w / 32))))] = colour
    return out


def vignette(x, mask, colour, strength, power):
    a = (strength * _radius(*x.shape[:2]) ** power)[..., None]
    return x + a * (np.asarray(colour, dtype=np.float32) - x)


def lighting(x, mask, angle, strength):
    """A light gradient across the image: brighter on one side, darker on the other."""
    u, v = _grid(*x.shape[:2])
    t = (u - 0.5) * math.cos(angle) + (v - 0.5) * math.sin(angle)  # in about [-0.7, 0.7]
    gain = 1.0 - 2 * strength * t
    return np.clip(x * gain[..., None], 0, 1)


def lines(x, mask, direction, period, amount, colour, phase, background_only=False):
    """Stripes, scanlines or hatching: bands of `colour` blended in every `period` pixels (at 32 px)."""
    h, w = x.shape[:2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float32) * 32 / w
    coord = {"h": v, "v": u, "diag": u + v, "anti": u - v}[direction]
    on = (((coord + phase) % period) < period / 2)[..., None].astype(np.float32)
    if background_only:
        on = on * (~mask)[..., None]
    return x + amount * on * (np.asarray(colour, dtype=np.float32) - x)


def checks(x, mask, period, amount, colour, background_only=False):
    h, w = x.shape[:2]
    v, u = np.mgrid[0:h, 0:w] * 32 // w
    on = (((u // period) + (v // period)) % 2 == 0)[..., None].astype(np.float32)
    if background_only:
        on = on * (~mask)[..., None]
    return x + amount * on * (np.asarray(colour, dtype=np.float32) - x)


def dots(x, mask, period, amount, colour):
    h, w = x.shape[:2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float32) * 32 / w
    d = np.hypot((u % period) - period / 2, (v % period) - period / 2)
    on = (d < period * 0.3)[..., None].astype(np.float32)
    return x + amount * on * (np.asarray(colour, dtype=np.float32) - x)


def grain(x, mask, sigma, seed, mono=True):
    rng = np.random.default_rng(seed)
    n = rng.normal(0, sigma, x.shape[:2] + ((1,) if mono else (3,))).astype(np.float32)
    return np.clip(x + n, 0, 1)


def outline(x, mask, colour, width):
    """A line of `colour` around the shape, just outside its edge."""
    k = max(1, int(round(width * x.shape[1] / 32)))
    ring = _shift_max(mask, k) & ~mask
    out = x.copy()
    out[ring] = colour
    return out


def shadow(x, mask, dx, dy, amount):
    """A drop shadow of the shape, offset by (dx, dy) pixels at 32 px, darkening the background."""
    s = x.shape[1] / 32
    shifted = np.roll(mask, (int(round(dy * s)), int(round(dx * s))), axis=(0, 1)) & ~mask
    return x * (1 - amount * shifted[..., None])


def _pil(x, fn):
    im = Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(fn(im), dtype=np.float32) / 255


def blur(x, mask, radius):
    r = radius * x.shape[1] / 32
    return _pil(x, lambda im: im.filter(ImageFilter.GaussianBlur(r)))


def sharpen(x, mask, amount):
    soft = blur(x, mask, 1.0)
    return np.clip(x + amount * (x - soft), 0, 1)


def pixelate(x, mask, block):
    h, w = x.shape[:2]
    k = max(2, int(round(block * w / 32)))
    return _pil(x, lambda im: im.resize((max(1, w // k), max(1, h // k)), Image.BOX).resize((w, h), Image.NEAREST))


TRANSFORMS: dict[str, Callable] = {f.__name__: f for f in (
    tone, saturation, contrast, invert, gradient_map, nearest_palette, posterize, border, vignette, lighting, lines,
    checks, dots, grain, outline, shadow, blur, sharpen, pixelate)}


def apply(image: Image.Image, mask: np.ndarray, look: Look) -> Image.Image:
    """The image with each (transform, params) of `look` applied in order."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    for name, params in look:
        x = TRANSFORMS[name](x, mask, **params)
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


# ----------------------------------------------------------------------------- the broad family (base training)


def _colour(rng: random.Random) -> tuple[float, float, float]:
    return (rng.random(), rng.random(), rng.random())


def random_step(rng: random.Random) -> tuple[str, dict]:
    """One random transform with random parameters: colours, palettes, tones, textures, borders, lighting,
    outlines, blur and grain, each family equally likely."""
    family = rng.choice(["colour", "palette", "frame", "light", "texture", "edge", "focus"])
    if family == "colour":
        kind = rng.choice(["tone", "tone", "saturation", "contrast", "invert"])
        if kind == "tone":
            return "tone", {"colour": _colour(rng), "amount": rng.uniform(0.3, 1.0)}
        if kind == "saturation":
            return "saturation", {"factor": rng.choice([rng.uniform(0.0, 0.5), rng.uniform(1.3, 2.0)])}
        if kind == "contrast":
            return "contrast", {"factor": rng.uniform(0.4, 1.6), "shift": rng.uniform(-0.25, 0.25)}
        return "invert", {}
    if family == "palette":
        kind = rng.choice(["gradient_map", "nearest_palette", "posterize"])
        if kind == "posterize":
            return "posterize", {"levels": rng.randint(2, 4)}
        return kind, {"palette": [_colour(rng) for _ in range(rng.randint(2, 5))]}
    if family == "frame":
        if rng.random() < 0.5:
            return "border", {"colour": _colour(rng), "width": rng.randint(1, 5)}
        return "vignette", {"colour": rng.choice([(0, 0, 0), (1, 1, 1), _colour(rng)]),
                            "strength": rng.uniform(0.4, 1.0), "power": rng.uniform(1.0, 4.0)}
    if family == "light":
        return "lighting", {"angle": rng.uniform(0, 2 * math.pi), "strength": rng.uniform(0.2, 0.7)}
    if family == "texture":
        kind = rng.choice(["lines", "lines", "checks", "dots", "grain"])
        amount, colour = rng.uniform(0.25, 0.8), rng.choice([(0, 0, 0), (1, 1, 1), _colour(rng)])
        if kind == "lines":
            period = rng.choice([2, 3, 4, 6, 8, 12, 16])
            return "lines", {"direction": rng.choice(["h", "v", "diag", "anti"]), "period": period,
                             "amount": amount, "colour": colour, "phase": rng.uniform(0, period),
                             "background_only": rng.random() < 0.4}
        if kind == "checks":
            return "checks", {"period": rng.choice([2, 4, 8]), "amount": amount, "colour": colour,
                              "background_only": rng.random() < 0.4}
        if kind == "dots":
            return "dots", {"period": rng.choice([3, 4, 6, 8]), "amount": amount, "colour": colour}
        return "grain", {"sigma": rng.uniform(0.04, 0.15), "seed": rng.randrange(2**31), "mono": rng.random() < 0.5}
    if family == "edge":
        if rng.random() < 0.6:
            return "outline", {"colour": rng.choice([(0, 0, 0), (1, 1, 1), _colour(rng)]), "width": rng.randint(1, 2)}
        return "shadow", {"dx": rng.randint(-3, 3), "dy": rng.randint(1, 3), "amount": rng.uniform(0.3, 0.8)}
    kind = rng.choice(["blur", "blur", "sharpen", "pixelate"])
    if kind == "blur":
        return "blur", {"radius": rng.uniform(0.5, 2.0)}
    if kind == "sharpen":
        return "sharpen", {"amount": rng.uniform(0.5, 2.0)}
    return "pixelate", {"block": rng.choice([2, 4])}


def random_look(rng: random.Random) -> Look:
    """One to three random steps (a single step half of the time)."""
    n = rng.choice([1, 1, 1, 2, 2, 3])
    return [random_step(rng) for _ in range(n)]
