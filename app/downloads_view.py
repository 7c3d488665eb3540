"""Which downloaded adapter file goes into which tool, for the Runs panel. Reads each file's safetensors header (the
JSON before the tensors) for what the trainer wrote there; no torch, no gradio. The measured numbers behind it:
docs/consumers.md (scripts/consumer_table.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainer import families
from trainer.io import read_safetensors_header

# Header entries written by trainer/lora_files/dora.py (kept equal by a test; importing it would import torch).
DORA_SCALE_KEY = "style_lora_dora_scale"
PLAIN_KEY = "style_lora_plain"
PLAIN_SKIPPED_KEY = "style_lora_plain_skipped"
COMPACT_KEY = "style_lora_compact"  # trainer/lora_files/export.py: a LoHa/LoKr diffusers file, exact or its error
LYCORIS_KEY = "style_lora_lycoris"  # trainer/lora_files/lycoris.py
LOKR_LAYOUT_KEY = "style_lora_lokr_layout"  # trainer/lora_files/export.py: a diffusers file in peft's LoKr layout
EXPORT_SKIPPED_KEY = "style_lora_export_skipped"  # trainer/lora_files/export.py: files not written for time
EXPORT_FLOOR_S = 30.0  # trainer/lora_files/export.py: the least time budget of the optional exports
STEP = re.compile(r"-step\d{6}\.(diffusers\.|plain\.)?safetensors$")


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file; {} when it cannot be read."""
    try:
        return dict(read_safetensors_header(path).get("__metadata__") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def read_report(meta: dict[str, str], key: str) -> dict | None:
    """A JSON error report from the header (trainer.adapters.compact.error_report), None when absent or unreadable."""
    try:
        report = json.loads(meta[key])
        return report if isinstance(report.get("rel_error"), dict) else None
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def read_json(meta: dict[str, str], key: str) -> dict | None:
    """A JSON object from the header, None when absent or unreadable."""
    try:
        value = json.loads(meta[key])
        return value if isinstance(value, dict) else None
    except (KeyError, ValueError, TypeError):
        return None


def time_skips(meta: dict[str, str]) -> dict[str, str]:
    """{suffix of a file not written (".plain.safetensors", ".diffusers.safetensors"): why, in words} from a kohya
    file's EXPORT_SKIPPED_KEY (the optional exports' SVDs ran past the time budget, trainer/lora_files/export.py)."""
    out = {}
    for name, why in (read_json(meta, EXPORT_SKIPPED_KEY) or {}).items():
        suffix = next((s for s in (".plain.safetensors", ".diffusers.safetensors") if name.endswith(s)), None)
        if suffix and isinstance(why, dict):
            out[suffix] = (f"its SVDs ran past the export time budget (stopped after {why.get('layers_done')} of "
                           f"{why.get('layers')} layers, {why.get('spent_s')} s of {why.get('budget_s')} s: an "
                           f"export may take as long as the training did, at least {EXPORT_FLOOR_S:g} s)")
    return out


def lokr_layout_use(head: str, name: str, family, layout: dict) -> str:
    """The line of a diffusers file written in peft's LoKr layout (no plain LoRA came near the LoKr)."""
    part = family.DENOISER
    why = layout.get("plain_lora")
    reason = (f"a plain LoRA no larger than the weights it changes would be off by {error_text(why)}"
              if isinstance(why, dict) and isinstance(why.get("rel_error"), dict) else
              "the plain LoRA's SVDs ran past the export time budget")
    return (f"{head}: diffusers and this app's Preview — **exact**, in peft's own LoKr layout: load it with "
            f"`pipe.{part}.load_lora_adapter(folder, weight_name=\"{name}\", prefix=\"{part}\", "
            "adapter_name=\"style\")` (text encoder parts: docs/consumers.md). `pipe.load_lora_weights` does not read "
            f"this layout; the plain-LoRA layout it reads was not written: {reason}.")


def error_text(report: dict) -> str:
    """"unet 0.31 %, text encoder 2.10 % (worst layer 9.8 %; target 1 %)" from an error report."""
    parts = ", ".join(f"{part.replace('_', ' ')} {err:.2%}" for part, err in report["rel_error"].items())
    worst = report.get("max_layer_rel_error")
    target = report.get("max_error")
    extra = "; ".join(x for x in (f"worst layer {worst:.1%}" if isinstance(worst, (int, float)) else "",
                                  f"target {target:.2%}" if isinstance(target, (int, float)) else "") if x)
    return parts + (f" ({extra})" if extra else "")


def size_text(path: Path, report: dict | None) -> str:
    """"1.2 MB" or, when the header says, "1.2 MB, for 3.4 MB of base weights it changes"."""
    try:
        size = megabytes(Path(path).stat().st_size)
    except OSError:
        return "size unknown"
    weights = (report or {}).get("weight_bytes")
    return f"{size}, for {megabytes(weights)} of base weights it changes" if isinstance(weights, (int, float)) else size


def file_use(path: Path) -> str:
    """One line: the file and its size, the tools it is for, and how exactly they apply it (measured error)."""
    name = Path(path).name
    meta = read_metadata(Path(path))
    compact, plain, skipped = (read_report(meta, k) for k in (COMPACT_KEY, PLAIN_KEY, PLAIN_SKIPPED_KEY))
    layout = read_json(meta, LOKR_LAYOUT_KEY)
    head = f"`{name}` ({size_text(path, compact or plain or layout)})"
    family = families.version_family(meta.get("ss_base_model_version", "")) or families.FALLBACK
    if name.endswith(".diffusers.safetensors"):
        if layout is not None:
            return lokr_layout_use(head, name, family, layout)
        if compact and not compact.get("exact"):
            return (f"{head}: {family.DIFFUSERS_TOOLS} — **not exact**: a plain LoRA "
                    f"no larger than the weights it changes cannot hold this run's change; relative error "
                    f"{error_text(compact)}. In A1111/Forge and ComfyUI the `.safetensors` file is exact.")
        return f"{head}: {family.DIFFUSERS_TOOLS} — exact for every variant{family.DIFFUSERS_NOTE}."
    if PLAIN_KEY in meta:
        if plain is None:
            return f"{head}: a plain LoRA made from the DoRA: loads in every tool (error not readable)."
        return (f"{head}: the DoRA as a plain LoRA of rank {plain.get('rank')} — loads the same in A1111/Forge, "
                f"ComfyUI, kohya `merge_lora.py` and diffusers; relative error of the weight change: "
                f"{error_text(plain)}.")
    timed_out = time_skips(meta)
    if LYCORIS_KEY in meta:
        diffusers = (f"**no `.diffusers.safetensors` file was written**: {timed_out['.diffusers.safetensors']}, so "
                     "diffusers has no file for this save" if ".diffusers.safetensors" in timed_out else
                     "in diffusers use the `.diffusers.safetensors` file (its line says whether it is exact)")
        return (f"{head}: A1111/Forge and ComfyUI (LyCORIS keys) — exact. kohya `merge_lora.py` and diffusers do not "
                f"read LyCORIS keys: {diffusers}.")
    if DORA_SCALE_KEY in meta:
        if ".plain.safetensors" in timed_out:
            return (f"{head}: ComfyUI and Forge — exact (DoRA); diffusers: the `.diffusers.safetensors` file. "
                    "**A1111 and kohya `merge_lora.py` cannot use this save**: they cannot apply DoRA, and the plain "
                    f"LoRA for them was not written: {timed_out['.plain.safetensors']}.")
        if skipped is not None:
            return (f"{head}: ComfyUI and Forge — exact (DoRA); diffusers: the `.diffusers.safetensors` file. "
                    "**A1111 and kohya `merge_lora.py` cannot use this run**: they cannot apply DoRA, and no plain LoRA "
                    "no larger than the weights it changes comes near it (best: rank "
                    f"{skipped.get('rank')}, relative error {error_text(skipped)}), so none was written "
                    "(set output.plain_lora_rank to write one anyway).")
        return (f"{head}: ComfyUI and Forge — exact (DoRA). A1111, kohya `merge_lora.py` and diffusers' kohya loader "
                "cannot apply this DoRA: use the `.plain.safetensors` file there.")
    return f"{head}: {family.KOHYA_TOOLS} — exact ({family.KOHYA_NOTE})."


def downloads_markdown(files: list[Path]) -> str:
    """The guide for a run's adapter files (intermediate `-stepNNNNNN` saves are the same kinds, summarised)."""
    adapters = [Path(p) for p in files if str(p).endswith(".safetensors")]
    if not adapters:
        return ""
    final = [p for p in adapters if not STEP.search(p.name)]
    lines = ["**Downloads — which file for which tool** (measured in docs/consumers.md):"]
    lines += [f"- {file_use(p)}" for p in final]
    if len(final) < len(adapters):
        lines.append("- `…-stepNNNNNN…` files: the same kinds, saved at an intermediate step.")
    return "\n".join(lines)
