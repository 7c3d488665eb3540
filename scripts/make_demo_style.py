"""Generate examples/demo-style: 20 captioned images in the demo style, for the demo base (builtin:demo-sd).

The style is what the demo base never saw while it learned to draw (trainer/report/demo_data.py): the background painted
in two wide diagonal stripes of its colour and a lighter tint. The content (shape, colour, background colour,
position) is what the captions describe, in the words the base knows. The contents of the style report's
held-out prompts (demo_data.REPORT_CONTENT) are left out. Deterministic: the same files every run.

    python scripts/make_demo_style.py [--out examples/demo-style]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.report import demo_data  # noqa: E402

COUNT = 20
SIZE = 64  # drawn at 64 px (easy to look at); presets/demo-style.toml trains at the base's 32 px


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "examples" / "demo-style"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    for i, content in enumerate(demo_data.style_set_contents(COUNT)):
        stem = f"{i:02d}_{content[0]}_{content[1]}"
        demo_data.draw(*content, size=SIZE, rng=rng, style="stripes").save(out / f"{stem}.png", optimize=True)
        (out / f"{stem}.txt").write_text(demo_data.caption(*content) + "\n")
    print(f"wrote {COUNT} images to {out}")


if __name__ == "__main__":
    main()
