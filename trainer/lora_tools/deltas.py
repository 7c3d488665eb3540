"""read_lora: any LoRA file (kohya, LyCORIS, diffusers/peft, other trainers' spellings through layouts.py) read into
per-module Deltas (trainer.lora_tools.lora_file; the consumers' formulas in formulas.py), with its base family told
from --base, the base model, its metadata, or its keys checked against each family's real shapes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from trainer.lora_files.adapter_files import LOKR_SUFFIXES  # peft's LoKr state dict
from trainer.lora_files.kohya import DIFFUSERS_SUFFIXES, KOHYA_SUFFIXES
from trainer.lora_tools import layouts
from trainer.lora_tools.formulas import dora_delta, low_rank_delta, lycoris_delta, peft_lokr
from trainer.lora_tools.lora_file import Delta, LoraFile  # noqa: F401 (the toolbox imports them from here too)


UNSUPPORTED = {"hada_t1": "Tucker-decomposed LoHa (hada_t1/t2)", "hada_t2": "Tucker-decomposed LoHa (hada_t1/t2)",
               "lokr_t2": "Tucker-decomposed LoKr (lokr_t2)", "lora_mid.weight": "Tucker-decomposed LoCon (lora_mid)",
               "diff": "a full-weight difference (LyCORIS 'full')", "diff_b": "a bias difference",
               "w_norm": "a norm-layer change (LyCORIS 'norm')", "b_norm": "a norm-layer change (LyCORIS 'norm')",
               "oft_blocks": "OFT", "oft_diag": "OFT", "lora_A.bias": "a LoRA bias", "lora_B.bias": "a LoRA bias"}


def split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """(module name, suffix) of a tensor key, None when no suffix fits."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def group_keys(state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}}; a key no suffix fits raises ValueError naming it (and what it is, if known)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        found = split_key(key, suffixes)
        if found is None:
            known = split_key(key, tuple(UNSUPPORTED))
            what = f"{UNSUPPORTED[known[1]]}, which these tools do not read" if known else "an unknown tensor"
            raise ValueError(f"tensor {key}: {what}")
        groups.setdefault(found[0], {})[found[1]] = tensor
    return groups


def module_shapes(parts: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """{"part.module": weight shape} of every Linear/Conv2d (text encoders without `text_model.`)."""
    out = {}
    for part, model in parts.items():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name:
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                out[f"{part}.{name.removeprefix('text_model.')}"] = tuple(module.weight.shape)
    return out


def base_weights(parts: dict[str, torch.nn.Module], key: str) -> torch.Tensor:
    """The base weight of "part.module" (for DoRA)."""
    from trainer.lora_files.kohya import base_weight

    part, module = key.split(".", 1)
    return base_weight(parts, part, module).float().cpu()


@functools.cache
def _reference_tables(family: str) -> tuple[dict, dict]:
    from trainer import families

    models = families.get(families.get(family).KOHYA_LAYOUT).reference_models()
    return _diffusers_named(models, family), module_shapes(models)


def _diffusers_named(models: dict[str, torch.nn.Module], family: str) -> dict[str, tuple[str, str]]:
    """{kohya-style key with the diffusers module path (`.` -> `_`): (part, module)}: how ai-toolkit and OneTrainer
    spell modules whose kohya name (e.g. SDXL's SGM one) differs."""
    from trainer import families

    denoiser = families.get(family).DENOISER
    if models.get(denoiser) is None:
        return {}
    prefix = families.get(family).KOHYA_PREFIXES[denoiser]
    return {prefix + key.split(".", 1)[1].replace(".", "_"): (denoiser, key.split(".", 1)[1])
            for key in module_shapes({denoiser: models[denoiser]})}


def _kohya_tables(family: str, parts: dict | None) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """({kohya name: (part, module or fused members)}, {"part.module": shape}) for the base or the family's reference."""
    from trainer.lora_files.kohya_names import module_names, reference_names

    if parts:
        table = _diffusers_named(parts, family) | module_names(parts, family)
        return table, module_shapes(parts)
    named, shapes = _reference_tables(family)
    return named | reference_names(family), shapes


def _lycoris_members(deltas: dict, ranks: dict, name: str, group: dict, part: str, module, shapes: dict) -> None:
    """A LoHa/LoKr module's full ΔW into `deltas`; one over a fused weight (SD3's qkv) cut into its members' rows."""
    members = module if isinstance(module, tuple) else (module,)
    sizes = [shapes.get(f"{part}.{m}") for m in members]
    fused = None if None in sizes else (sum(s[0] for s in sizes), *sizes[0][1:])
    delta, rank, alpha = lycoris_delta(name, group, fused)
    if len(members) > 1 and fused is None:
        raise ValueError(f"{name}: a LoHa/LoKr factor of a fused weight needs its members' shapes to be split")
    row = 0
    for member, size in zip(members, sizes):
        key = f"{part}.{member}"
        n = size[0] if size else delta.shape[0]
        deltas[key] = delta if len(members) == 1 else Delta(size, full=delta.full[row: row + n])
        ranks[key] = (rank, alpha)
        row += n


def read_kohya(state: dict, header: dict, family, parts: dict | None, where: str) -> tuple[dict, dict, set]:
    """Deltas of a kohya/LyCORIS-spelled state: ({"part.module": Delta}, {"part.module": (rank, alpha)}, kinds)."""
    from trainer.lora_files.fused import split
    from trainer.lora_files.kohya import table_name

    table, shapes = _kohya_tables(family.NAME, parts)
    deltas, ranks, kinds, unknown = {}, {}, set(), []
    for name, group in sorted(group_keys(state, (*KOHYA_SUFFIXES, *layouts.LYCORIS)).items()):
        target = table.get(table_name(name, family))
        if target is None:
            unknown.append(name)
            continue
        part, module = target
        if "lora_down.weight" in group or "lora_up.weight" in group:
            if not {"lora_down.weight", "lora_up.weight"} <= group.keys():
                raise ValueError(f"{where}: module {name} has no lora_down/lora_up pair")
            members = split(module, group) if isinstance(module, tuple) else [(module, group)]
            for member, g in members:
                key, rank = f"{part}.{member}", g["lora_down.weight"].shape[0]
                alpha = float(g["alpha"]) if "alpha" in g else float(rank)  # no alpha: scale 1 in A1111/ComfyUI
                delta = low_rank_delta(g, "lora_down.weight", "lora_up.weight", alpha / rank)
                if "dora_scale" in g:  # ComfyUI/Forge's formula: the consumers that read a kohya dora_scale
                    if parts:
                        delta = dora_delta(delta, g["dora_scale"].float(), base_weights(parts, key), comfy=True)
                    kinds.add("dora")
                elif delta.down.dim() == 4 and delta.down.shape[2:] != (1, 1):
                    kinds.add("locon")
                deltas[key], ranks[key] = delta, (rank, alpha)
        else:
            _lycoris_members(deltas, ranks, name, group, part, module, shapes)
            kinds.add("loha" if "hada_w1_a" in group else "lokr")
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} module(s) match no module of a {family.LABEL} base (a LoRA for "
                         f"another base, or pass --model / --base): {', '.join(unknown[:4])}")
    return deltas, ranks, kinds


def read_peft(state: dict, header: dict, parts: dict | None, where: str) -> tuple[dict, dict, set]:
    """Deltas of a diffusers/peft-spelled state (`part.module.lora_A.weight` ...), scaled as its
    lora_adapter_metadata says (none: alpha = rank, what diffusers assumes)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    from trainer.lora_files.kohya import peft_scaling

    metadata = json.loads(header.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    deltas, ranks, kinds = {}, {}, set()
    for name, group in sorted(group_keys(state, (*DIFFUSERS_SUFFIXES, *LOKR_SUFFIXES)).items()):
        if group.keys() & set(LOKR_SUFFIXES):
            key, delta, rank, alpha = peft_lokr(name, group, metadata)
            deltas[key], ranks[key] = delta, (rank, alpha)
            kinds.add("lokr")
            continue
        if not {"lora_A.weight", "lora_B.weight"} <= group.keys():
            raise ValueError(f"{where}: module {name} has no lora_A/lora_B pair")
        part, _, module = name.partition(".")
        module = module.removeprefix("text_model.")
        config = {k.removeprefix(part + "."): v for k, v in metadata.items() if k.startswith(part + ".")}
        rank = group["lora_A.weight"].shape[0]
        scale = peft_scaling(config, part, module, rank) if "r" in config else 1.0
        key = f"{part}.{module}"
        delta = low_rank_delta(group, "lora_A.weight", "lora_B.weight", scale)
        magnitude = group.get("lora_magnitude_vector", group.get("lora_magnitude_vector.weight"))
        if magnitude is not None:
            if parts:
                delta = dora_delta(delta, magnitude.float(), base_weights(parts, key), comfy=False)
            kinds.add("dora")
        elif delta.down.dim() == 4 and delta.down.shape[2:] != (1, 1):
            kinds.add("locon")
        deltas[key], ranks[key] = delta, (rank, scale * rank if "r" in config else None)
    return deltas, ranks, kinds


def _family(state: dict, header: dict, kohya: bool, base: str | None, parts: dict | None):
    from trainer import families

    if base:
        return families.get(base)
    if parts:
        denoiser = next(m for p, m in parts.items() if p in families.DENOISERS)
        return families.from_configs(denoiser.config, set(parts))
    if kohya:
        return families.version_family(header.get("ss_base_model_version", "")) or families.kohya_file_family(state)
    return families.diffusers_file_family(state, header)


def _read_state(state: dict, header: dict, kohya: bool, family, parts: dict | None, where: str) -> tuple:
    return read_kohya(state, header, family, parts, where) if kohya else read_peft(state, header, parts, where)


def _by_shapes(state: dict, header: dict, kohya: bool, guess, where: str) -> tuple | None:
    """(family, read) of the family whose real base has every module of the file, at the file's shapes: SD1 and
    SDXL UNet files name many modules alike (ai-toolkit's and OneTrainer's SDXL files use diffusers names), their
    widths differ. None when no family's real base fits (a tiny test base; SD1 and SD2 share one reference, so the
    shapes do not tell them apart: their files say it in ss_base_model_version)."""
    from trainer import families

    keys = set(state)
    if kohya:  # SD1/SD2 spell keys alike, and a diffusers-named SDXL UNet file has no SDXL-only key
        prefixes = {f: tuple(f.KOHYA_PREFIXES.values()) for f in families.FAMILIES}
        candidates = [f for f in reversed(families.FAMILIES) if any(k.startswith(prefixes[f]) for k in keys)]
    else:
        candidates = [f for f in reversed(families.FAMILIES) if any(k.startswith(f.DENOISER + ".") for k in keys)]
    for family in sorted(candidates, key=lambda f: f is not guess):  # the guess first, the slowest table (SD3) last
        try:
            read = _read_state(state, header, kohya, family, None, where)
        except ValueError:
            continue
        shapes = _reference_tables(family.NAME)[1]
        if read[0] and all(shapes.get(k) == tuple(d.shape) for k, d in read[0].items()):
            return family, read
    return None


def _denoiser(state: dict, base: str | None, parts: dict | None) -> str:
    """The denoiser's part name, for layouts whose keys do not say it (trainer.lora_tools.layouts.normalize)."""
    from trainer import families

    if parts:
        return next(p for p in parts if p in families.DENOISERS)
    return families.get(base).DENOISER if base else layouts.guess_denoiser(set(state))


def load_model(path: str, single_file_config: str | None = None):
    """The base at `path` (folder, builtin:, single file, hub id) as trainer.families.loading.Base."""
    from trainer.config import ModelConfig
    from trainer.families.loading import load_base

    return load_base(ModelConfig(path=path, single_file_config=single_file_config))


def read_lora(path: str | Path, model=None, base: str | None = None) -> LoraFile:
    """Any LoRA .safetensors file (kohya, LyCORIS LoHa/LoKr, diffusers/peft; other trainers' spellings through
    trainer.lora_tools.layouts) as Deltas. `model`: the base ({part: module}, or a path / hub id), needed for DoRA
    files and to name modules of a base whose layout differs from its family's reference; `base`: a family name when
    the file does not tell. ValueError names the file and the problem."""
    from trainer import families
    from trainer.lora_files.convert import base_parts, read_adapter_file

    path = Path(path)
    state, header = read_adapter_file(path)
    if not state:
        raise ValueError(f"{path}: holds no tensors")
    parts = base_parts(model)
    layout, trainer = layouts.detect(set(state), header)
    try:
        denoiser = _denoiser(state, base, parts)
        if layout == "peft":  # alpha sits in adapter_config.json beside the file
            header = {**header, **layouts.sidecar_header(path, denoiser)}
        state, form = layouts.normalize(state, header, denoiser)
        kohya = form == "K"
        # the family is sure from --base, the base itself or the file's ss_base_model_version; else from the keys,
        # checked against the shapes of each family's real base
        sure = bool(base or parts or families.version_family(header.get("ss_base_model_version", "")))
        try:
            family = _family(state, header, kohya, base, parts)
        except ValueError:
            if sure:
                raise
            family = None
        found = None if sure else _by_shapes(state, header, kohya, family, str(path))
        if found is None and family is None:
            raise ValueError(f"cannot tell which base this LoRA is for; pass --base ({', '.join(families.NAMES)}) "
                             "or --model")
        family, (deltas, ranks, kinds) = found or (family, _read_state(state, header, kohya, family, parts,
                                                                         str(path)))
    except ValueError as err:
        raise ValueError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from None
    denoisers = {key.split(".", 1)[0] for key in deltas} - set(family.TEXT_ENCODERS)
    if denoisers - {family.DENOISER}:
        raise ValueError(f"{path}: has modules of '{', '.join(sorted(denoisers))}', not of a {family.LABEL} base")
    variant = next((v for v in ("dora", "loha", "lokr", "locon") if v in kinds), "lora")
    needs_base = [] if parts or variant != "dora" else sorted(k for k, d in deltas.items() if d.rank is not None)
    return LoraFile(path, layout, trainer, family.NAME, variant, deltas, header, ranks, needs_base)
