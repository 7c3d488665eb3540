"""The demo base's style suite: does a LoRA learn styles the base was not built for, and does the style report's
verdict agree with what the pixels say?

For each style of trainer/suite_styles.SUITE it writes a 20-image captioned training set (the demo content in that
style, 32 px), trains `presets/demo-style.toml` on it (the default demo recipe: only data.path, the run's name
and report.keep_images change), and
compares the report's verdict with the style's ground truth: its own pixel statistic, measured on the report's
held-out images, as the fraction of the way the LoRA moved it from the base's images towards the same images with
the style applied and decoded by the base's VAE like every image the base makes (learned >= 0.5, partly >= 0.2,
else not learned). Negative controls: `lr0` (the first style
with learning rate 0: the LoRA stays zero) and `plain` (training images without any style: plain demo images); and
`overcook` (the frame style, too many steps at a high learning rate), the one case on which the report's
overcooking warning must fire.

The verdict and the warning are decided again from each report.json's measured numbers with the current thresholds
(verdict.judge, verdict.overcooking): finished runs are reused, so recalibrating needs no new training.

    .venv/bin/python scripts/style_suite.py [--out outputs/style-suite] [--jobs 2] [--only sepia,frame,lr0]

Writes OUT/suite.json and OUT/suite.md (the table in docs/demo-base.md) and prints the agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.report import demo_data, demo_styles, suite_styles  # noqa: E402
from trainer.report.style_report import vae_roundtrip  # noqa: E402
from trainer.report.verdict import (COPYING, FIDELITY_SHARE, KEPT, LEARNED, MIN_STYLE, PARTLY,  # noqa: E402
                                    erased_groups, judge, overcooking)

COUNT = 20
SIZE = 32
ERASED = 0.1  # the base's VAE keeps less than this share of a style's statistic: the style is finer than it can draw
CONTROLS = {"lr0": "the first style, learning rate 0 (the LoRA stays zero)",
            "plain": "plain demo images: no style at all",
            "overcook": "the frame style overcooked: 10x the learning rate for 3x the steps (the LoRA diverges)"}
OVERCOOK = ("frame", ["train.lr_unet=1e-2", "train.steps=3000"])


def write_set(folder: Path, style: str | None, seed: int = 11) -> None:
    """COUNT captioned images of the demo content, in `style` (None: plain)."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, content in enumerate(demo_data.style_set_contents(COUNT)):
        image, mask = demo_data.draw_with_mask(*content, size=SIZE, rng=rng)
        if style:
            image = demo_styles.apply(image, mask, list(suite_styles.SUITE[style].look))
        stem = f"{i:02d}_{content[0]}_{content[1]}"
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(demo_data.caption(*content) + "\n")


def train(name: str, data: Path, runs: Path, extra: list[str], preset: str) -> Path:
    run_dir = runs / name
    if (run_dir / "report.json").is_file():
        return run_dir  # finished before: reuse
    args = [sys.executable, "-m", "trainer", "train", preset, "--run-dir", str(run_dir),
            "--set", f"data.path={data}", "--set", f"output.name={name}", "--set", "report.keep_images=true"]
    for item in extra:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not (run_dir / "report.json").is_file():
        raise RuntimeError(f"{name}: training or report failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return run_dir


def classify(progress: float) -> str:
    return "learned" if progress >= LEARNED else "partly learned" if progress >= PARTLY else "not learned"


def ground_truth(style: str, run_dir: Path, prompts: list[str], seeds: list[int], vae) -> dict:
    """The style's own statistic on the report's images: base, LoRA at 1.0, and the base's images with the style
    applied and passed through the base's VAE (the target: every image the base makes is decoded by that VAE, so
    the target is too; `crisp` is the same without it); progress = (lora - base) / (target - base)."""
    folder = run_dir / "report"
    n = len(prompts) * len(seeds)
    base = [Image.open(folder / f"base_{i:02d}.png").convert("RGB") for i in range(n)]
    lora = [Image.open(folder / f"1.0_{i:02d}.png").convert("RGB") for i in range(n)]
    per_image = [p for p in prompts for _ in seeds]
    target = []
    for im, prompt in zip(base, per_image):
        mask = demo_data.shape_mask(im, demo_data.parse_caption(prompt)[0])
        target.append(demo_styles.apply(im, mask, list(suite_styles.SUITE[style].look)))
    s_base, s_lora, s_crisp = (suite_styles.statistic(style, ims) for ims in (base, lora, target))
    s_target = suite_styles.statistic(style, vae_roundtrip(vae, target, SIZE, SIZE))

    def progress(to: float) -> float:
        return (s_lora - s_base) / (to - s_base) if abs(to - s_base) > 1e-9 else 0.0

    out = {"statistic": style, "base": round(s_base, 4), "lora": round(s_lora, 4), "target": round(s_target, 4),
           "progress": round(progress(s_target), 3), "class": classify(progress(s_target)),
           "crisp_target": round(s_crisp, 4), "crisp_progress": round(progress(s_crisp), 3)}
    if abs(s_target - s_base) < ERASED * abs(s_crisp - s_base):
        # the VAE leaves almost nothing of the style to move towards: judge on the crisp target instead
        out.update(progress=out["crisp_progress"], target=out["crisp_target"], erased_by_vae=True,
                   **{"class": classify(progress(s_crisp))})
    return out


def evaluate(name: str, style: str | None, run_dir: Path, vae) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    verdict = judge(report["verdict"])  # decided again with the current thresholds
    warn = overcooking(report["fidelity"], report["copying"], report["fidelity_style"], report["copying_style"])
    row = {"name": name, "kind": suite_styles.SUITE[style].kind if name in suite_styles.SUITE else "control",
           "verdict": verdict["verdict"], "reason": verdict["reason"], "report_progress": verdict["progress"]["1.0"],
           "by_group": verdict["fraction"]["1.0"], "style_share": verdict["style_share"],
           "vae_kept": verdict.get("vae_kept"), "erased": erased_groups(verdict), "style_size": verdict["style_size_total"],
           "fidelity": report["fidelity"]["1.0"], "fidelity_base": report["fidelity"]["0.0"],
           "fidelity_style": report["fidelity_style"], "copying": report["copying"]["1.0"],
           "copying_base": report["copying"]["0.0"], "copying_style": report["copying_style"],
           "warning": warn["warning"], "warned": bool(warn["warning"]), "overcooked": name == "overcook",
           "warned_for": [w for w in ("fidelity", "copying") if warn[w]]}
    if name == "plain":
        row["truth"] = {"class": "not learned", "why": "the training images have no style"}
    else:
        row["truth"] = ground_truth(style, run_dir, report["prompts"], report["seeds"], vae)
    row["agrees"] = row["verdict"] == row["truth"]["class"]
    row["warning_agrees"] = row["warned"] == row["overcooked"]
    return row


def table(rows: list[dict]) -> str:
    """The verdict table (every style and control) and the overcooking table (the warning's numbers)."""
    lines = ["| style | kind | ground truth: base → LoRA (target): progress | truth "
             "| report: progress (colour/texture/layout) | verdict | agrees |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r["truth"]
        gt = f"{t['base']} → {t['lora']} ({t['target']}): {t['progress']:.0%}" if "progress" in t else t["why"]
        if t.get("erased_by_vae"):
            gt += " (the VAE erases it: crisp target)"
        groups = "/".join("–" if r["style_share"].get(g, 0) < 0.05 else f"{r['by_group'][g]:.0%}"
                          for g in ("colour", "texture", "layout"))
        progress = f"{r['report_progress']:.0%} ({groups})"
        if r["style_size"] < MIN_STYLE:
            progress = f"no style to learn (size {r['style_size']:.1f} < {MIN_STYLE:g})"
        for g in r["erased"]:
            progress += f"; {g} erased by the VAE (cosine {r['vae_kept'][g]:.2f})"
        lines.append(f"| {r['name']} | {r['kind']} | {gt} | {t['class']} | {progress} "
                     f"| {r['verdict']} | {'yes' if r['agrees'] else '**no**'} |")
    lines.append(f"\nAgreement: {sum(r['agrees'] for r in rows)}/{len(rows)}\n")
    lines += ["| style | fidelity base → 1.0 (training images) | copying base → 1.0 (training images) | overcooked "
              "| warning | agrees |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fid_style = "–" if r["fidelity_style"] is None else f"{r['fidelity_style']:.2f}"
        lines.append(f"| {r['name']} | {r['fidelity_base']:.2f} → {r['fidelity']:.2f} ({fid_style}) "
                     f"| {r['copying_base']:.3f} → {r['copying']:.3f} ({r['copying_style']:.3f}) "
                     f"| {'yes' if r['overcooked'] else 'no'} | {', '.join(r['warned_for']) or '–'} "
                     f"| {'yes' if r['warning_agrees'] else '**no**'} |")
    lines.append(f"\nWarning agrees: {sum(r['warning_agrees'] for r in rows)}/{len(rows)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "style-suite"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated styles/controls (default: all)")
    parser.add_argument("--preset", default="presets/demo-style.toml")
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    names = [*suite_styles.SUITE, *CONTROLS]
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = [n for n in names if n not in suite_styles.SUITE and n not in CONTROLS]
        if unknown:
            parser.error(f"unknown styles: {', '.join(unknown)}; known: {', '.join([*suite_styles.SUITE, *CONTROLS])}")
    first = next(iter(suite_styles.SUITE))
    plan = {}
    for name in sorted(names, key=lambda n: n != "overcook"):  # the longest run first: the pool ends together
        style = {"lr0": first, "plain": None, "overcook": OVERCOOK[0]}.get(name, name)
        data = out / "data" / (style or "plain")
        if not data.is_dir():
            write_set(data, style)
        extra = {"lr0": ["train.lr_unet=0", "train.lr_text_encoder=0"], "overcook": OVERCOOK[1]}.get(name, [])
        plan[name] = (style, data, extra + args.set)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip(plan, pool.map(lambda n: train(n, plan[n][1], out / "runs", plan[n][2], args.preset), plan)))
    from diffusers import AutoencoderKL

    from trainer.families.loading import resolve_source

    vae = AutoencoderKL.from_pretrained(Path(resolve_source("builtin:demo-sd")[1]) / "vae").eval()
    rows = [evaluate(name, plan[name][0], runs[name], vae) for name in names]
    result = {"rows": rows, "agreement": sum(r["agrees"] for r in rows), "cases": len(rows),
              "warnings_agree": sum(r["warning_agrees"] for r in rows),
              "learned_by_truth": sum(r["truth"]["class"] == "learned" for r in rows if r["name"] in suite_styles.SUITE),
              "thresholds": {"learned": LEARNED, "partly": PARTLY, "min_style": MIN_STYLE, "vae_kept": KEPT,
                             "fidelity_share": FIDELITY_SHARE, "copying": COPYING}}
    (out / "suite.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(rows)
    (out / "suite.md").write_text(md + "\n")
    print(md)
    print(f"learned by ground truth: {result['learned_by_truth']}/{sum(n in suite_styles.SUITE for n in plan)}; "
          f"mean fidelity base {np.mean([r['fidelity_base'] for r in rows]):.2f}")


if __name__ == "__main__":
    main()
