"""Generate examples/tiny-style: 12 small captioned images in one made-up style, for smoke tests and demos.

The "style" is what every image shares: a cream background with tan diagonal stripes, flat muted shape
colours and a thick navy outline. The subject (shape, colour, position) is what the captions describe.
Deterministic: the same files every run.

    python scripts/make_tiny_style.py [--out examples/tiny-style]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUND = (242, 232, 207)
STRIPE = (224, 207, 168)
OUTLINE = (43, 45, 66)
COLOURS = {"red": (200, 75, 49), "blue": (61, 110, 160), "yellow": (230, 180, 60), "green": (96, 150, 90)}
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["on the left", "on the right", "in the center", "at the top", "at the bottom"]
# Mixed aspect ratios, every side between 48 and 128 px.
SIZES = [(64, 64), (96, 64), (64, 96), (128, 96), (96, 128), (48, 48),
         (128, 64), (64, 128), (80, 80), (112, 80), (80, 112), (128, 128)]


def background(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for x in range(-h, w, 8):  # 45-degree stripes, 3 px wide, every 8 px
        draw.line([(x, h), (x + h, 0)], fill=STRIPE, width=3)
    return img


def draw_subject(img: Image.Image, shape: str, colour: str, position: str, rng: random.Random) -> None:
    w, h = img.size
    r = min(w, h) // 5 + rng.randint(-1, 1)  # small enough to stay inside the frame
    cx, cy = {"on the left": (w // 4, h // 2), "on the right": (3 * w // 4, h // 2),
              "in the center": (w // 2, h // 2), "at the top": (w // 2, h // 4),
              "at the bottom": (w // 2, 3 * h // 4)}[position]
    cx += rng.randint(-2, 2)
    cy += rng.randint(-2, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    style = dict(fill=COLOURS[colour], outline=OUTLINE, width=2)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, **style)
    elif shape == "square":
        draw.rectangle(box, **style)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], **style)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "examples" / "tiny-style"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    colours = list(COLOURS)
    for i, (w, h) in enumerate(SIZES):
        # i % 3 and i % 4 walk through all 12 shape/colour pairs once; i % 5 spreads the positions.
        shape, colour, position = SHAPES[i % 3], colours[i % 4], POSITIONS[i % 5]
        img = background(w, h)
        draw_subject(img, shape, colour, position, rng)
        name = f"{i:02d}_{colour}_{shape}"
        img.save(out / f"{name}.png", optimize=True)
        (out / f"{name}.txt").write_text(f"a {colour} {shape} {position}\n", encoding="utf-8")
    print(f"wrote {len(SIZES)} images to {out}")


if __name__ == "__main__":
    main()
