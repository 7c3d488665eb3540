"""Which downloaded adapter file goes into which tool, for the Runs panel. Reads each file's safetensors header (the
JSON before the tensors) for what the trainer wrote there; no torch, no gradio. The measured numbers behind it:
docs/consumers.md (scripts/consumer_table.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainer.io import read_safetensors_header

# Header entries written by trainer/lora_files/dora.py (kept equal by a test; importing it would import torch).
DORA_SCALE_KEY = "style_lora_dora_scale"
PLAIN_KEY = "style_lora_plain"
LYCORIS_KEY = "style_lora_lycoris"  # trainer/lora_files/lycoris.py
STEP = re.compile(r"-step\d{6}\.(diffusers\.|plain\.)?safetensors$")


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file; {} when it cannot be read."""
    try:
        return dict(read_safetensors_header(path).get("__metadata__") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def file_use(path: Path) -> str:
    """One line: the file, the tools it is for, and how exactly they apply it."""
    name = Path(path).name
    meta = read_metadata(Path(path))
    if name.endswith(".diffusers.safetensors"):
        return (f"`{name}`: diffusers (`pipe.load_lora_weights`) and this app's Preview — exact for every variant "
                "(no key loads in A1111/ComfyUI).")
    if PLAIN_KEY in meta:
        try:
            plain = json.loads(meta[PLAIN_KEY])
            errors = ", ".join(f"{part.replace('_', ' ')} {err:.2%}" for part, err in plain["rel_error"].items())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"`{name}`: a plain LoRA made from the DoRA: loads in every tool (error not readable)."
        return (f"`{name}`: the DoRA as a plain LoRA of rank {plain.get('rank')} — loads the same in A1111/Forge, "
                f"ComfyUI, kohya `merge_lora.py` and diffusers; relative error of the weight change: {errors}.")
    if LYCORIS_KEY in meta:
        return (f"`{name}`: A1111/Forge and ComfyUI (LyCORIS keys) — exact. kohya `merge_lora.py` and diffusers do not "
                "read LyCORIS keys: in diffusers use the `.diffusers.safetensors` file (the same ΔW as a plain LoRA).")
    if DORA_SCALE_KEY in meta:
        return (f"`{name}`: ComfyUI and Forge — exact (DoRA). A1111, kohya `merge_lora.py` and diffusers' kohya loader "
                "cannot apply this DoRA: use the `.plain.safetensors` file there.")
    return (f"`{name}`: A1111/Forge, ComfyUI, kohya `merge_lora.py`, diffusers — exact "
            "(one rank, alpha = rank, the trained scale folded in).")


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
