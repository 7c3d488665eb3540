"""The dataset summary shown before training (CLI start and the UI's Dataset tab): images per concept, bucket
histogram, smallest and largest images, captions missing or empty, estimated steps per epoch. No torch."""

from __future__ import annotations

import math
from collections import Counter

from trainer.config import Config
from trainer.data.dataset import Item, Problem, epoch_batches

LISTED_FILES = 5  # names shown for missing/empty captions before "... and N more"


def summarize(items: list[Item], problems: list[Problem], cfg: Config, processes: int = 1) -> dict:
    """Plain numbers about a scanned dataset (`trainer.data.dataset.scan_dataset`) under `cfg`'s batch settings."""
    concepts: dict[str, dict] = {}
    for item in items:
        c = concepts.setdefault(item.folder, {"images": 0, "seen_per_epoch": 0, "reg": item.is_reg,
                                              "trigger": cfg.data.trigger if item.trigger is None else item.trigger})
        c["images"] += 1
        c["seen_per_epoch"] += item.repeats
    buckets = Counter(f"{w}x{h}" for w, h in (item.bucket for item in items))
    by_area = sorted(items, key=lambda i: (i.size[0] * i.size[1], str(i.path)))
    batches = len(epoch_batches(items, cfg.train.batch_size, cfg.train.seed, 0))
    states = {state: [str(i.path) for i in items if i.caption_state == state] for state in ("missing", "empty")}
    shares = [i.mask_share for i in items if i.mask_share is not None]
    return {
        "images": sum(not i.is_reg for i in items),
        "reg_images": sum(i.is_reg for i in items),
        "concepts": concepts,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0]))),
        "smallest": {"path": str(by_area[0].path), "size": list(by_area[0].size)} if items else None,
        "largest": {"path": str(by_area[-1].path), "size": list(by_area[-1].size)} if items else None,
        "captions_missing": states["missing"],
        "captions_empty": states["empty"],
        "skipped": [str(p.path) for p in problems if p.skipped],
        # data.masked_loss: how many images have a mask, and the mean share of their trained area it keeps
        "masked": {"images": len(shares), "share": sum(shares) / len(shares) if shares else 0.0}
        if cfg.data.masked_loss else None,
        "batches_per_epoch": batches,
        "steps_per_epoch": math.ceil(batches / (cfg.train.grad_accum * processes)),
    }


def _files(paths: list[str]) -> str:
    names = ", ".join(paths[:LISTED_FILES])
    return names + (f" ... and {len(paths) - LISTED_FILES} more" if len(paths) > LISTED_FILES else "")


def format_summary(summary: dict, steps: int | None = None, epochs: int = 0) -> str:
    """Readable lines (plain text that is also Markdown). `steps`/`epochs`: the run's train.steps/epochs, to say
    how many epochs the run covers."""
    s = summary
    lines = [f"Dataset: {s['images']} images" + (f" + {s['reg_images']} regularisation images" if s["reg_images"]
                                                 else "")]
    for folder, c in sorted(s["concepts"].items()):
        what = "regularisation" if c["reg"] else f"trigger '{c['trigger']}'" if c["trigger"] else "no trigger"
        lines.append(f"- {folder or '(top folder)'}: {c['images']} images, seen {c['seen_per_epoch']}x per epoch "
                     f"(with repeats), {what}")
    lines.append("- buckets: " + ", ".join(f"{b} ×{n}" for b, n in s["buckets"].items()))
    if s["smallest"]:
        lines.append(f"- smallest: {s['smallest']['path']} ({s['smallest']['size'][0]}x{s['smallest']['size'][1]}); "
                     f"largest: {s['largest']['path']} ({s['largest']['size'][0]}x{s['largest']['size'][1]})")
    for key, label in (("captions_missing", "no caption file"), ("captions_empty", "empty caption")):
        if s[key]:
            lines.append(f"- {label}: {len(s[key])} ({_files(s[key])})")
    if s.get("masked"):
        m, total = s["masked"], s["images"] + s["reg_images"]
        lines.append(f"- masked loss: {m['images']} of {total} images have a mask, keeping {m['share']:.0%} of their "
                     f"area on average" + ("; the others train whole" if m["images"] < total else ""))
    if s["skipped"]:
        lines.append(f"- skipped: {len(s['skipped'])} files ({_files(s['skipped'])})")
    per_epoch = s["steps_per_epoch"]
    estimate = f"- about {per_epoch} steps per epoch ({s['batches_per_epoch']} batches)"
    if epochs:
        estimate += f"; {epochs} epochs = about {epochs * per_epoch} steps"
    elif steps:
        estimate += f"; {steps} steps = about {steps / max(per_epoch, 1):.1f} epochs"
    lines.append(estimate)
    return "\n".join(lines)
