"""kohya/A1111 LoRA files (what A1111/Forge and ComfyUI load) and conversion to/from the diffusers/PEFT layout.

Keys (spelled by the base's family, trainer.families; trainer.lora_files.kohya_names builds the tables), e.g.
`lora_unet_<module>` and `lora_te_text_model_<path>`, each with `.lora_down.weight` [r, in(, kh, kw)],
`.lora_up.weight` [out, r(, 1, 1)] and `.alpha` (0-dim fp32). Readers apply up·down·(alpha/r)·multiplier, but not
all of them per module: diffusers' kohya loader keeps one alpha per model part (its alpha_pattern keys miss the
attention modules of the full-size SD1.5 UNet) and then scales a module of another rank by alpha/its rank. So every
file written here has ONE rank R (zero rows/columns pad lower-rank modules, e.g. AdaLoRA's) and alpha = R, with
whatever made the scale (lora_alpha != r, rsLoRA, rank/alpha patterns, variants) folded into lora_up: every loader
computes the same ΔW. The trained rank and alpha stay in the metadata (ss_network_dim, ss_network_alpha).
diffusers' convert_state_dict_to_kohya writes alpha = rank without folding, which silently rescales the update
whenever lora_alpha != r, so it is not used here.

DoRA: `.dora_scale` [out, 1(, 1, 1)] (output axis) is written for ComfyUI/Forge's formula, which divides by the
norm of the ORIGINAL weight (trainer.lora_files.dora): s = m·(‖W‖ + eps)/‖W + ΔW‖, so ComfyUI gives peft's DoRA weight. A1111
(input axis only), kohya's merge_lora.py and diffusers' kohya loader cannot apply it; those get the plain-LoRA
export (trainer.lora_files.dora.plain_lora_tensors). Reading such a file back needs the base weights (`model_modules`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.lora_files.dora import DORA_SCALE_KEY, DORA_SCALE_NOTE, comfy_dora_scale, magnitude_from_comfy_scale
from trainer.io import atomic_path
from trainer.lora_files.fused import kohya_tensors, split
from trainer.lora_files.kohya_meta import addnet_hashes, kohya_metadata  # noqa: F401 (kohya_metadata: part of this API)
from trainer import families
from trainer.lora_files.kohya_names import (family_of, kohya_file_kind, module_names, peft_key,
                                            reference_names, unet_config)

ADAPTER = "default"
# peft saves the DoRA magnitude as `.lora_magnitude_vector` for diffusers models and `.lora_magnitude_vector.weight`
# for transformers ones; diffusers' text-encoder loader (transformers 5) only loads the latter spelling.
DIFFUSERS_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight")
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")

def _check_layer(where: str, layer) -> None:
    """Raise for a peft LoRA layer a kohya file cannot express (VeRA/AdaLoRA layers are factored elsewhere)."""
    from peft.tuners.lora.layer import Conv2d, LoraLayer, Linear
    from peft.tuners.lora.variants import DoraConv2dVariant, DoraLinearVariant

    if not isinstance(layer, LoraLayer) or type(layer).__module__.startswith(("peft.tuners.adalora", "peft.tuners.vera")):
        return
    # peft's bitsandbytes layers (QLoRA) are LoraLayers beside Linear, over a base that is an nn.Linear subclass
    # (Linear4bit, Linear8bitLt): their ΔW = B·A·scale is a plain linear LoRA's.
    if not isinstance(layer, (Linear, Conv2d)) and not isinstance(layer.get_base_layer(), torch.nn.Linear):
        raise ValueError(f"{where}: LoRA on {type(layer).__name__} cannot be written as a kohya LoRA (Linear and Conv2d only)")
    variant = layer.lora_variant.get(ADAPTER)
    if variant is not None and not isinstance(variant, (DoraLinearVariant, DoraConv2dVariant)):
        raise ValueError(f"{where}: the {type(variant).__name__} LoRA variant has no kohya equivalent")
    if layer.merged:
        raise ValueError(f"{where}: the adapter is merged into the base weight; unmerge it before exporting")
    if layer.lora_bias.get(ADAPTER) or getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{where}: lora_bias / fan_in_fan_out LoRA cannot be written as a kohya LoRA")
    if isinstance(layer, Conv2d):
        base = layer.get_base_layer()
        if base.groups != 1 or tuple(layer.lora_B[ADAPTER].weight.shape[2:]) != (1, 1):
            raise ValueError(f"{where}: grouped-conv LoRA cannot be written as a kohya LoRA")


def uniform_module(down: torch.Tensor, up: torch.Tensor, scale: float, rank: int) -> dict[str, torch.Tensor]:
    """One module's kohya tensors at the file's rank: alpha = rank, the scale folded into lora_up, zero rows (down)
    and columns (up) where the module's own rank is lower. Every loader then applies exactly scale·up·down."""
    pad = rank - down.shape[0]
    up = up.float() * scale
    if pad:
        down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])])
        up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
    return {"lora_down.weight": down.float().contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(rank), dtype=torch.float32)}


def file_delta(group: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """ΔW of one module's kohya tensors as ComfyUI/A1111 compute it: up·down·alpha/r (no alpha: scale 1.0)."""
    up, down = group["lora_up.weight"].float(), group["lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(group["alpha"]) if "alpha" in group else float(rank)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / rank)


def find_module(model: torch.nn.Module, module: str) -> tuple[str | None, torch.nn.Module | None]:
    """(path, submodule) of `module` as files name it (text encoders with or without `text_model.`); (None, None)."""
    for path in (module, f"text_model.{module}"):
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return None, None


def base_weight(models: dict[str, torch.nn.Module], part: str, module: str) -> torch.Tensor:
    """The base (un-adapted) weight of `part`.`module`; text-encoder paths with or without `text_model.`."""
    layer = find_module(models.get(part), module)[1]
    if layer is None:
        raise ValueError(f"{part}.{module}: no such module in the base model")
    return (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight.detach()


def kohya_state_dict(modules: dict[str, torch.nn.Module], delta=None,
                     kind: str | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors of the 'default' adapter of each module ({"unet": ..., "text_encoder"(_2): ...}) of a
    `kind` base (a family name: key names differ, see trainer.families).

    Any variant: trainer.adapters.factors.lora_factors gives the exact plain-LoRA factors (VeRA, AdaLoRA, Delta-LoRA
    via `delta`), written at one rank with alpha = rank (uniform_module), so every loader applies the trained ΔW.
    """
    from trainer.adapters.factors import lora_factors
    from trainer.adapters.variants import lora_layers

    modules = {p: m for p, m in modules.items() if m is not None and getattr(m, "peft_config", None)}
    for part, module in modules.items():
        for name, layer in lora_layers(module).items():
            _check_layer(f"{part}.{name}", layer)
    family, config = family_of(kind), unet_config(modules)
    factors = lora_factors(modules, delta)
    rank = max((f.down.shape[0] for f in factors.values()), default=0)
    entries = []
    for full_name, f in factors.items():
        part, name = full_name.split(".", 1)
        name = name.removeprefix("base_model.model.")
        group = uniform_module(f.down.cpu(), f.up.cpu(), f.scale, rank)
        if f.magnitude is not None:  # DoRA: peft's m is [out] (Linear) or [1, out, 1, 1] (Conv2d)
            weight = f.weight.float().cpu()
            group["dora_scale"] = comfy_dora_scale(f.magnitude.cpu(), weight, file_delta(group, weight.shape))
        entries.append((family.kohya_name(part, name, config), family.kohya_slot(part, name), group))
    return kohya_tensors(entries)  # modules that share a fused weight (SD3's q/k/v) become one


def write_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    if not tensors:
        raise ValueError("no LoRA weights to save: neither the UNet nor the text encoder has an adapter")
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != "modelspec.hash_sha256"}
    if any(k.endswith(".dora_scale") for k in tensors):
        # kohya's networks.lora cannot hold DoRA; LyCORIS can, and these args name the output-axis decomposition.
        metadata["ss_network_module"] = "lycoris.kohya"
        metadata["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
        metadata[DORA_SCALE_KEY] = DORA_SCALE_NOTE
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")})
    rank = f"rank = {ranks[0]}" if len(ranks) == 1 else f"rank ({'/'.join(map(str, ranks))}: fused q/k/v stack theirs)"
    metadata["style_lora_alpha"] = (f"alpha = {rank} in every module, the trained scale folded "
                                    "into lora_up (trained rank and alpha: ss_network_dim, ss_network_alpha)")
    not_str = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if not_str:
        raise ValueError(f"metadata values must be strings: {not_str}")
    model_hash, legacy_hash = addnet_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    metadata["modelspec.hash_sha256"] = f"0x{model_hash}"  # ModelSpec: sha256 of all tensor content
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def save_kohya_lora(path: Path, modules: dict[str, torch.nn.Module], metadata: dict[str, str], delta=None,
                    kind: str | None = None) -> Path:
    """Write `path` atomically in the kohya layout, with sshs_model_hash / sshs_legacy_hash as kohya computes them."""
    return write_kohya(path, kohya_state_dict(modules, delta, kind), dict(metadata))


def lora_config(modules: dict[str, tuple[int, float, bool]]) -> dict:
    """A peft LoraConfig (as a dict) giving every module its own rank and alpha: the most common ones as r/lora_alpha,
    the rest as rank_pattern/alpha_pattern keyed by the full module path, which peft matches exactly."""
    from peft import LoraConfig

    doras = {dora for _, _, dora in modules.values()}
    if len(doras) > 1:
        raise ValueError("mixed DoRA and plain LoRA modules in one model cannot be expressed as one peft LoraConfig")
    r = Counter(rank for rank, _, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a, _ in modules.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={m: rank for m, (rank, _, _) in modules.items() if rank != r},
        alpha_pattern={m: a for m, (_, a, _) in modules.items() if a != alpha},
        use_dora=doras.pop(),
    )
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def group_modules(state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"{key}: unsupported tensor (expected one of {', '.join(suffixes)})")
        groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
    for name, group in groups.items():
        if not set(suffixes[:2]) <= group.keys():
            raise ValueError(f"{name}: has no down/up (A/B) pair")
    return groups


def check_kohya_family(file_kind: str, kind: str | None) -> None:
    """Refuse a kohya file spelled for one family on a base (`kind`) whose files are spelled otherwise."""
    if kind is None:
        return
    file_family, base_family = family_of(file_kind), family_of(kind)
    if file_family.KOHYA_LAYOUT != base_family.KOHYA_LAYOUT:
        raise ValueError(f"a LoRA for {families.kohya_layout_label(file_family)} cannot be used with this "
                         f"{families.kohya_layout_label(base_family)} base")


def table_name(name: str, family) -> str:
    """A file's kohya module name as the name tables (kohya_names) spell it: SD1/SD2 files sometimes spell the one text
    encoder lora_te1_; files written before the fix spell SDXL's projection lora_te2_text_model_text_projection
    (ComfyUI's key map knows lora_te2_text_projection only)."""
    if name.startswith("lora_te1_") and "text_encoder_2" not in family.KOHYA_PREFIXES:
        name = "lora_te_" + name.removeprefix("lora_te1_")
    return name.replace("_text_model_text_projection", "_text_projection")


def kohya_to_diffusers(
    state: dict[str, torch.Tensor], model_modules: dict[str, torch.nn.Module] | None = None, kind: str | None = None,
    header: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """kohya tensors -> (peft-layout tensors, diffusers `lora_adapter_metadata` with per-module rank/alpha).

    kohya names are resolved against the modules of `model_modules` (a `kind` base) when given, else against the
    real SD1.5/SD2 or SDXL module names (told from the keys): `_` is both separator and part of names (to_q,
    transformer_blocks), so only real names disambiguate. `header`: the file's metadata; a dora_scale written for
    ComfyUI (DORA_SCALE_KEY) turns back into peft's magnitude with the base weights of `model_modules`."""
    file_kind = kohya_file_kind(state)
    check_kohya_family(file_kind, kind)
    table = module_names(model_modules, kind or file_kind) if model_modules else reference_names(file_kind)
    comfy_dora = DORA_SCALE_KEY in (header or {})
    tensors: dict[str, torch.Tensor] = {}
    per_part: dict[str, dict[str, tuple[int, float, bool]]] = {}
    unknown = []
    for name, group in sorted(group_modules(state, KOHYA_SUFFIXES).items()):
        lookup = table_name(name, family_of(file_kind))
        if lookup not in table:
            unknown.append(name)
            continue
        part, module = table[lookup]
        members = split(module, group) if isinstance(module, tuple) else [(module, group)]  # a fused qkv: its parts
        for member, member_group in members:
            _add_module(tensors, per_part, name, part, member, member_group, comfy_dora, model_modules)
    if unknown:
        raise ValueError(f"{len(unknown)} kohya key(s) match no module of the base model (they would not load): "
                         + ", ".join(unknown[:5]))
    metadata = {}
    for part, modules in per_part.items():
        metadata.update({f"{part}.{k}": v for k, v in lora_config(modules).items()})
    return tensors, metadata


def _add_module(tensors: dict, per_part: dict, name: str, part: str, module: str, group: dict, comfy_dora: bool,
                model_modules: dict | None) -> None:
    """One kohya module (`name` in the file) as peft-layout tensors of `part`.`module`, its rank/alpha/DoRA noted."""
    down, up = group["lora_down.weight"].float(), group["lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(group["alpha"]) if "alpha" in group else float(rank)  # no alpha means scale 1.0 in A1111/ComfyUI
    key = peft_key(part, module)
    tensors[f"{key}.lora_A.weight"] = down.contiguous()
    tensors[f"{key}.lora_B.weight"] = up.contiguous()
    if "dora_scale" in group:
        scale, out = group["dora_scale"].float(), up.shape[0]
        if scale.shape[0] != out or scale.numel() != out:
            raise ValueError(f"{name}: dora_scale {tuple(scale.shape)} is decomposed on the input axis; peft's DoRA "
                             "normalises output rows, so it cannot be converted exactly")
        if comfy_dora:
            if not model_modules:
                raise ValueError(f"{name}: its dora_scale is relative to the base model's weights (written for "
                                 "ComfyUI's DoRA formula); converting it needs the base model (--model)")
            weight = base_weight(model_modules, part, module).float().cpu()
            scale = magnitude_from_comfy_scale(scale, weight, file_delta(group, weight.shape))
        # peft's magnitude is [out] for Linear and [1, out, 1, 1] for Conv2d; key spelled as peft saves it
        suffix = "lora_magnitude_vector.weight" if part.startswith("text_encoder") else "lora_magnitude_vector"
        tensors[f"{key}.{suffix}"] = scale.reshape(out) if up.dim() == 2 else scale.reshape(1, out, 1, 1)
    per_part.setdefault(part, {})[module] = (rank, alpha, "dora_scale" in group)


def pattern_value(pattern: dict | None, part: str, module: str, default):
    """The value a peft rank_pattern/alpha_pattern gives `module` of `part` (a text-encoder module as spelled with or
    without `text_model.`), else `default`."""
    from peft.utils.other import get_pattern_key

    for name in [module, f"text_model.{module}"] if part.startswith("text_encoder") else [module]:
        key = get_pattern_key(list(pattern or {}), name)
        if key in (pattern or {}):
            return pattern[key]
    return default


def peft_scaling(config: dict, part: str, module: str, rank: int) -> float:
    """The scaling peft gives `module` under `config` (a LoraConfig dict), as LoraLayer.update_layer computes it."""
    r = pattern_value(config.get("rank_pattern"), part, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), part, module, config["lora_alpha"])
    if r != rank:
        raise ValueError(f"{part}.{module}: adapter metadata says rank {r}, the tensors have rank {rank}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def diffusers_to_kohya(state: dict[str, torch.Tensor], adapter_metadata: dict, kind: str | None = None,
                       model_modules: dict[str, torch.nn.Module] | None = None,
                       unet_config=None) -> dict[str, torch.Tensor]:
    """peft-layout tensors (`unet.<module>.lora_A.weight`, ...) + diffusers adapter metadata -> kohya tensors of a
    `kind` base (SDXL UNet modules get SGM names for the real SDXL layout), at one rank with alpha = rank (see
    uniform_module). DoRA modules need the base weights (`model_modules`) for ComfyUI's dora_scale."""
    family = family_of(kind)
    prefixes = family.KOHYA_PREFIXES
    configs = {
        part: {k.removeprefix(f"{part}."): v for k, v in (adapter_metadata or {}).items() if k.startswith(f"{part}.")}
        for part in prefixes
    }
    modules = []
    guessed = set()
    for name, group in sorted(group_modules(state, DIFFUSERS_SUFFIXES).items()):
        part, _, module = name.partition(".")
        if part not in prefixes:
            raise ValueError(f"{name}: a {kind} LoRA has kohya keys only for {', '.join(prefixes)}")
        module = module.removeprefix("text_model.") if part.startswith("text_encoder") else module
        down, up = group["lora_A.weight"].float(), group["lora_B.weight"].float()
        if "r" in configs[part]:
            scaling = peft_scaling(configs[part], part, module, down.shape[0])
        else:
            scaling = 1.0
            guessed.add(part)
        magnitude = group.get("lora_magnitude_vector", group.get("lora_magnitude_vector.weight"))
        if magnitude is not None and not model_modules:
            raise ValueError(f"{name}: a DoRA module; ComfyUI's dora_scale is relative to the base model's weights, so "
                             "converting it needs the base model (--model)")
        modules.append((part, module, down, up, scaling, magnitude))
    rank = max((down.shape[0] for _, _, down, _, _, _ in modules), default=0)
    entries = []
    for part, module, down, up, scaling, magnitude in modules:
        group = uniform_module(down, up, scaling, rank)
        if magnitude is not None:
            weight = base_weight(model_modules, part, module).float().cpu()
            group["dora_scale"] = comfy_dora_scale(magnitude, weight, file_delta(group, weight.shape))
        entries.append((family.kohya_name(part, module, unet_config), family.kohya_slot(part, module), group))
    tensors = kohya_tensors(entries)
    if guessed:
        warnings.warn(f"no lora_adapter_metadata for {', '.join(sorted(guessed))}: assuming alpha = rank (scale 1.0, "
                      "what diffusers assumes too); if it was trained with another alpha its strength will differ",
                      stacklevel=2)
    return tensors
