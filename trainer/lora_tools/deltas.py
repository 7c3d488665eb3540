"""One module's change of the base weight (Delta) and a LoRA file read into them (LoraFile, read_lora).

A Delta is ΔW = scale·up·down (a LoRA, kept low-rank) or the full ΔW (LoHa, LoKr, DoRA's effective change): what a
consumer adds to the base weight at strength 1. Keys are "part.module": the part as diffusers files name it (unet,
transformer, text_encoder, text_encoder_2) and the module path as the base's model names it (text encoders without
`text_model.`), e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.lora_tools import layouts


@dataclass
class Delta:
    """ΔW of one module: scale·up·down when `full` is None, else `full`. `shape` is the base weight's."""

    shape: tuple[int, ...]
    down: torch.Tensor | None = None  # [r, in(, kh, kw)]
    up: torch.Tensor | None = None  # [out, r(, 1, 1)]
    scale: float = 1.0
    full: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        """The LoRA rank; None for a full ΔW."""
        return None if self.down is None else self.down.shape[0]

    def weight(self) -> torch.Tensor:
        """ΔW in float32, shaped like the base weight."""
        if self.full is not None:
            return self.full.float().reshape(self.shape)
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(self.shape) * self.scale

    def scaled(self, weight: float) -> Delta:
        """This change at strength `weight` (the low-rank form kept)."""
        if self.full is not None:
            return Delta(self.shape, full=self.full * weight)
        return Delta(self.shape, self.down, self.up, self.scale * weight)


@dataclass
class LoraFile:
    """A LoRA file read into Deltas, with what `lora info` tells about it."""

    path: Path
    layout: str  # "kohya" | "diffusers" | "lycoris" | "peft" ... (trainer.lora_tools.layouts)
    trainer: str  # who wrote it, as far as the keys and metadata tell ("this app", "kohya sd-scripts", ...)
    family: str  # the base family's NAME
    variant: str  # "lora" | "dora" | "loha" | "lokr" | "locon" ...
    deltas: dict[str, Delta]
    header: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, tuple[int | None, float | None]] = field(default_factory=dict)  # "part.module": (rank, alpha)
    needs_base: list[str] = field(default_factory=list)  # DoRA modules read without the base: ΔW not resolved

    def require_base(self) -> None:
        """Refuse to use ΔW that needs the base model's weights (DoRA) when the file was read without them."""
        if self.needs_base:
            raise ValueError(f"{self.path}: a DoRA LoRA ({self.needs_base[0]} ...); its change depends on the base "
                             "model's weights: pass --model")


LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
LYCORIS_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                    "lokr_w2_a", "lokr_w2_b")
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight")
PEFT_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")  # peft's LoKr state dict
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


def _low_rank(group: dict[str, torch.Tensor], down_key: str, up_key: str, scale: float) -> Delta:
    down, up = group[down_key].float(), group[up_key].float()
    shape = (up.shape[0], *down.shape[1:])
    return Delta(shape, down.contiguous(), up.contiguous(), scale)


def _dora_delta(delta: Delta, scale: torch.Tensor, weight: torch.Tensor, comfy: bool) -> Delta:
    """The effective ΔW = W' − W of a DoRA module. comfy: ComfyUI/Forge's weight_decompose on a kohya dora_scale
    (output axis: divided by the ORIGINAL weight's row norm + eps; input axis: by the column norm of W + ΔW);
    otherwise peft's (W + ΔW)·m/‖W + ΔW‖ per output row."""
    from trainer.lora_files.dora import EPS, dora_weight, row_norm

    w, d = weight.double(), delta.weight().double()
    if not comfy:
        return Delta(delta.shape, full=(dora_weight(w, d, scale.double()) - w).float())
    combined = w + d
    if scale.shape[0] == w.shape[0]:
        norm = row_norm(w)
    else:  # input axis: the norm of each input column of W + ΔW
        norm = row_norm(combined.transpose(0, 1)).transpose(0, 1)
    return Delta(delta.shape, full=(combined * scale.double().reshape(norm.shape) / (norm + EPS) - w).float())


def _lycoris_delta(name: str, group: dict[str, torch.Tensor], shape: tuple[int, ...] | None) -> tuple[Delta, int, float]:
    """ΔW of a LoHa or LoKr module by ComfyUI's formulas (comfy/weight_adapter): LoHa (w1a·w1b)∘(w2a·w2b)·alpha/r with
    r = w1b's rows; LoKr kron(w1, w2)·alpha/dim only when a factor is decomposed (dim = its rank), else scale 1."""
    alpha = float(group["alpha"]) if "alpha" in group else None
    if "hada_w1_a" in group:
        missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - group.keys()
        if missing:
            raise ValueError(f"{name}: LoHa module without {', '.join(sorted(missing))}")
        w1 = group["hada_w1_a"].double() @ group["hada_w1_b"].double().flatten(1)
        w2 = group["hada_w2_a"].double() @ group["hada_w2_b"].double().flatten(1)
        rank = group["hada_w1_b"].shape[0]
        full = w1 * w2 * ((alpha if alpha is not None else rank) / rank)
    else:
        factors, dim = [], None
        for w in ("lokr_w1", "lokr_w2"):
            if w in group:
                factors.append(group[w].double())
            elif f"{w}_a" in group and f"{w}_b" in group:
                factors.append(group[f"{w}_a"].double() @ group[f"{w}_b"].double().flatten(1))
                dim = group[f"{w}_b"].shape[0]
            else:
                raise ValueError(f"{name}: LoKr module without {w} (or {w}_a/{w}_b)")
        w1, w2 = factors
        if len(shape or ()) == 4 and w2.dim() == 2 and w2.numel() * w1.numel() == math.prod(shape):
            w2 = w2.reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        full = torch.kron(w1, w2) * (alpha / dim if dim is not None and alpha is not None else 1.0)
        rank = dim or 0
    if shape is None or math.prod(shape) != full.numel():
        shape = tuple(full.shape)
    return Delta(shape, full=full.float().reshape(shape)), rank, alpha


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


def _kohya_lookup(name: str, family) -> str:
    """A file's kohya name as our tables spell it: SD1/SD2 files sometimes say lora_te1_; older SDXL files
    lora_te2_text_model_text_projection (ComfyUI's key map knows lora_te2_text_projection only)."""
    if name.startswith("lora_te1_") and "text_encoder_2" not in family.KOHYA_PREFIXES:
        name = "lora_te_" + name.removeprefix("lora_te1_")
    return name.replace("_text_model_text_projection", "_text_projection")


def _lycoris_members(deltas: dict, ranks: dict, name: str, group: dict, part: str, module, shapes: dict) -> None:
    """A LoHa/LoKr module's full ΔW into `deltas`; one over a fused weight (SD3's qkv) cut into its members' rows."""
    members = module if isinstance(module, tuple) else (module,)
    sizes = [shapes.get(f"{part}.{m}") for m in members]
    fused = None if None in sizes else (sum(s[0] for s in sizes), *sizes[0][1:])
    delta, rank, alpha = _lycoris_delta(name, group, fused)
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

    table, shapes = _kohya_tables(family.NAME, parts)
    deltas, ranks, kinds, unknown = {}, {}, set(), []
    for name, group in sorted(group_keys(state, (*LORA_SUFFIXES, *LYCORIS_SUFFIXES)).items()):
        target = table.get(_kohya_lookup(name, family))
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
                delta = _low_rank(g, "lora_down.weight", "lora_up.weight", alpha / rank)
                if "dora_scale" in g:  # ComfyUI/Forge's formula: the consumers that read a kohya dora_scale
                    if parts:
                        delta = _dora_delta(delta, g["dora_scale"].float(), base_weights(parts, key), comfy=True)
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
    for name, group in sorted(group_keys(state, (*PEFT_SUFFIXES, *PEFT_LOKR)).items()):
        if group.keys() & set(PEFT_LOKR):
            key, delta, rank, alpha = _peft_lokr(name, group, metadata)
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
        delta = _low_rank(group, "lora_A.weight", "lora_B.weight", scale)
        magnitude = group.get("lora_magnitude_vector", group.get("lora_magnitude_vector.weight"))
        if magnitude is not None:
            if parts:
                delta = _dora_delta(delta, magnitude.float(), base_weights(parts, key), comfy=False)
            kinds.add("dora")
        elif delta.down.dim() == 4 and delta.down.shape[2:] != (1, 1):
            kinds.add("locon")
        deltas[key], ranks[key] = delta, (rank, scale * rank if "r" in config else None)
    return deltas, ranks, kinds


def _peft_lokr(name: str, group: dict, metadata: dict) -> tuple[str, Delta, int, float]:
    """("part.module", ΔW, r, alpha) of one module of peft's LoKr layout: peft scales kron(w1, w2) by alpha/r always
    (peft/tuners/lokr/layer.py), with r and alpha per module from the part's config and its patterns."""
    from peft.utils.other import get_pattern_key

    part, _, module = name.partition(".")
    config = {k.removeprefix(part + "."): v for k, v in metadata.items() if k.startswith(part + ".")}
    if "r" not in config:
        raise ValueError(f"{name}: a LoKr module without its peft config (lora_adapter_metadata) to scale it")

    def pick(pattern: dict | None, default):
        key = get_pattern_key(list(pattern or {}), module)
        return (pattern or {}).get(key, default)

    rank, alpha = pick(config.get("rank_pattern"), config["r"]), pick(config.get("alpha_pattern"), config["alpha"])
    raw, _, _ = _lycoris_delta(name, group, None)  # no alpha in the group: kron(w1, w2) unscaled
    module = module.removeprefix("text_model.")
    return f"{part}.{module}", Delta(raw.shape, full=raw.full * (alpha / rank)), rank, float(alpha)


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


def _denoiser(state: dict, base: str | None, parts: dict | None) -> str:
    """The denoiser's part name, for layouts whose keys do not say it (trainer.lora_tools.layouts.normalize)."""
    from trainer import families

    if parts:
        return next(p for p in parts if p in families.DENOISERS)
    return families.get(base).DENOISER if base else layouts.guess_denoiser(set(state))


def read_lora(path: str | Path, model=None, base: str | None = None) -> LoraFile:
    """Any LoRA .safetensors file (kohya, LyCORIS LoHa/LoKr, diffusers/peft; other trainers' spellings through
    trainer.lora_tools.layouts) as Deltas. `model`: the base ({part: module}, or a path / hub id), needed for DoRA
    files and to name modules of a base whose layout differs from its family's reference; `base`: a family name when
    the file does not tell. ValueError names the file and the problem."""
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
        family = _family(state, header, kohya, base, parts)
        if kohya:
            deltas, ranks, kinds = read_kohya(state, header, family, parts, str(path))
        else:
            deltas, ranks, kinds = read_peft(state, header, parts, str(path))
    except ValueError as err:
        raise ValueError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from None
    denoisers = {key.split(".", 1)[0] for key in deltas} - set(family.TEXT_ENCODERS)
    if denoisers - {family.DENOISER}:
        raise ValueError(f"{path}: has modules of '{', '.join(sorted(denoisers))}', not of a {family.LABEL} base")
    variant = next((v for v in ("dora", "loha", "lokr", "locon") if v in kinds), "lora")
    needs_base = [] if parts or variant != "dora" else sorted(k for k, d in deltas.items() if d.rank is not None)
    return LoraFile(path, layout, trainer, family.NAME, variant, deltas, header, ranks, needs_base)
