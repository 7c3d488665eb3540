"""kohya/A1111 LoRA files (what A1111/Forge and ComfyUI load) and conversion to/from the diffusers/PEFT layout.

Keys (trainer.kohya_names, per base family): `lora_unet_<module>` and `lora_te_text_model_<path>` (SD1.x/SD2.x),
SGM UNet names and `lora_te1_`/`lora_te2_` (SDXL), each with `.lora_down.weight` [r, in(, kh, kw)],
`.lora_up.weight` [out, r(, 1, 1)] and `.alpha` (0-dim fp32). Readers apply
up·down·(alpha/r)·multiplier, so we write alpha = (peft's scaling)·r: whatever made the scaling (lora_alpha != r,
rsLoRA, rank/alpha patterns) the strength is exact. diffusers' convert_state_dict_to_kohya writes alpha = rank, which
silently rescales the update whenever lora_alpha != r, so it is not used here.

DoRA: `.dora_scale` is peft's magnitude m with shape [out, 1(, 1, 1)]. The shape says "decomposed on the output
axis" (LyCORIS `wd_on_out=True`; ComfyUI picks the axis by `dora_scale.shape[0] == out`): W' = m·V/||V||_row with
V = W + up·down·alpha/r, which is exactly peft's merged DoRA weight. Caveats, checked in their sources: A1111 only
implements the input-axis form ([1, in]) and cannot apply these; ComfyUI's output-axis branch currently divides by
||W|| instead of ||V|| (Comfy-Org/ComfyUI PR #15458 proposes the fix), a small deviation while ΔW is small.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.arch import KOHYA_VERSION, modelspec_architecture
from trainer.io import atomic_path
from trainer.kohya_names import (PREFIXES, diffusers_file_kind, kohya_file_kind, kohya_name, module_names, peft_key,
                                 reference_names, unet_layout)

ADAPTER = "default"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    if not isinstance(layer, (Linear, Conv2d)):
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


def kohya_state_dict(modules: dict[str, torch.nn.Module], delta=None, kind: str = "sd1") -> dict[str, torch.Tensor]:
    """The kohya tensors of the 'default' adapter of each module ({"unet": ..., "text_encoder"(_2): ...}) of a
    `kind` base (sd1 | sd2 | sdxl: key names differ, see trainer.kohya_names).

    Any variant: trainer.variants.lora_factors gives the exact plain-LoRA factors (VeRA, AdaLoRA, Delta-LoRA
    via `delta`), so A1111/ComfyUI load every trained adapter at its trained strength.
    """
    from trainer.variants import lora_factors, lora_layers

    modules = {p: m for p, m in modules.items() if m is not None and getattr(m, "peft_config", None)}
    for part, module in modules.items():
        for name, layer in lora_layers(module).items():
            _check_layer(f"{part}.{name}", layer)
    layout = unet_layout(modules["unet"].config) if kind == "sdxl" and "unet" in modules else None
    tensors: dict[str, torch.Tensor] = {}
    for full_name, f in lora_factors(modules, delta).items():
        part, name = full_name.split(".", 1)
        key = kohya_name(part, name.removeprefix("base_model.model."), kind, layout)
        down, up = f.down.float().cpu().contiguous(), f.up.float().cpu().contiguous()
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        # alpha/r must reproduce the applied scale whatever produced it (alpha != r, rsLoRA, patterns, variants).
        tensors[f"{key}.alpha"] = torch.tensor(f.scale * down.shape[0], dtype=torch.float32)
        if f.magnitude is not None:  # DoRA: peft's m is [out] (Linear) or [1, out, 1, 1] (Conv2d)
            tensors[f"{key}.dora_scale"] = f.magnitude.float().cpu().reshape(up.shape[0], *[1] * (up.dim() - 1)).contiguous()
    return tensors


def kohya_metadata(
    base: dict[str, str], *, rank: int, alpha: float, trigger: str, tag_frequency: dict, base_kind: str,
    cover_png: bytes | None, rslora: bool = False,
) -> dict[str, str]:
    """kohya ss_* and SAI modelspec.* header entries on top of `base` (e.g. export.training_metadata). All strings."""
    if base_kind not in KOHYA_VERSION:
        raise ValueError(f"unknown base kind {base_kind!r} (expected one of {', '.join(KOHYA_VERSION)})")
    meta = {k: str(v) for k, v in base.items()}
    v_prediction = meta.get("ss_v_parameterization") == "True"
    default = "1024" if base_kind == "sdxl" else "768" if base_kind == "sd2" and v_prediction else "512"
    resolution = re.findall(r"\d+", meta.get("ss_resolution", "")) or [default, default]
    started = float(meta.get("ss_training_started_at", 0) or 0) or datetime.datetime.now().timestamp()
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        # ss_network_alpha uses kohya's alpha/r convention; rsLoRA's alpha/sqrt(r) is the same scale at alpha·sqrt(r).
        "ss_network_alpha": str(alpha * math.sqrt(rank) if rslora else alpha),
        "ss_base_model_version": KOHYA_VERSION[base_kind],
        "ss_v2": str(base_kind == "sd2"),
        "ss_v_parameterization": str(v_prediction),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        # modelspec values as kohya's library/sai_model_spec.py writes them for a LoRA.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(base_kind, v_prediction),
        "modelspec.implementation": "diffusers",
        "modelspec.title": meta.get("modelspec.title") or meta.get("ss_output_name") or "LoRA",
        "modelspec.resolution": f"{resolution[0]}x{resolution[-1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
        meta["ssmd_keywords"] = trigger  # the additional-networks metadata editor's trigger words
    if cover_png is not None:
        if not cover_png.startswith(PNG_SIGNATURE):
            raise ValueError("cover image must be PNG bytes")
        # A JSON list of base64 images: what sd-webui-additional-networks writes and A1111/ComfyUI read as a preview.
        meta["ssmd_cover_images"] = json.dumps([base64.b64encode(cover_png).decode("ascii")])
    return meta


def _addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya train_util.precalculate_safetensors_hashes: sha256 of the tensor payload (bytes after the header) and
    the legacy hash (first 8 hex of sha256 of 64 KiB at 1 MiB), over a serialisation with only ss_* metadata."""
    from safetensors.torch import save

    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _write_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    if not tensors:
        raise ValueError("no LoRA weights to save: neither the UNet nor the text encoder has an adapter")
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != "modelspec.hash_sha256"}
    if any(k.endswith(".dora_scale") for k in tensors):
        # kohya's networks.lora cannot hold DoRA; LyCORIS can, and these args name the output-axis decomposition.
        metadata["ss_network_module"] = "lycoris.kohya"
        metadata["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    not_str = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if not_str:
        raise ValueError(f"metadata values must be strings: {not_str}")
    model_hash, legacy_hash = _addnet_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    metadata["modelspec.hash_sha256"] = f"0x{model_hash}"  # ModelSpec: sha256 of all tensor content
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def save_kohya_lora(path: Path, modules: dict[str, torch.nn.Module], metadata: dict[str, str], delta=None,
                    kind: str = "sd1") -> Path:
    """Write `path` atomically in the kohya layout, with sshs_model_hash / sshs_legacy_hash as kohya computes them."""
    return _write_kohya(path, kohya_state_dict(modules, delta, kind), dict(metadata))


def _lora_config(modules: dict[str, tuple[int, float, bool]]) -> dict:
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


def _group(state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
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


def kohya_to_diffusers(
    state: dict[str, torch.Tensor], model_modules: dict[str, torch.nn.Module] | None = None, kind: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """kohya tensors -> (peft-layout tensors, diffusers `lora_adapter_metadata` with per-module rank/alpha).

    kohya names are resolved against the modules of `model_modules` (a `kind` base) when given, else against the
    real SD1.5/SD2 or SDXL module names (told from the keys): `_` is both separator and part of names (to_q,
    transformer_blocks), so only real names disambiguate."""
    file_kind = kohya_file_kind(state)
    if kind is not None and (file_kind == "sdxl") != (kind == "sdxl"):
        raise ValueError(f"a LoRA for {'SDXL' if file_kind == 'sdxl' else 'SD1.x/SD2.x'} cannot be used with this "
                         f"{'SDXL' if kind == 'sdxl' else 'SD1.x/SD2.x'} base")
    table = module_names(model_modules, kind or file_kind) if model_modules else reference_names(file_kind)
    tensors: dict[str, torch.Tensor] = {}
    per_part: dict[str, dict[str, tuple[int, float, bool]]] = {}
    unknown = []
    for name, group in sorted(_group(state, KOHYA_SUFFIXES).items()):
        # SD1/SD2 files sometimes spell the one text encoder lora_te1_
        lookup = "lora_te_" + name.removeprefix("lora_te1_") if file_kind != "sdxl" and name.startswith("lora_te1_") else name
        if lookup not in table:
            unknown.append(name)
            continue
        part, module = table[lookup]
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
            # peft's magnitude is [out] for Linear and [1, out, 1, 1] for Conv2d; key spelled as peft saves it
            suffix = "lora_magnitude_vector.weight" if part.startswith("text_encoder") else "lora_magnitude_vector"
            tensors[f"{key}.{suffix}"] = scale.reshape(out) if up.dim() == 2 else scale.reshape(1, out, 1, 1)
        per_part.setdefault(part, {})[module] = (rank, alpha, "dora_scale" in group)
    if unknown:
        raise ValueError(f"{len(unknown)} kohya key(s) match no module of the base model (they would not load): "
                         + ", ".join(unknown[:5]))
    metadata = {}
    for part, modules in per_part.items():
        metadata.update({f"{part}.{k}": v for k, v in _lora_config(modules).items()})
    return tensors, metadata


def _peft_scaling(config: dict, part: str, module: str, rank: int) -> float:
    """The scaling peft gives `module` under `config` (a LoraConfig dict), as LoraLayer.update_layer computes it."""
    from peft.utils.other import get_pattern_key

    names = [module, f"text_model.{module}"] if part.startswith("text_encoder") else [module]

    def pick(pattern: dict | None, default):
        for name in names:
            key = get_pattern_key(list(pattern or {}), name)
            if key in (pattern or {}):
                return pattern[key]
        return default

    r, alpha = pick(config.get("rank_pattern"), config["r"]), pick(config.get("alpha_pattern"), config["lora_alpha"])
    if r != rank:
        raise ValueError(f"{part}.{module}: adapter metadata says rank {r}, the tensors have rank {rank}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def diffusers_to_kohya(state: dict[str, torch.Tensor], adapter_metadata: dict, kind: str = "sd1") -> dict[str, torch.Tensor]:
    """peft-layout tensors (`unet.<module>.lora_A.weight`, ...) + diffusers adapter metadata -> kohya tensors of a
    `kind` base (SDXL UNet modules get SGM names for the real SDXL layout)."""
    prefixes = PREFIXES[kind]
    configs = {
        part: {k.removeprefix(f"{part}."): v for k, v in (adapter_metadata or {}).items() if k.startswith(f"{part}.")}
        for part in prefixes
    }
    tensors: dict[str, torch.Tensor] = {}
    guessed = set()
    for name, group in sorted(_group(state, DIFFUSERS_SUFFIXES).items()):
        part, _, module = name.partition(".")
        if part not in prefixes:
            raise ValueError(f"{name}: a {kind} LoRA has kohya keys only for {', '.join(prefixes)}")
        module = module.removeprefix("text_model.") if part.startswith("text_encoder") else module
        down, up = group["lora_A.weight"].float(), group["lora_B.weight"].float()
        rank = down.shape[0]
        if "r" in configs[part]:
            scaling = _peft_scaling(configs[part], part, module, rank)
        else:
            scaling = 1.0
            guessed.add(part)
        key = kohya_name(part, module, kind)
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(scaling * rank, dtype=torch.float32)
        magnitude = group.get("lora_magnitude_vector", group.get("lora_magnitude_vector.weight"))
        if magnitude is not None:
            magnitude = magnitude.float()
            tensors[f"{key}.dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (up.dim() - 1)).contiguous()
    if guessed:
        warnings.warn(f"no lora_adapter_metadata for {', '.join(sorted(guessed))}: assuming alpha = rank (scale 1.0, "
                      "what diffusers assumes too); if it was trained with another alpha its strength will differ",
                      stacklevel=2)
    return tensors


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    for key, tensor in state.items():  # NaN/Inf weights render black or noise images everywhere the file is used
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key} holds NaN/Inf values, so the adapter is broken (its training "
                             "diverged?); retrain it with a lower learning rate or use another file")
    return state, header


def convert_file(src: Path, dst: Path, to: str, base: str | None = None) -> Path:
    """Convert a LoRA file between the kohya and diffusers/PEFT layouts (to = "kohya" | "diffusers"), keeping its
    metadata and the exact strength of every module. Writes `dst` atomically. `base` (sd1 | sd2 | sdxl): the
    family, when the file's metadata and keys do not tell."""
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
    state, header = _read_safetensors(src)
    is_kohya = any(k.startswith("lora_") for k in state)
    # Hashes describe the old payload and would be wrong for the new one.
    header = {k: v for k, v in header.items() if not k.startswith("sshs_") and k not in ("format", "modelspec.hash_sha256")}
    if to == "diffusers":
        if not is_kohya:
            raise ValueError(f"{src}: not a kohya LoRA (no lora_unet_/lora_te_ keys)")
        if base and (base == "sdxl") != (kohya_file_kind(state) == "sdxl"):
            raise ValueError(f"{src}: its keys are not those of a {base} LoRA")
        tensors, adapter_metadata = kohya_to_diffusers(state, kind=base)
        header.update(format="pt")
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True, default=str)
        with atomic_path(dst) as tmp:
            save_file(tensors, tmp, metadata=header)
        return dst
    if is_kohya:
        raise ValueError(f"{src}: already a kohya LoRA")
    raw = header.pop(LORA_ADAPTER_METADATA_KEY, None)
    kind = base or diffusers_file_kind(state, header)
    return _write_kohya(dst, diffusers_to_kohya(state, json.loads(raw) if raw else {}, kind), header)
