"""Write Deltas (trainer.lora_tools.deltas) as a LoRA file: the kohya/A1111 layout or the diffusers/peft one.

Both are written as trainer.lora_files writes a run's files, so every consumer applies exactly ΔW = scale·up·down:
kohya files at one rank with alpha = rank and each module's scale folded into lora_up (zero-padded where a module's
rank is lower; q/k/v of a fused weight fused exactly), with kohya's hashes; diffusers files with a peft config per
part (rank_pattern) in `lora_adapter_metadata`. Only low-rank Deltas can be written: a full ΔW (LoHa, LoKr, DoRA)
is factored first (trainer.lora_tools.lowrank). The header keeps the source's metadata except what described the old
tensors (hashes, layout notes, the DoRA/LoKr export notes) and records the operation under `style_lora_tool`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.lora_tools.deltas import Delta

TOOL_KEY = "style_lora_tool"  # header entry: what the toolbox did to make this file (JSON)
# header entries that describe the tensors of the file they were read from, not of a new one
STALE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "style_lora_alpha", "style_lora_dora_scale",
         "style_lora_plain", "style_lora_plain_skipped", "style_lora_compact", "style_lora_lycoris", "format",
         "ss_network_args", "lora_adapter_metadata")


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output that is not a .safetensors file name in an existing folder, or that exists without
    --overwrite."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: the output must be a .safetensors file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give the output a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise ValueError(f"{path}: exists; pass --overwrite to replace it, or choose another --out")


def new_header(header: dict[str, str], operation: dict, rank: int) -> dict[str, str]:
    """The source's metadata without what described its tensors, with the new rank and the operation recorded."""
    out = {k: v for k, v in header.items() if k not in STALE}
    out.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank))
    out[TOOL_KEY] = json.dumps(operation, sort_keys=True, default=str)
    return out


def _plain(deltas: dict[str, Delta], where: Path) -> dict[str, Delta]:
    full = [k for k, d in deltas.items() if d.rank is None]
    if full:
        raise ValueError(f"{where}: {full[0]} is a full ΔW (LoHa, LoKr or DoRA); resize it to a rank first")
    if not deltas:
        raise ValueError(f"{where}: no modules to write")
    return deltas


def peft_tensors_of(deltas: dict[str, Delta]) -> tuple[dict[str, torch.Tensor], dict]:
    """diffusers/peft tensors (scale folded into lora_B, alpha = rank per module) and their adapter metadata."""
    from trainer.lora_files.kohya import lora_config
    from trainer.lora_files.kohya_names import peft_key

    tensors, per_part = {}, {}
    for key, d in deltas.items():
        part, module = key.split(".", 1)
        name = peft_key(part, module)
        tensors[f"{name}.lora_A.weight"] = d.down.float().contiguous()
        tensors[f"{name}.lora_B.weight"] = (d.up.float() * d.scale).contiguous()
        per_part.setdefault(part, {})[module] = (d.rank, float(d.rank), False)
    metadata = {}
    for part, modules in per_part.items():
        metadata.update({f"{part}.{k}": v for k, v in lora_config(modules).items()})
    return tensors, metadata


def write_lora(path: Path, deltas: dict[str, Delta], family: str, layout: str, header: dict[str, str],
               overwrite: bool = False, unet_config=None) -> Path:
    """Write low-rank `deltas` of a `family` base as a kohya or diffusers file at `path`, atomically."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    from trainer.io import atomic_path
    from trainer.lora_files.kohya import diffusers_to_kohya, write_kohya

    path = Path(path)
    check_output(path, overwrite)
    deltas = _plain(deltas, path)
    header = {k: str(v) for k, v in header.items()}
    if layout not in ("kohya", "lycoris", "diffusers"):
        raise ValueError(f"{path}: unknown layout {layout!r} (kohya or diffusers)")
    tensors, metadata = peft_tensors_of(deltas)
    if layout != "diffusers":  # kohya: one rank, alpha = rank, as every run's kohya file (trainer.lora_files.kohya)
        return write_kohya(path, diffusers_to_kohya(tensors, metadata, family, unet_config=unet_config), header)
    header.update(format="pt")
    header[LORA_ADAPTER_METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True, default=str)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path
