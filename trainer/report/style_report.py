"""Style report: did the run learn the style, keep the prompt's content, and not copy its training images?

After a run, for fixed held-out prompts and seeds, the base renders images without the LoRA, at strength 0.5 and
at 1.0 (diffusers: load_lora_weights + set_adapters, the way users load the file). Three numbers per strength:
  style lift  = mean similarity of its images to the training images - the same for the base's images
  fidelity    = does the prompt's content survive (demo base: the colours/shape/position read back from the
                pixels; with a CLIP model: text-image cosine; else: layout similarity to the base image)
  copying     = the highest similarity of any of its images to its nearest training image (pixel layout, or CLIP)
Features (docs/demo-base.md): with `report.clip_model` CLIP image embeddings; without, download-free colour and
texture statistics: a 4x4x4 RGB histogram plus Gram matrices of fixed derivative filters on each colour channel
at four scales.
Beside the verdict (verdict.py) the overcooking warning: prompt fidelity at 1.0 under a share of the base's (or of
the training images' own), or copying above a level (and above how close the training images come to each other).
Writes RUN/report.json, RUN/report.png (rows: base, 0.5, 1.0; the verdict and any warning below) and a
`style_report` entry in both adapter files.
"""

from __future__ import annotations

import json
import random
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainer.report import demo_data
from trainer.config import Config
from trainer.io import atomic_path, atomic_write_text
from trainer.report.verdict import overcooking, style_verdict

SCALES = (0.0, 0.5, 1.0)  # 0.0 = the base alone (LoRA disabled)
GENERIC_PROMPTS = ["{trigger}, a lighthouse on a cliff", "{trigger}, portrait of an old fisherman",
                   "{trigger}, a bowl of fruit on a table"]
FEATURE_PX = 64
REF_IMAGES = 12  # training captions the base renders to see what it draws without the style
VAE_IMAGES = 32  # training images passed through the base's VAE: the style as the base could draw it
METADATA_KEY = "style_report"  # not ss_*: kohya's hashes cover the ss_* header entries, which stay untouched


class ReportError(RuntimeError):
    """The report cannot be made; the message says why (the run's adapters are fine)."""


# ----------------------------------------------------------------------------- features


def _filters() -> torch.Tensor:
    """Fixed 3x3 filters: horizontal, vertical and both diagonal derivatives, and a Laplacian. Their Gram matrix
    describes texture (stripes, edges, flat areas) independently of where things are in the image."""
    f = [[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
         [[-2, -1, 0], [-1, 0, 1], [0, 1, 2]], [[0, -1, -2], [1, 0, -1], [2, 1, 0]],
         [[0, 1, 0], [1, -4, 1], [0, 1, 0]]]
    return torch.tensor(f, dtype=torch.float32)[:, None] / 4


def _pixels(images: list[Image.Image], size: int = FEATURE_PX) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def texture_features(images: list[Image.Image]) -> torch.Tensor:
    """Download-free style features: [sqrt RGB histogram | Gram matrices of the fixed filters applied to each colour
    channel, at 64, 32, 16 and 8 px], each block L2-normalised. The Gram matrix across filters *and* channels is
    Gatys et al.'s style statistic, here over hand-designed filters instead of VGG features: it sees texture and
    how colours vary together, not where things are. (On the demo style, per-channel Grams over four scales
    separated a striped LoRA from its base ~8x more than a grey-only Gram at two scales.)"""
    x = _pixels(images)
    bins = (x * 3.999).long()
    index = bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2]
    hist = torch.stack([torch.bincount(i.flatten(), minlength=64).float() for i in index])
    blocks = [torch.nn.functional.normalize(hist.sqrt(), dim=1)]
    for pool in (1, 2, 4, 8):
        scaled = torch.nn.functional.avg_pool2d(x, pool) if pool > 1 else x
        r = torch.nn.functional.conv2d(scaled.flatten(0, 1)[:, None], _filters(), padding=1)  # [n*3, 5, h, w]
        r = r.reshape(len(images), 15, -1)
        gram = r @ r.transpose(1, 2) / r.shape[-1]
        iu = torch.triu_indices(15, 15)
        g = gram[:, iu[0], iu[1]]
        blocks.append(torch.nn.functional.normalize(g.sign() * g.abs().sqrt(), dim=1))
    return torch.cat(blocks, 1) / len(blocks) ** 0.5


def layout_features(images: list[Image.Image]) -> torch.Tensor:
    """Where which colour is: a 16x16 RGB thumbnail minus its mean, L2-normalised (an exact copy scores 1.0)."""
    x = _pixels(images, 16).flatten(1)
    return torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)


class ClipFeatures:
    """CLIP image and text embeddings from a local folder (CLIPModel + tokenizer + image processor)."""

    def __init__(self, folder: str, device: torch.device):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        if not Path(folder, "config.json").is_file():
            raise ReportError(f"report.clip_model {folder!r}: not a local CLIP model folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
            self.processor = CLIPImageProcessor.from_pretrained(folder)
        except Exception as err:  # transformers raises OSError/ValueError/KeyError for wrong or partial folders
            raise ReportError(f"report.clip_model {folder!r}: cannot load a CLIPModel with tokenizer and image "
                              f"processor: {str(err).strip().splitlines()[0] if str(err).strip() else err}") from None
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return torch.nn.functional.normalize(self._vec(self.model.get_image_features(pixel_values=pixels)), dim=1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(self._vec(self.model.get_text_features(**ids)), dim=1).cpu()

    @staticmethod
    def _vec(out) -> torch.Tensor:  # transformers 5 may return an output object instead of a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------- rendering


def report_prompts(cfg: Config, demo: bool) -> list[str]:
    prompts = cfg.report.prompts or (demo_data.REPORT_PROMPTS if demo else GENERIC_PROMPTS)
    return [p.replace("{trigger}", cfg.data.trigger).strip(" ,") for p in prompts]


def is_demo_base(folder: str | Path) -> bool:
    """The demo base carries demo.json (its recipe); its vocabulary makes the pixel content check possible."""
    return Path(folder, "demo.json").is_file()


@torch.no_grad()
def render(cfg: Config, adapter: Path, prompts: list[str], device: torch.device, ref_prompts: list[str] = (),
           train_images: list[Image.Image] = ()) -> tuple[dict[float, list[Image.Image]], list[Image.Image], list]:
    """{scale: images in (prompt, seed) order} for the base (0.0) and the LoRA at each other scale; the base's
    images of `ref_prompts` (the training captions, seed = their index): what the base draws without the style;
    and `train_images` through the base's VAE: what of them the base can draw at all."""
    from trainer.families.loading import load_base
    from trainer.lora_files.adapter_files import load_lora_file
    from trainer.preview.render import draw, sample_settings

    pipe = load_base(cfg.model).pipeline()  # SD1/SD2/SDXL pipeline of the base's family
    pipe.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_lora_file(pipe, adapter, "style")  # load_lora_weights; a LoKr in peft's layout too
    out: dict[float, list[Image.Image]] = {}
    for scale in SCALES:
        if scale == 0.0:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(["style"], adapter_weights=[scale])
        settings = {**sample_settings(cfg), "steps": cfg.report.steps or cfg.sample.steps}
        out[scale] = [draw(pipe, prompt, seed=seed, **settings) for prompt in prompts for seed in cfg.report.seeds]
        if scale == 0.0:
            ref = [draw(pipe, prompt, seed=i, **settings) for i, prompt in enumerate(ref_prompts)]
    return out, ref, vae_roundtrip(pipe.vae, train_images, settings["width"], settings["height"])


@torch.no_grad()
def vae_roundtrip(vae, images: list[Image.Image], width: int, height: int) -> list[Image.Image]:
    """Each image at the report's size, encoded and decoded by the base's VAE: detail finer than the VAE keeps
    (grain, hairlines) is gone, so it does not count as style the LoRA could have learned."""
    out = []
    for k in range(0, len(images), 4):
        arr = np.stack([np.asarray(im.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
                        for im in images[k:k + 4]]) / 127.5 - 1
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out += [Image.fromarray(((a + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()) for a in y]
    return out


def save_images(images: dict[float, list[Image.Image]], extra: dict[str, list[Image.Image]], folder: Path) -> None:
    """report.keep_images: every image losslessly, named by row (base, 0.5, 1.0, then `extra`'s) and column."""
    folder.mkdir(exist_ok=True)
    rows = {("base" if scale == 0 else str(scale)): ims for scale, ims in images.items()} | extra
    for row, ims in rows.items():
        for i, im in enumerate(ims):
            im.save(folder / f"{row}_{i:02d}.png")


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    return list(range(n)) if n <= k else [round(i * (n - 1) / (k - 1)) for i in range(k)]


def grid_png(images: dict[float, list[Image.Image]], path: Path, cell: int = 96, footer: str = "") -> None:
    """Rows: base, LoRA 0.5, LoRA 1.0 (labelled); columns: prompt x seed, as in report.json; `footer` (the verdict
    and any warning, which is drawn in red) below, wrapped to the grid's width."""
    label_w = 70
    cols = len(images[SCALES[0]])
    width = label_w + cols * cell
    verdict, _, warning = footer.partition(" | ")
    lines = [(t, colour) for text, colour in ((verdict, "black"), (warning, "firebrick")) if text
             for t in textwrap.wrap(text, max(40, width // 6 - 2))]
    grid = Image.new("RGB", (width, len(SCALES) * cell + 14 * len(lines) + (8 if lines else 0)), "white")
    pen = ImageDraw.Draw(grid)
    for r, scale in enumerate(SCALES):
        pen.text((6, r * cell + cell // 2 - 6), "base" if scale == 0 else f"LoRA {scale}", fill="black")
        for c, im in enumerate(images[scale]):
            small = im.width < cell
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST if small else Image.LANCZOS),
                       (label_w + c * cell, r * cell))
    for i, (text, colour) in enumerate(lines):
        pen.text((6, len(SCALES) * cell + 4 + 14 * i), text, fill=colour)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


# ----------------------------------------------------------------------------- metrics


def measure(images: dict[float, list[Image.Image]], train_images: list[Image.Image], prompts: list[str],
            seeds: list[int], demo: bool, clip: ClipFeatures | None) -> dict:
    """Style similarity and lift, fidelity and copying per scale (keys "0.0", "0.5", "1.0")."""
    style = clip.images if clip else texture_features
    copy = clip.images if clip else layout_features
    train_style, train_copy = style(train_images), copy(train_images)
    per_image_prompts = [p for p in prompts for _ in seeds]
    base_layout = layout_features(images[0.0])
    result: dict[str, dict[str, float]] = {"style_similarity": {}, "style_lift": {}, "fidelity": {}, "copying": {}}
    for scale, ims in images.items():
        key = str(scale)
        sim = (style(ims) @ train_style.T).mean().item()
        result["style_similarity"][key] = round(sim, 4)
        result["copying"][key] = round((copy(ims) @ train_copy.T).max().item(), 4)
        if clip:
            fid = (clip.images(ims) * clip.texts(per_image_prompts)).sum(1).mean().item()
        elif demo:
            checks = [demo_data.content_check(im, *demo_data.parse_caption(p)) for im, p in zip(ims, per_image_prompts)]
            fid = float(np.mean([np.mean(list(c.values())) for c in checks]))
        else:
            fid = (layout_features(ims) * base_layout).sum(1).mean().item()
        result["fidelity"][key] = round(fid, 4)
    base_sim = result["style_similarity"]["0.0"]
    result["style_lift"] = {k: round(v - base_sim, 4) for k, v in result["style_similarity"].items() if k != "0.0"}
    return result


def style_own(drawable: list[Image.Image], index: list[int], captions: list[str], train_images: list[Image.Image],
              demo: bool, clip: ClipFeatures | None) -> tuple[float | None, float]:
    """What the style itself scores, for the overcooking warning: prompt fidelity of the training images as the
    base can draw them against their own captions (None where fidelity does not read the prompt), and how close
    each comes to the nearest *other* training image on the copying measure (`index`: which file each is)."""
    fid = None
    if clip:
        fid = (clip.images(drawable) * clip.texts([captions[k] for k in index])).sum(1).mean().item()
    elif demo and all(demo_data.parse_caption(captions[k]) for k in index):
        checks = [demo_data.content_check(im, *demo_data.parse_caption(captions[k])) for im, k in zip(drawable, index)]
        fid = float(np.mean([np.mean(list(c.values())) for c in checks]))
    copy = clip.images if clip else layout_features
    sim = copy(drawable) @ copy(train_images).T
    sim[torch.arange(len(index)), torch.tensor(index)] = -1.0  # itself is not another image
    return (None if fid is None else round(fid, 4)), round(sim.max().item(), 4)


def fidelity_measure(demo: bool, clip: bool) -> str:
    if clip:
        return "CLIP text-image cosine of each image and its prompt"
    if demo:
        return "demo content check: fraction of colour/background/position/shape read back from the pixels as prompted"
    return "layout similarity (16x16 thumbnails, cosine) of each image to the base image of the same prompt and seed"


# ----------------------------------------------------------------------------- the whole report


def verdict_line(report: dict) -> str:
    """The verdict, its reason and the overcooking warning: the CLI line and the grid's footer."""
    line = f"{report['verdict']['verdict']}: {report['verdict']['reason']}"
    warning = report.get("overcooking", {}).get("warning")
    return line + (f" | WARNING {warning}" if warning else "")


def embed_summary(adapter: Path, summary: dict) -> None:
    """Add the summary to an adapter file's header, keeping every tensor and every other header entry."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(adapter), "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata[METADATA_KEY] = json.dumps(summary, sort_keys=True)
    with atomic_path(adapter) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def report_paths(cfg: Config, run_dir: Path, stem: str | None = None) -> tuple[Path, Path]:
    """(report.json, report.png) of the final adapter, or RUN/reports/<stem>.json/.png of a save."""
    if not stem or stem == cfg.output.name:
        return Path(run_dir) / "report.json", Path(run_dir) / "report.png"
    return Path(run_dir) / "reports" / f"{stem}.json", Path(run_dir) / "reports" / f"{stem}.png"


def write_report(cfg: Config, run_dir: Path, stem: str | None = None) -> dict:
    """Render, measure, and write RUN/report.json, RUN/report.png and the summary in both adapter files. `stem`: a
    save of the run (trainer/report/saves.py) instead of the final adapter; its report goes to report_paths."""
    from trainer.data import dataset as ds
    from trainer.families.loading import resolve_source

    started = time.time()
    run_dir = Path(run_dir)
    stem = stem or cfg.output.name
    json_path, png_path = report_paths(cfg, run_dir, stem)
    adapters = [run_dir / f"{stem}.diffusers.safetensors", run_dir / f"{stem}.safetensors"]
    missing = [p.name for p in adapters if not p.is_file()]
    if missing:
        raise ReportError(f"no adapter to report on: {', '.join(missing)} missing in {run_dir}")
    kind, where = resolve_source(cfg.model.path)
    demo = kind == "folder" and is_demo_base(where)
    prompts = report_prompts(cfg, demo)
    if demo and not all(demo_data.parse_caption(p) for p in prompts):
        demo = False  # prompts outside the demo vocabulary: no pixel content check
    items = [i for i in ds.scan_dataset(cfg.data)[0] if not i.is_reg]  # the style's images, not the reg set
    if not items:
        raise ReportError(f"no training images found in {cfg.data.path}")
    plain = cfg.data.model_copy(update={"caption_dropout": 0.0, "shuffle_captions": False})
    item_captions = [ds.build_caption(i.caption, plain, random.Random(0), i.trigger) for i in items]
    captions = set(item_captions)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip = ClipFeatures(cfg.report.clip_model, device) if cfg.report.clip_model else None
    ref_items, vae_items = _spread(len(items), REF_IMAGES), _spread(len(items), VAE_IMAGES)
    train_images = [Image.open(i.path).convert("RGB") for i in items]
    images, ref, drawable = render(cfg, adapters[0], prompts, device, [item_captions[k] for k in ref_items],
                                   [train_images[k] for k in vae_items])
    metrics = measure(images, train_images, prompts, cfg.report.seeds, demo, clip)
    metrics["verdict"] = style_verdict(drawable, ref, images[0.0],
                                       {str(k): v for k, v in images.items() if k != 0.0},
                                       embed=(lambda ims: clip.images(ims).numpy()) if clip else None,
                                       raw_train=train_images)
    metrics["fidelity_style"], metrics["copying_style"] = style_own(drawable, vae_items, item_captions, train_images,
                                                                    demo, clip)
    metrics["overcooking"] = overcooking(metrics["fidelity"], metrics["copying"], metrics["fidelity_style"],
                                         metrics["copying_style"])
    png_path.parent.mkdir(exist_ok=True)
    grid_png(images, png_path, footer=verdict_line(metrics))
    if cfg.report.keep_images:
        save_images(images, {"ref": ref, "vae": drawable}, json_path.with_suffix(""))
    report = {
        "prompts": prompts, "seeds": cfg.report.seeds, "scales": list(SCALES),
        "held_out": not any(p in captions for p in prompts),
        "features": "CLIP image embeddings (" + cfg.report.clip_model + ")" if clip else
                    "download-free: sqrt RGB histogram 4x4x4 + Gram of 5 fixed derivative filters x RGB at 4 scales",
        "copying_features": "CLIP image embeddings" if clip else "16x16 RGB layout, mean removed (1.0 = exact copy)",
        "fidelity_measure": fidelity_measure(demo, clip is not None),
        **metrics,
        "train_images": len(train_images), "image": png_path.name, "seconds": round(time.time() - started, 1),
    }
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    summary = {k: report[k] for k in ("style_lift", "fidelity", "copying", "held_out")}
    summary["verdict"] = report["verdict"]["verdict"]
    summary["progress"] = report["verdict"]["progress"]
    summary["warning"] = report["overcooking"]["warning"]
    summary["features"] = "clip" if clip else "download-free"
    for adapter in adapters:
        embed_summary(adapter, summary)
    return report


def run_report(cfg: Config, run_dir: Path) -> dict | None:
    """The report step after a finished run: `report` event on success; on any failure a `report_failed` event
    with the reason (the adapters stay as they are). Skipped when disabled or when the run was stopped early."""
    from trainer.events import DONE, ENDS, REPORT, REPORT_FAILED, REPORT_STARTED, EventLog, read_events

    run_dir = Path(run_dir)
    events = EventLog(run_dir / "events.jsonl")
    ends = [e for e in read_events(run_dir / "events.jsonl")[0] if e.get("type") in ENDS]
    if not cfg.report.enabled or not ends or ends[-1]["type"] != DONE:
        return None
    events.emit(REPORT_STARTED)
    try:
        report = write_report(cfg, run_dir)
    except Exception as err:  # a report must never cost the run: say why and keep the adapters
        reason = str(err) if isinstance(err, (ReportError, ValueError, FileNotFoundError)) else \
            f"{type(err).__name__}: {err}"
        events.emit(REPORT_FAILED, reason=reason)
        print(f"style report failed (the adapters are fine): {reason}")
        return None
    keys = ("style_lift", "fidelity", "copying", "held_out", "features", "seconds")
    verdict = report["verdict"]
    events.emit(REPORT, path=str(run_dir / "report.json"), image=str(run_dir / "report.png"),
                verdict=verdict["verdict"], progress=verdict["progress"], reason=verdict["reason"],
                has_style=verdict["has_style"], warning=report["overcooking"]["warning"],
                **{k: report[k] for k in keys})
    print(f"style report: {verdict_line(report)}")
    print(f"style report: lift {report['style_lift']}, fidelity {report['fidelity']}, copying {report['copying']} "
          f"({report['seconds']} s) -> {run_dir / 'report.json'}")
    return report
