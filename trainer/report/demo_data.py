"""Procedural captioned images for the demo base (builtin:demo-sd) and its demo style set.

One coloured shape (circle, square, triangle) at one position (left, right, top, bottom, center) on a plain
background, captioned "a red circle on a blue background, left". Every word is a whole token of the tiny CLIP
tokenizer (trainer/families/tiny.py _WORDS), so the text encoder sees one token per concept.

The demo *style* ("stripes") is what the base never saw while it learned to draw: the background painted in
two wide diagonal stripes of its colour and a lighter (or, for white, darker) tint. Content colours, shape and
position stay as captioned, so a report can check that the content survives the style.

`content_check` reads an image back (which palette colour sits where, and how the blob fills its box): the
download-free prompt-fidelity measure the style report uses on the demo base.
"""

from __future__ import annotations

import random
import re

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5),
}
CAPTION = re.compile(r"\ba (\w+) (circle|square|triangle) on a (\w+) background, (left|right|top|bottom|center)\b")
SUPERSAMPLE = 4  # draw 4x larger and downsample: anti-aliased edges like a real photo's


def caption(colour: str, shape: str, background: str, position: str) -> str:
    return f"a {colour} {shape} on a {background} background, {position}"


def stripe_tint(background: str) -> tuple[int, int, int]:
    """The second stripe colour: halfway to white (halfway to mid-grey for white, which has no lighter tint)."""
    c = np.array(COLOURS[background], dtype=float)
    target = 128.0 if background == "white" else 255.0
    return tuple(int(round(v)) for v in (c + target) / 2)


def draw(colour: str, shape: str, background: str, position: str, size: int = 64, rng: random.Random | None = None,
         style: str | None = None) -> Image.Image:
    """One image of the caption's content; `rng` jitters size and position a little; style='stripes' paints the
    background in diagonal stripes (the demo style)."""
    return draw_with_mask(colour, shape, background, position, size, rng, style)[0]


def draw_with_mask(colour: str, shape: str, background: str, position: str, size: int = 64,
                   rng: random.Random | None = None, style: str | None = None) -> tuple[Image.Image, np.ndarray]:
    """draw() and the shape's mask (size x size, True inside the shape), for looks that need it (outlines)."""
    rng = rng or random.Random(0)
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), COLOURS[background])
    shape_only = Image.new("L", (s, s), 0)
    pen = ImageDraw.Draw(img)
    if style == "stripes":
        period, offset = s // 2, rng.randrange(s // 2)
        for x in range(-s - offset, s, period):  # 45-degree bands, half the period wide (two per image)
            pen.polygon([(x, s), (x + period // 2, s), (x + period // 2 + s, 0), (x + s, 0)], fill=stripe_tint(background))
    elif style is not None:
        raise ValueError(f"unknown style {style!r}")
    fx, fy = POSITIONS[position]
    r = s * rng.uniform(0.15, 0.19)
    cx, cy = s * (fx + rng.uniform(-0.03, 0.03)), s * (fy + rng.uniform(-0.03, 0.03))
    for target, fill in ((pen, COLOURS[colour]), (ImageDraw.Draw(shape_only), 255)):
        if shape == "circle":
            target.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            k = r * 0.9  # same area as the circle, roughly
            target.rectangle([cx - k, cy - k, cx + k, cy + k], fill=fill)
        else:
            target.polygon([(cx, cy - 1.15 * r), (cx + 1.15 * r, cy + 0.85 * r), (cx - 1.15 * r, cy + 0.85 * r)],
                           fill=fill)
    mask = np.asarray(shape_only.resize((size, size), Image.BOX)) >= 128
    return img.resize((size, size), Image.LANCZOS), mask


def random_content(rng: random.Random) -> tuple[str, str, str, str]:
    colour, background = rng.sample(sorted(COLOURS), 2)  # never the same colour for shape and background
    return colour, rng.choice(SHAPES), background, rng.choice(sorted(POSITIONS))


def style_set_contents(n: int, seed: int = 7) -> list[tuple[str, str, str, str]]:
    """n different contents for a style training set: shapes and positions cycled so each appears about equally
    often, the style report's held-out contents (REPORT_CONTENT) left out."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str, str]] = []
    positions = sorted(POSITIONS)
    while len(out) < n:
        colour, _, background, _ = random_content(rng)
        c = (colour, SHAPES[len(out) % 3], background, positions[len(out) % 5])
        if c not in REPORT_CONTENT and c not in out:
            out.append(c)
    return out


def random_texture(size: int, rng: random.Random) -> Image.Image:
    """Random stripes/checks/gradients in random colours: only for training the *autoencoder*, so the codec can
    represent textures (and thus any procedural style); the denoiser and captions never see these."""
    s = size * SUPERSAMPLE
    a = tuple(rng.randrange(256) for _ in range(3))
    b = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (s, s), a)
    pen = ImageDraw.Draw(img)
    period = rng.choice([s // 8, s // 4, s * 3 // 8, s // 2])
    kind = rng.choice(["diag", "anti", "h", "v", "check"])
    for i in range(-2 * s, 2 * s, period):
        if kind == "diag":
            pen.polygon([(i, s), (i + period // 2, s), (i + period // 2 + s, 0), (i + s, 0)], fill=b)
        elif kind == "anti":
            pen.polygon([(i, 0), (i + period // 2, 0), (i + period // 2 + s, s), (i + s, s)], fill=b)
        elif kind == "h":
            pen.rectangle([0, i, s, i + period // 2], fill=b)
        elif kind == "v":
            pen.rectangle([i, 0, i + period // 2, s], fill=b)
    if kind == "check":
        for y in range(0, s, period):
            for x in range((y // period % 2) * period, s, 2 * period):
                pen.rectangle([x, y, x + period - 1, y + period - 1], fill=b)
    return img.resize((size, size), Image.LANCZOS)


def texture_with_shape(size: int, rng: random.Random) -> Image.Image:
    """A random texture with a disc of a random colour on it: for training the demo base's autoencoder only."""
    img = random_texture(size, rng)
    ImageDraw.Draw(img).ellipse([size * 0.3, size * 0.3, size * 0.7, size * 0.7],
                                fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


# ----------------------------------------------------------------------------- reading an image back


def parse_caption(text: str) -> tuple[str, str, str, str] | None:
    """(colour, shape, background, position) when the text contains a demo caption, else None."""
    m = CAPTION.search(text)
    if not m or m.group(1) not in COLOURS or m.group(3) not in COLOURS:
        return None
    return m.group(1), m.group(2), m.group(3), m.group(4)


def nearest_colour(image: Image.Image) -> np.ndarray:
    """Per pixel, the index in COLOURS of its nearest palette colour, or -1 when it is far from all of them."""
    px = np.asarray(image.convert("RGB"), dtype=float)
    palette = np.array(list(COLOURS.values()), dtype=float)
    dist = np.linalg.norm(px[:, :, None, :] - palette[None, None], axis=-1)
    return np.where(dist.min(-1) < 70, dist.argmin(-1), -1)


def shape_mask(image: Image.Image, colour: str) -> np.ndarray:
    """The pixels of the palette colour `colour`: the shape's mask read back from an image."""
    return nearest_colour(image) == list(COLOURS).index(colour)


def content_check(image: Image.Image, colour: str, shape: str, background: str, position: str) -> dict[str, bool]:
    """Does the image show the caption's content? Each pixel gets its nearest palette colour (or none when it is
    far from all): the shape colour must cover a blob of plausible area on the right side, the background
    colour a good part of the rest, and the blob's fill of its bounding box must fit the shape
    (square ~1, circle ~0.79, triangle ~0.5)."""
    names = list(COLOURS)
    nearest = nearest_colour(image.convert("RGB").resize((64, 64), Image.BILINEAR))
    mask = nearest == names.index(colour)
    area = mask.mean()
    checks = {"colour": 0.02 < area < 0.4, "background": (nearest == names.index(background)).mean() > 0.15}
    if not checks["colour"]:
        return {**checks, "position": False, "shape": False}
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / 64, ys.mean() / 64
    tx, ty = POSITIONS[position]
    checks["position"] = abs(cx - tx) < 0.15 and abs(cy - ty) < 0.15
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    checks["shape"] = {"square": fill > 0.88, "circle": 0.66 < fill <= 0.88, "triangle": fill <= 0.66}[shape]
    return checks


# Held out of the demo style set (scripts/make_demo_style.py skips them): the style report's default prompts on
# the demo base, so the report measures the style on content the LoRA never saw.
REPORT_CONTENT = [("red", "circle", "blue", "left"), ("yellow", "square", "purple", "right"),
                  ("white", "triangle", "green", "top"), ("orange", "circle", "black", "bottom")]
REPORT_PROMPTS = ["{trigger}, " + caption(*c) for c in REPORT_CONTENT]
