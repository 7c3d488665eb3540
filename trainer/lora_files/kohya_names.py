"""kohya/A1111 LoRA key names of diffusers modules, and the reverse lookup tables.

How a base's keys are spelled belongs to its family (trainer.families: `KOHYA_PREFIXES`, `kohya_name`, e.g. SDXL's
SGM UNet names); this module builds on it: every module of a set of models by its kohya name, the same for the real
base of a family (built on the meta device, for files read without a base), and which family a file's keys show.
"""

from __future__ import annotations

import functools

import torch

from trainer import families
from trainer.families.clip import canonical_text_module  # noqa: F401 (how files spell text-encoder modules)


def family_of(kind: str | None):
    """The family called `kind`; the fallback family (trainer.families.FALLBACK) when None."""
    return families.get(kind) if kind else families.FALLBACK


def unet_config(modules: dict[str, torch.nn.Module]):
    """The denoiser's config among `modules` ({"unet" or "transformer": ...}), which some families' kohya names
    depend on (None without a denoiser)."""
    unet = next((modules[d] for d in families.DENOISERS if modules.get(d) is not None), None)
    return unet.config if unet is not None else None


def module_names(modules: dict[str, torch.nn.Module], kind: str | None) -> dict[str, tuple[str, str | tuple]]:
    """{kohya name: (part, module path)} for every Linear/Conv2d (peft-wrapped or not) of the given models; a name
    that stands for a fused weight (SD3's qkv, trainer.lora_files.fused) maps to (part, (its modules in row order))."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # LoRA and LyCORIS (LoHa/LoKr) wrappers alike

    family = family_of(kind)
    table: dict[str, tuple[str, str | tuple]] = {}
    fused: dict[str, dict[int, str]] = {}
    for part, model in modules.items():
        if part not in family.KOHYA_PREFIXES or model is None:
            continue
        config = model.config if part in families.DENOISERS else None
        for name, module in model.named_modules():
            parts = name.split(".")
            if not name or "base_layer" in parts or any(p.startswith("lora_") for p in parts):
                continue  # peft's own submodules
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, BaseTunerLayer)):
                continue
            if part.startswith("text_encoder"):
                name = name.removeprefix("text_model.")
            try:
                key = family.kohya_name(part, name, config)
            except ValueError:
                continue  # a module the family's kohya names do not cover cannot be in a kohya file either
            slot = family.kohya_slot(part, name)
            if slot is not None:
                fused.setdefault(key, {})[slot[0]] = name
                table[key] = (part, tuple(n for _, n in sorted(fused[key].items())))
            elif table.setdefault(key, (part, name)) != (part, name):
                raise ValueError(f"{key}: ambiguous, names both {table[key][1]!r} and {name!r}")
    return table


def reference_names(kind: str) -> dict[str, tuple[str, str]]:
    """module_names of the real base of this family (families spelled alike share one table)."""
    return _reference_names(family_of(kind).KOHYA_LAYOUT)


@functools.cache
def _reference_names(layout: str) -> dict[str, tuple[str, str]]:
    family = families.get(layout)  # a layout is named after the family whose spelling it is
    return module_names(family.reference_models(), family.NAME)


def kohya_file_kind(keys) -> str:
    """The family whose kohya spelling the keys use (SD1 and SD2 share one: the name of the first)."""
    return families.kohya_file_family(keys).NAME


def diffusers_file_kind(keys, header: dict) -> str:
    """Base family of a diffusers-layout LoRA: from its ss_base_model_version, else from its keys."""
    return families.diffusers_file_family(keys, header).NAME


def peft_key(part: str, module: str) -> str:
    # The canonical diffusers file spelling keeps CLIP's `text_model.` level (as trainer.lora_files.export writes it).
    return f"{part}.{canonical_text_module(module)}" if part.startswith("text_encoder") else f"{part}.{module}"
