"""Adapter files for the preview: read a kohya or diffusers `.safetensors` LoRA and check it fits a loaded base.

kohya files are converted in memory by trainer.lora_files.kohya against the loaded base, so every module keeps its exact alpha
(diffusers' own kohya loader loses per-module alphas). Every key must name a Linear/Conv2d of the base with fitting
shapes, else `AdapterError` names the file and the first bad key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer import families
from trainer.lora_files.convert import read_adapter_file
from trainer.lora_files.kohya import DIFFUSERS_SUFFIXES, group_modules, kohya_to_diffusers, peft_scaling

class AdapterError(ValueError):
    """An adapter file cannot be used with this base; the message names the file and the reason."""


def pipe_parts(pipe) -> dict[str, torch.nn.Module]:
    """The LoRA-able models of a pipeline: the denoiser ("unet" or "transformer") and its family's text encoders."""
    family = families.of_pipeline(pipe)
    parts = (family.DENOISER, *family.TEXT_ENCODERS)
    return {p: getattr(pipe, p) for p in parts if getattr(pipe, p, None) is not None}


def pipe_kind(pipe) -> str:
    """The name of the pipeline's family."""
    return families.of_pipeline(pipe).NAME


def module_table(pipe) -> dict[str, dict[str, torch.nn.Module]]:
    """{part: {module path as a diffusers file names it (no `text_model.`): Linear/Conv2d}} of the clean base."""
    table: dict[str, dict[str, torch.nn.Module]] = {}
    for part, model in pipe_parts(pipe).items():
        table[part] = {name.removeprefix("text_model."): m for name, m in model.named_modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return table


def read_adapter(path: str | Path, pipe, table: dict | None = None,
                 allow_dora: bool = True) -> tuple[dict[str, tuple[dict, dict]], str]:
    """Read, convert and validate an adapter file for `pipe`'s base.

    Returns ({part: (peft-layout tensors keyed `part.module.lora_A.weight`, diffusers adapter metadata of that part)},
    layout). Raises AdapterError naming the file and the first key that does not fit.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    path = Path(path)
    label = path.name
    try:
        state, header = read_adapter_file(path)
    except ValueError as err:
        raise AdapterError(str(err).replace(str(path), label)) from None
    if not state:
        raise AdapterError(f"{label}: holds no tensors")
    table = table or module_table(pipe)
    kohya = any(k.startswith("lora_") for k in state)
    try:
        if kohya:
            if not all(k.startswith("lora_") for k in state):
                raise ValueError(f"{next(k for k in state if not k.startswith('lora_'))}: mixes kohya and other keys")
            tensors, metadata = kohya_to_diffusers(state, pipe_parts(pipe), pipe_kind(pipe), header)
        else:
            raw = header.get(LORA_ADAPTER_METADATA_KEY)
            metadata = json.loads(raw) if raw else {}
            tensors = state
        groups = group_modules(tensors, DIFFUSERS_SUFFIXES)
    except (ValueError, json.JSONDecodeError) as err:
        raise AdapterError(f"{label}: not a LoRA for this base: {err}") from None
    parts: dict[str, tuple[dict, dict]] = {}
    for name, group in sorted(groups.items()):
        part, _, module = name.partition(".")
        module = module.removeprefix("text_model.")
        if part not in table:
            raise AdapterError(f"{label}: key {name!r}: this base has LoRA-able parts {', '.join(table)} only "
                               "(a LoRA for another architecture?)")
        base = table[part].get(module)
        if base is None:
            raise AdapterError(f"{label}: key {name!r} names no Linear/Conv2d module of the base model "
                               "(a LoRA for another architecture?)")
        down, up = group["lora_A.weight"], group["lora_B.weight"]
        weight = base.weight
        magnitude = group.get("lora_magnitude_vector", group.get("lora_magnitude_vector.weight"))
        if magnitude is not None:
            if not allow_dora:  # the hot-swap slot is a plain LoRA layer
                raise AdapterError(f"{label}: key {name!r}: DoRA adapters cannot go into the hot-swap slot; "
                                   "preview them without --hotswap/--compile")
            if magnitude.numel() != weight.shape[0]:
                raise AdapterError(f"{label}: key {name!r}: DoRA magnitude has {magnitude.numel()} values, the base "
                                   f"module has {weight.shape[0]} outputs")
        conv = isinstance(base, torch.nn.Conv2d)
        want_down = (down.shape[0], *weight.shape[1:]) if conv else (down.shape[0], weight.shape[1])
        want_up = (weight.shape[0], down.shape[0], 1, 1) if conv else (weight.shape[0], down.shape[0])
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise AdapterError(f"{label}: key {name!r}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not "
                               f"fit the base module's weight {tuple(weight.shape)} (a LoRA for another base model?)")
    for part in table:
        keys = {k: v for k, v in tensors.items() if k.startswith(part + ".")}
        if keys:
            parts[part] = (keys, {k: v for k, v in metadata.items() if k.startswith(part + ".")})
    return parts, ("kohya" if kohya else "diffusers")


def lora_scales(part: str, tensors: dict, metadata: dict) -> dict[str, float]:
    """{module: alpha/r as peft applies it} for the modules of one part (1.0 when the file has no metadata)."""
    config = {k.removeprefix(part + "."): v for k, v in metadata.items()}
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(part + ".").removesuffix(".lora_A.weight").removeprefix("text_model.")
            out[module] = peft_scaling(config, part, module, down.shape[0]) if "r" in config else 1.0
    return out
