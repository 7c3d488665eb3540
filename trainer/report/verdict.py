"""The style report's verdict: did the LoRA move the base's images towards what sets the training images apart?

1. The style direction: features of the training images, passed through the base's VAE (detail the base cannot
   draw at all is not style it could learn), minus features of the base's own images of the same captions (so
   what the captions say, and what the base already draws, cancels out; what is left is the style).
2. The movement: features of the LoRA's images minus the base's images of the same held-out prompts and seeds.
3. Progress = the movement projected on the style direction, as a fraction of it (0 = nothing moved towards the
   style, 1 = all the way), per group of features (colour, texture, layout); overall, each group's fraction capped
   at +-100 % and weighted by how much of the style it carries. A colour-only move therefore scores little on a
   texture style, and a colour overshoot cannot make up for a texture miss.
4. The verdict: learned / partly / not by the overall progress; but a style whose main group (by share) got less
   than half way is at most partly learned, and a style defined by a group the base's VAE erases (the training
   files differ from the base's images in it far more than crispness alone does, and what the VAE keeps of it
   points elsewhere: a texture finer than the latent grid that leaves only its colour side effect) is not learned.
Every feature is standardised by its spread over the images (so units do not matter), and the part of the style's
size that sampling noise alone would produce is subtracted (from the weights and from the fraction's denominator).
When nothing sets the training images apart from what the base draws anyway, there is no style to learn and the
verdict says so. `judge` decides from the stored numbers alone, so a report.json can be judged again.

Beside the verdict, `overcooking` warns when at strength 1.0 the prompt's content fades or the images copy the
training images. Thresholds are calibrated on the demo base's style suite (scripts/style_suite.py;
docs/demo-base.md has the tables).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LEARNED = 0.5  # progress at strength 1.0 from which the style counts as learned
PARTLY = 0.2  # ... as partly learned; below: not learned
MIN_STYLE = 3.0  # the style's standardised size (beyond sampling noise) below which there is no style to learn
KEPT = 0.1  # the drawable style's cosine to the files' in a group, under which the VAE erased that group ...
FINE = 12.0  # ... when the files' style in that group is at least this large (crispness alone: up to 8.4)
# uncapped progress past which the LoRA's images are farther from the style along it than the base's (|1 - p| > 1):
# not a calibrated number but where overshooting stops being closer to the style at all
OVERSHOOT = 2.0
FIDELITY_SHARE = 0.5  # overcooked: prompt fidelity at 1.0 under this share of the base's (or of the style's own)
COPYING = 0.995  # overcooked: copying at 1.0 above this (and above what the style's own images reach)
GROUPS = ("colour", "texture", "layout")
PX = 32
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((PX, PX), Image.BILINEAR), dtype=np.float32) / 255


def colour_features(x: np.ndarray) -> np.ndarray:
    """Mean and spread of each channel, how channels vary together, saturation, brightness percentiles, a coarse
    3x3x3 colour histogram (square-rooted) and a hue histogram weighted by saturation (a tone or a palette puts
    every image's colour in the same few hues, whatever its content)."""
    flat = x.reshape(-1, 3)
    lum = flat @ LUMA
    cov = np.cov(flat.T)
    bins = np.clip((flat * 3).astype(int), 0, 2)
    hist = np.bincount(bins[:, 0] * 9 + bins[:, 1] * 3 + bins[:, 2], minlength=27) / len(flat)
    chroma = flat - flat.mean(1, keepdims=True)
    a, b = chroma[:, 0] - 0.5 * (chroma[:, 1] + chroma[:, 2]), 0.866 * (chroma[:, 1] - chroma[:, 2])
    weight = np.hypot(a, b)
    hue = np.bincount(((np.arctan2(b, a) + np.pi) / (2 * np.pi) * 6).astype(int) % 6, weights=weight, minlength=6)
    return np.concatenate([flat.mean(0), flat.std(0), cov[np.triu_indices(3, 1)],
                           [(flat.max(1) - flat.min(1)).mean()], np.percentile(lum, [10, 50, 90]), np.sqrt(hist),
                           hue / (weight.sum() + 1e-3)])


def texture_features(x: np.ndarray) -> np.ndarray:
    """Edge strength per direction at two scales, thin dark and light lines, and the image's spectrum in 4x4
    bands of horizontal and vertical frequency (stripes, lines, grain and blur each leave their own pattern)."""
    lum = x @ LUMA
    out = []
    for g in (lum, lum.reshape(PX // 2, 2, PX // 2, 2).mean((1, 3))):
        out += [np.abs(np.diff(g, axis=0)).mean(), np.abs(np.diff(g, axis=1)).mean(),
                np.abs(g[1:, 1:] - g[:-1, :-1]).mean(), np.abs(g[1:, :-1] - g[:-1, 1:]).mean()]
    p = np.pad(lum, 1, mode="edge")
    local = sum(p[dy:dy + PX, dx:dx + PX] for dy in range(3) for dx in range(3)) / 9
    out += [np.clip(local - lum, 0, None).mean(), np.clip(lum - local, 0, None).mean()]
    spec = np.abs(np.fft.rfft2(lum - lum.mean())) ** 2  # [fy 0..31, fx 0..16]
    fy = np.minimum(np.arange(PX), PX - np.arange(PX))
    bands = np.array([0, 2, 5, 9, 17])
    for i in range(4):
        for j in range(4):
            if i == j == 0:  # the lowest band in both directions is layout (brightness across the image)
                continue
            rows = (fy >= bands[i]) & (fy < bands[i + 1])
            out.append(np.log1p(spec[rows][:, bands[j]:bands[j + 1]].sum()))
    return np.asarray(out, dtype=np.float64)


def layout_features(x: np.ndarray) -> np.ndarray:
    """Where the light and the colour are: a 4x4 grid of brightness, the outer ring's colour and its contrast to
    the inside, and brightness from the middle out in four rings."""
    lum = x @ LUMA
    grid = lum.reshape(4, PX // 4, 4, PX // 4).mean((1, 3)).ravel()
    ring = np.ones((PX, PX), bool)
    ring[2:-2, 2:-2] = False
    v, u = np.mgrid[0:PX, 0:PX]
    r = np.hypot(u + 0.5 - PX / 2, v + 0.5 - PX / 2) / (PX / 2 * np.sqrt(2))
    rings = [lum[(r >= a) & (r < b)].mean() for a, b in ((0, 0.3), (0.3, 0.55), (0.55, 0.8), (0.8, 1.01))]
    return np.concatenate([grid, x[ring].mean(0), [lum[ring].mean() - lum[~ring].mean()], rings])


FEATURES = {"colour": colour_features, "texture": texture_features, "layout": layout_features}


def features(images: list[Image.Image]) -> dict[str, np.ndarray]:
    """{group: [n, d] features}."""
    px = [_pixels(im) for im in images]
    return {g: np.stack([fn(x) for x in px]) for g, fn in FEATURES.items()}


def _style(train: np.ndarray, base_ref: np.ndarray, base: np.ndarray,
           scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One group's feature scale, standardised style direction, and the style's size squared with sampling noise
    removed. `scale`: standardise by another set's scale (to compare two styles in the same units)."""
    if scale is None:
        scale = np.sqrt((train.var(0) + base_ref.var(0) + base.var(0)) / 3 + 1e-6)
        scale = np.maximum(scale, 0.05 * np.median(scale) + 1e-4)  # a feature that never varies must not explode
    style = (train.mean(0) - base_ref.mean(0)) / scale
    noise = (train.var(0) / len(train) + base_ref.var(0) / len(base_ref)) / scale ** 2
    # |style|^2 overstates the true style's size by the noise in its estimate; the movement's projection does not
    # (the LoRA's images are other images), so fractions divide by the noise-free size
    return scale, style, max(float(style @ style) - float(noise.sum()), 0.0)


def _what_the_vae_keeps(f_raw: dict, f_ref: dict, f_base: dict, styles: dict) -> tuple[dict, dict, float]:
    """Per group: the size of the files' style (in the drawable's units), and how much of its direction the
    drawable style keeps: the cosine of the two (0 where the drawable style has nothing in that group). Not a
    ratio of sizes: every crisp file differs from what the base draws in detail the VAE softens, so the files'
    texture is larger than any drawable one; what tells an erased texture from a softened one is whether what is
    left still points the same way (a fine texture that leaves only its colour side effect points elsewhere)."""
    raw = {g: _style(f_raw[g], f_ref[g], f_base[g], scale) for g, (scale, _, _) in styles.items()}
    kept = {}
    for g, (_, drawable, true2) in styles.items():
        norm = float(np.linalg.norm(drawable) * np.linalg.norm(raw[g][1]))
        kept[g] = round(float(drawable @ raw[g][1]) / norm, 3) if true2 > 0 and norm > 0 else 0.0
    return kept, {g: round(float(np.sqrt(r[2])), 3) for g, r in raw.items()}, sum(r[2] for r in raw.values())


def style_verdict(train: list[Image.Image], base_ref: list[Image.Image], base: list[Image.Image],
                  lora_by_scale: dict[str, list[Image.Image]], embed=None, raw_train: list[Image.Image] = ()) -> dict:
    """The verdict and its numbers. `train`: the training images as the base can draw them (through its VAE);
    `raw_train`, when given, the files themselves: a style, or a group of it, that only they show is finer than the
    base can draw. `embed` (images -> [n, d] array, e.g. CLIP) replaces the three download-free groups with one
    group "clip". Every number the verdict is decided on is in the result, so `judge` can decide it again."""
    def feats(images):
        return {"clip": np.asarray(embed(images), dtype=np.float64)} if embed else features(images)

    f_train, f_ref, f_base = feats(train), feats(base_ref), feats(base)
    styles = {g: _style(f_train[g], f_ref[g], f_base[g]) for g in f_train}
    size = {g: true2 for g, (_, _, true2) in styles.items()}
    total = sum(size.values())
    out: dict = {"fraction": {}, "by_group": {}, "style_size": {g: round(np.sqrt(v), 3) for g, v in size.items()},
                 "style_share": {g: round(v / total, 3) if total > 0 else 0.0 for g, v in size.items()},
                 "style_size_total": round(float(np.sqrt(total)), 3)}
    for key, images in lora_by_scale.items():
        f_lora = feats(images)
        along = {g: float(((f_lora[g] - f_base[g]).mean(0) / scale) @ style)  # paired: same prompt and seed
                 for g, (scale, style, _) in styles.items()}
        out["fraction"][key] = {g: round(along[g] / size[g], 3) if size[g] > 0 else 0.0 for g in styles}
        # a group that carries (almost) none of the style has no meaningful fraction of it
        out["by_group"][key] = {g: out["fraction"][key][g] if size[g] >= 0.05 * total else None for g in styles}
    if raw_train:
        out["vae_kept"], out["files_size"], raw = _what_the_vae_keeps(feats(raw_train), f_ref, f_base, styles)
        out["style_size_files"] = round(float(np.sqrt(raw)), 3)
    return judge(out)


def erased_groups(out: dict) -> list[str]:
    """Groups the training files differ in far beyond the crispness any file has over what the base draws
    (`FINE`), of which what the base's VAE keeps does not point the same way (`KEPT`): finer than the base draws."""
    kept, files = out.get("vae_kept") or {}, out.get("files_size") or {}
    return [g for g in kept if files.get(g, 0) >= FINE and kept[g] < KEPT]


def judge(out: dict) -> dict:
    """Progress, verdict and reason from the measured fractions (in place; returns `out`). Each group's fraction is
    capped at +-100 % before the groups are weighted by their share: one group's overshoot says nothing about
    another's miss. A group the VAE erases counts as not moved: the LoRA cannot draw it."""
    erased = erased_groups(out)
    share = out["style_share"]
    out["progress"] = {key: round(sum(share[g] * (0.0 if g in erased else float(np.clip(f, -1, 1)))
                                      for g, f in fr.items()), 3) for key, fr in out["fraction"].items()}
    out["uncapped"] = {key: round(sum(share[g] * f for g, f in fr.items()), 3) for key, fr in out["fraction"].items()}
    top = max(out["progress"], key=float)
    out["verdict_scale"] = top
    out["has_style"] = out["style_size_total"] >= MIN_STYLE  # else the progress numbers measure noise
    out["thresholds"] = {"learned": LEARNED, "partly": PARTLY, "min_style": MIN_STYLE, "vae_kept": KEPT,
                        "fine": FINE, "overshoot": OVERSHOOT}
    out["verdict"], out["reason"] = decide(out, top, erased)
    return out


def verdict_of(progress: float, style_size: float) -> str:
    if style_size < MIN_STYLE:
        return "not learned"
    if progress >= LEARNED:
        return "learned"
    return "partly learned" if progress >= PARTLY else "not learned"


def _moved(out: dict, key: str, erased: list[str], but: str) -> str:
    """'the colour and the layout moved, ' (groups with a tenth of the style or more that got half way), or ''."""
    share, fr = out["style_share"], out["fraction"][key]
    moved = [g for g in share if g != but and g not in erased and share[g] >= 0.1 and fr[g] >= LEARNED]
    return f"the {' and the '.join(moved)} moved, " if moved else ""


def decide(out: dict, key: str, erased: list[str]) -> tuple[str, str]:
    """The verdict at strength `key` and one sentence a person can check against the grid."""
    share, progress = out["style_share"], out["progress"][key]
    if out["style_size_total"] < MIN_STYLE:
        return "not learned", explain(out, key)
    files = out.get("files_size") or {}
    defining = max(files, key=files.get) if files else None
    if defining in erased:  # like a whole style the VAE erases, one group at a time
        return "not learned", (
            f"the training images' style is mostly {defining} (size {files[defining]:.0f}), finer than the base can "
            f"draw: what its VAE keeps of the {defining} points elsewhere (cosine {out['vae_kept'][defining]:.2f}); "
            f"{_moved(out, key, erased, defining)}the {defining} cannot ({explain(out, key)})")
    if out["uncapped"][key] > OVERSHOOT:  # a diverged LoRA: its huge move projects on the style by chance too
        return "not learned", (f"the LoRA overshot: along the style it moved {out['uncapped'][key]:.0%} of the way, "
                               f"so its images are farther from the training images than the base's ("
                               f"{explain(out, key)})")
    verdict = verdict_of(progress, out["style_size_total"])
    main = max(share, key=share.get)
    reached = 0.0 if main in erased else out["fraction"][key][main]
    if verdict == "learned" and reached < LEARNED:
        return "partly learned", (f"{_moved(out, key, erased, main)}the {main} did not: it carries {share[main]:.0%} "
                                  f"of the style and moved {reached:.0%} of the way ({explain(out, key)})")
    return verdict, explain(out, key)


def explain(out: dict, key: str) -> str:
    """The progress and its groups, or why there is nothing to learn."""
    if out["style_size_total"] < MIN_STYLE:
        if out.get("style_size_files", 0) >= MIN_STYLE:
            return ("the training images' style is finer than the base can draw (it does not survive the base's "
                    "VAE): nothing the LoRA could learn")
        return ("the training images hardly differ from what the base draws for their captions: there is no style "
                "to learn")
    share = out["style_share"]
    main = max(share, key=share.get)
    parts = ", ".join(f"{g} {out['fraction'][key][g]:.0%}" for g in share if share[g] >= 0.1)
    return (f"at strength {key} the LoRA moved {out['progress'][key]:.0%} of the way from the base towards the "
            f"training images' style (mostly {main}; per group: {parts}; each group counts at most 100%)")


def overcooking(fidelity: dict, copying: dict, fidelity_style: float | None = None,
                copying_style: float | None = None) -> dict:
    """The overcooking warning beside the verdict, from the report's numbers at strength 1.0 (keys "0.0", "1.0").
    `fidelity_style`: the fidelity measure on the training images themselves (a colour style that the fidelity
    measure reads by name lowers it by design, so the floor is the lower of the two; None where the measure does
    not read the prompt, and then fidelity is not judged); `copying_style`: how close the training images come to
    each other (a uniform style brings any image in it close to one of them)."""
    out: dict = {"fidelity": False, "copying": False, "warning": None,
                 "thresholds": {"fidelity_share": FIDELITY_SHARE, "copying": COPYING}}
    said = []
    if fidelity_style is not None and "1.0" in fidelity:
        floor = FIDELITY_SHARE * min(fidelity["0.0"], fidelity_style)
        out["fidelity_floor"] = round(floor, 4)
        if fidelity["1.0"] < floor:
            out["fidelity"] = True
            said.append(f"prompt fidelity at strength 1.0 fell to {fidelity['1.0']:.2f} (base {fidelity['0.0']:.2f}, "
                        f"under {FIDELITY_SHARE:.0%} of it)")
    if "1.0" in copying:
        level = max(COPYING, copying_style or 0.0)
        out["copying_level"] = round(level, 4)
        if copying["1.0"] > level:
            out["copying"] = True
            said.append(f"copying at strength 1.0 rose to {copying['1.0']:.2f} (base {copying['0.0']:.2f}, "
                        f"above {level:.2f})")
    if said:
        out["warning"] = ("overcooked: " + "; ".join(said) + ". Use a lower strength, an earlier save, or train "
                          "fewer steps")
    return out
