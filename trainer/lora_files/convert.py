"""`python -m trainer convert`: a LoRA file from the kohya layout to the diffusers/PEFT one and back, and the checked
reading of any adapter .safetensors file (`read_adapter_file`, also the preview's) that conversion starts from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.io import atomic_path
from trainer.lora_files.dora import DORA_SCALE_KEY
from trainer.lora_files.kohya import base_weight, diffusers_to_kohya, kohya_to_diffusers, write_kohya
from trainer.lora_files.kohya_names import diffusers_file_kind, family_of, kohya_file_kind
from trainer.lora_files.shapes import check_base_fit, check_shapes


def read_adapter_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a .safetensors file; anything else is refused (pickles can run code)."""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files can be converted ({path.suffix or 'no suffix'} files "
                         "may be Python pickles, which can run arbitrary code when loaded)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .safetensors file ({err})") from None
    check_shapes(str(path), {k: tuple(t.shape) for k, t in state.items()})  # rank agreement of every module
    for key, tensor in state.items():  # NaN/Inf weights render black or noise images everywhere the file is used
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {key} holds {str(tensor.dtype).removeprefix('torch.')} values; LoRA "
                             "weights are floating point, so this is not a LoRA file (or it is broken)")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key} holds NaN/Inf values, so the adapter is broken (its training "
                             "diverged?); retrain it with a lower learning rate or use another file")
    return state, header


def base_parts(model) -> dict[str, torch.nn.Module] | None:
    """The LoRA-able parts of a base: given as {part: module} already, or loaded from a path / hub id."""
    if model is None or isinstance(model, dict):
        return model
    from trainer.config import ModelConfig
    from trainer.families.loading import load_base

    return load_base(ModelConfig(path=str(model))).parts()


def check_fits_base(src: Path, tensors: dict[str, torch.Tensor], parts: dict | None) -> None:
    """With a base model (--model): every module of the file fits its base weight, else ValueError naming it."""
    if parts:
        check_base_fit(str(src), {k: tuple(t.shape) for k, t in tensors.items()},
                       lambda part, module: base_weight(parts, part, module).shape)


def convert_file(src: Path, dst: Path, to: str, base: str | None = None, model=None) -> Path:
    """Convert a LoRA file between the kohya and diffusers/PEFT layouts (to = "kohya" | "diffusers"), keeping its
    metadata and the exact strength of every module. Writes `dst` atomically. `base` (a family name, e.g. sdxl): the
    family, when the file's metadata and keys do not tell. `model`: the base model (path, hub id, or {part: module}),
    needed only for DoRA files, whose kohya dora_scale is relative to the base weights."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    src, dst = Path(src), Path(dst)
    if to not in ("kohya", "diffusers"):
        raise ValueError(f"convert: unknown target format {to!r} (use 'kohya' or 'diffusers')")
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"{dst}: the output must be a .safetensors file")
    if dst.is_dir():
        raise ValueError(f"{dst}: is a folder; give the output a file name, e.g. {dst / src.name}")
    folder = next((p for p in dst.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise ValueError(f"{dst}: '{folder}' is a file, not a folder; pick another output path")
    state, header = read_adapter_file(src)
    is_kohya = any(k.startswith("lora_") for k in state)
    dora = any(k.endswith(("dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")) for k in state)
    if dora and model is None and (to == "kohya" or DORA_SCALE_KEY in header):
        raise ValueError(f"{src}: a DoRA LoRA; its kohya dora_scale is relative to the base model's weights (ComfyUI's "
                         "formula), so converting it needs the base model: pass --model")
    parts, file_header = base_parts(model) if dora or model is not None else None, dict(header)

    # Hashes describe the old payload and would be wrong for the new one; the layout notes describe the old layout.
    header = {k: v for k, v in header.items() if not k.startswith("sshs_") and k not in (
        "format", "modelspec.hash_sha256", DORA_SCALE_KEY, "style_lora_alpha")}
    if to == "diffusers" and not is_kohya:
        raise ValueError(f"{src}: not a kohya LoRA (no lora_unet_/lora_te_ keys)")
    if to == "kohya" and is_kohya:
        raise ValueError(f"{src}: already a kohya LoRA")
    try:
        if to == "diffusers":
            return _kohya_to_diffusers_file(src, dst, state, header, file_header, parts, base)
        check_fits_base(src, state, parts)
        raw = header.pop(LORA_ADAPTER_METADATA_KEY, None)
        kind = base or diffusers_file_kind(state, header)
        return write_kohya(dst, diffusers_to_kohya(state, json.loads(raw) if raw else {}, kind, parts), header)
    except ValueError as err:  # every message names the file, also those of the conversion itself
        raise ValueError(str(err) if str(err).startswith(str(src)) else f"{src}: {err}") from None


def _kohya_to_diffusers_file(src: Path, dst: Path, state: dict, header: dict, file_header: dict, parts: dict | None,
                             base: str | None) -> Path:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    if base and family_of(base).KOHYA_LAYOUT != family_of(kohya_file_kind(state)).KOHYA_LAYOUT:
        raise ValueError(f"{src}: its keys are not those of a {base} LoRA")
    tensors, adapter_metadata = kohya_to_diffusers(state, parts, kind=base, header=file_header)
    check_fits_base(src, tensors, parts)
    header.update(format="pt")
    header[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True, default=str)
    with atomic_path(dst) as tmp:
        save_file(tensors, tmp, metadata=header)
    return dst
