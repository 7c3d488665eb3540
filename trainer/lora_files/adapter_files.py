"""Adapter files for the preview: read a kohya or diffusers `.safetensors` LoRA and check it fits a loaded base.

kohya files are converted in memory by trainer.lora_files.kohya against the loaded base, so every module keeps its exact alpha
(diffusers' own kohya loader loses per-module alphas). Every key must name a Linear/Conv2d of the base with fitting
shapes, else `AdapterError` names the file and the first bad key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from trainer import families
from trainer.lora_files.convert import read_adapter_file
from trainer.lora_files.kohya import DIFFUSERS_SUFFIXES, group_modules, kohya_to_diffusers, peft_scaling

LOKR_SUFFIXES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")


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
    return {part: weight_modules(model) for part, model in pipe_parts(pipe).items()}


def weight_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module path as files name it (text encoders without `text_model.`): Linear or Conv2d} of one part."""
    return {name.removeprefix("text_model."): m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def read_adapter(path: str | Path, pipe, table: dict | None = None,
                 allow_dora: bool = True) -> tuple[dict[str, tuple[dict, dict]], str]:
    """Read, convert and validate an adapter file for `pipe`'s base.

    Returns ({part: (peft-layout tensors keyed `part.module.lora_A.weight`, diffusers adapter metadata of that part)},
    layout). peft's LoKr layout (`part.module.lokr_w1` ..., trainer.lora_files.export.lokr_layout) is read as it
    is, layout "lokr". Raises AdapterError naming the file and the first key that does not fit. allow_dora=False
    (the hot-swap slot, plain LoRA only) refuses DoRA and LoKr.
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
    if any(".lokr_" in k for k in state):
        if not allow_dora:
            raise AdapterError(f"{label}: LoKr adapters cannot go into the hot-swap slot; preview them without "
                               "--hotswap/--compile")
        return _lokr_parts(label, state, header, table), "lokr"
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


def _lokr_parts(label: str, state: dict, header: dict, table: dict) -> dict[str, tuple[dict, dict]]:
    """read_adapter for peft's LoKr layout: every module's kron(w1, w2) must have its base weight's shape, and each
    part must have its peft LoKr config in the header (diffusers rebuilds the layers from it)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    try:
        metadata = json.loads(header.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    except json.JSONDecodeError as err:
        raise AdapterError(f"{label}: its {LORA_ADAPTER_METADATA_KEY} header is not JSON: {err}") from None
    groups: dict[str, dict[str, tuple]] = {}
    for key, tensor in state.items():
        suffix = next((x for x in LOKR_SUFFIXES if key.endswith("." + x)), None)
        if suffix is None:
            raise AdapterError(f"{label}: key {key!r}: not a LoKr tensor (expected one of {', '.join(LOKR_SUFFIXES)})")
        groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = tuple(tensor.shape)
    parts: dict[str, tuple[dict, dict]] = {}
    for name, group in sorted(groups.items()):
        part, _, module = name.partition(".")
        base = table.get(part, {}).get(module.removeprefix("text_model."))
        if base is None:
            raise AdapterError(f"{label}: key {name!r} names no Linear/Conv2d module of the base model "
                               "(a LoRA for another architecture?)")
        if metadata.get(f"{part}.peft_type") != "LOKR":
            raise AdapterError(f"{label}: {part}: no peft LoKr config in its {LORA_ADAPTER_METADATA_KEY} header")
        if problem := _kron_problem(group, tuple(base.weight.shape)):
            raise AdapterError(f"{label}: key {name!r}: {problem} (a LoKr for another base model?)")
    for part in {name.partition(".")[0] for name in groups}:
        parts[part] = ({k: v for k, v in state.items() if k.startswith(part + ".")},
                       {k: v for k, v in metadata.items() if k.startswith(part + ".")})
    return parts


def _kron_problem(group: dict[str, tuple], weight: tuple) -> str:
    """"" when kron(w1, w2) of one module's factor shapes (full or a·b) has the weight's shape, else what is wrong."""
    def factor(n: str) -> tuple | None:
        if f"lokr_{n}" in group:
            return group[f"lokr_{n}"]
        a, b = group.get(f"lokr_{n}_a"), group.get(f"lokr_{n}_b")
        return (a[0], *b[1:]) if a is not None and b is not None and a[-1] == b[0] else None

    w1, w2 = factor("w1"), factor("w2")
    if w1 is None or w2 is None or len(w1) != 2:
        return f"factors {sorted(group)} are not a LoKr pair w1, w2 (each full or a·b of one rank)"
    if w1[0] * w2[0] != weight[0] or w1[1] * math.prod(w2[1:]) != math.prod(weight[1:]):
        return f"kron of w1 {list(w1)} and w2 {list(w2)} does not fit the base module's weight {list(weight)}"
    return ""


def load_part(pipe, peft_name: str, part: str, tensors: dict, metadata: dict, hotswap: bool = False) -> None:
    """Load one part of read_adapter's answer into `pipe` under `peft_name`, as diffusers' loaders do (tensors
    already on the pipeline's device and dtype). The denoiser: `load_lora_adapter`, which builds peft's LoraConfig or,
    for peft's LoKr layout, its LoKrConfig from the metadata; a text encoder: `load_lora_into_text_encoder` (LoRA
    only), a LoKr with peft itself."""
    model = getattr(pipe, part)
    if part == families.of_pipeline(pipe).DENOISER:  # what load_lora_into_unet / load_lora_into_transformer do
        model.load_lora_adapter(tensors, prefix=part, network_alphas=None, adapter_name=peft_name,
                                metadata=metadata or None, _pipeline=pipe, hotswap=hotswap)
    elif any(".lokr_" in k for k in tensors):
        from peft import LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict

        flat = not hasattr(model, "text_model")  # transformers 5: no `text_model.` level; files keep it
        state = {k.removeprefix(part + ".").removeprefix("text_model." if flat else ""): v for k, v in tensors.items()}
        inject_adapter_in_model(LoKrConfig(**{k.removeprefix(part + "."): v for k, v in metadata.items()}), model,
                                adapter_name=peft_name)
        unexpected = set_peft_model_state_dict(model, state, adapter_name=peft_name).unexpected_keys
        if unexpected:
            raise ValueError(f"{part}: key {unexpected[0]!r} matches no LoKr layer")
    else:
        pipe.load_lora_into_text_encoder(tensors, network_alphas=None, text_encoder=model, prefix=part,
                                         adapter_name=peft_name, metadata=metadata or None, _pipeline=pipe)


def load_lora_file(pipe, path: str | Path, adapter_name: str) -> None:
    """An adapter file into `pipe` under `adapter_name`: diffusers' load_lora_weights, except for peft's LoKr layout
    (trainer.lora_files.export.lokr_layout), which it does not read: read_adapter's parts through load_part."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        lokr = any(".lokr_" in k for k in f.keys())
    if not lokr:
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        return
    for part, (tensors, metadata) in read_adapter(path, pipe)[0].items():
        load_part(pipe, adapter_name, part, {k: v.to(pipe.device, pipe.dtype) for k, v in tensors.items()}, metadata)


def lora_scales(part: str, tensors: dict, metadata: dict) -> dict[str, float]:
    """{module: alpha/r as peft applies it} for the modules of one part (1.0 when the file has no metadata)."""
    config = {k.removeprefix(part + "."): v for k, v in metadata.items()}
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(part + ".").removesuffix(".lora_A.weight").removeprefix("text_model.")
            out[module] = peft_scaling(config, part, module, down.shape[0]) if "r" in config else 1.0
    return out
