"""Adapter files. This module writes the diffusers/PEFT layout that diffusers' load_lora_weights reads.

Keys are `unet.<module>.lora_A.weight` / `text_encoder.<module>.lora_B.weight`; the peft LoraConfig of each
part (rank, alpha, rsLoRA, targets) goes into the `lora_adapter_metadata` header entry the way diffusers'
own save_lora_weights writes it, so diffusers restores the exact alpha instead of assuming alpha = rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.io import atomic_path
from trainer.lora_files.kohya_names import canonical_text_module, unet_config

COMPACT_KEY = "style_lora_compact"  # header entry of a LoHa/LoKr diffusers file: exact or its measured error (JSON)
LOKR_LAYOUT_KEY = "style_lora_lokr_layout"  # header entry of a diffusers file in peft's LoKr layout: why (JSON)
EXPORT_SKIPPED_KEY = "style_lora_export_skipped"  # on a kohya file: optional files not written for time (JSON)
EXPORT_FLOOR_S = 30.0  # the least time budget a save's optional exports get (export_budget)


def export_budget(started_at: float) -> float:
    """The time budget of a save's optional exports (the SVDs of DoRA's plain file and LoHa/LoKr's compact diffusers
    file): the training's wall time so far (`started_at`: time.time() at the run's start), at least EXPORT_FLOOR_S.
    The floor is for tiny and early saves: after seconds of training, the fixed costs of an export (reading every
    layer's factors, the first SVD's start-up on a busy CPU) alone can take longer, and a file that costs seconds is
    no burden on any run."""
    import time

    return max(time.time() - started_at, EXPORT_FLOOR_S)


def _adapter_config(module: torch.nn.Module) -> dict:
    config = module.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def peft_layout(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict with diffusers prefixes and the packed adapter metadata, for every module that has LoRA."""
    from peft.utils import get_peft_model_state_dict

    tensors: dict[str, torch.Tensor] = {}
    adapter_metadata: dict = {}
    for prefix, module in modules.items():
        if not getattr(module, "peft_config", None):
            continue
        for key, value in get_peft_model_state_dict(module).items():
            if prefix.startswith("text_encoder") and key.endswith("lora_magnitude_vector"):
                key += ".weight"  # transformers 5's adapter loader only maps DoRA magnitudes spelled this way
            tensors[_file_key(prefix, key)] = value.detach().float().cpu().contiguous()
        for key, value in _adapter_config(module).items():
            adapter_metadata[f"{prefix}.{key}"] = value
    return tensors, adapter_metadata


def _file_key(prefix: str, module: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model.` level; files keep the canonical name that every
    # diffusers/transformers version (and every LoRA on the hub) uses.
    return f"{prefix}.{canonical_text_module(module) if prefix.startswith('text_encoder') else module}"


def factors_layout(factors: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A plain-LoRA diffusers layout from per-module factors (any variant, see trainer.adapters.factors.lora_factors).

    Ranks and alphas may differ per module (AdaLoRA, Delta-LoRA's rank 2r): they go to peft's rank_pattern and
    alpha_pattern with alpha = scale·rank, so diffusers applies exactly scale·up·down.
    """
    tensors, adapter_metadata, parts = {}, {}, {}
    for full_name, f in factors.items():
        prefix, module = full_name.split(".", 1)
        parts.setdefault(prefix, {})[module] = f
        key = _file_key(prefix, module)
        tensors[f"{key}.lora_A.weight"] = f.down.float().contiguous()
        tensors[f"{key}.lora_B.weight"] = f.up.float().contiguous()
        if f.magnitude is not None:
            suffix = ".weight" if prefix.startswith("text_encoder") else ""  # see peft_layout
            tensors[f"{key}.lora_magnitude_vector{suffix}"] = f.magnitude.float().contiguous()
    for prefix, modules in parts.items():
        ranks = {m: int(f.down.shape[0]) for m, f in modules.items()}
        config = {
            "r": max(ranks.values()), "lora_alpha": 1.0, "lora_dropout": 0.0, "use_rslora": False,
            "use_dora": any(f.magnitude is not None for f in modules.values()), "bias": "none",
            "init_lora_weights": True, "target_modules": sorted(modules),
            "rank_pattern": ranks, "alpha_pattern": {m: modules[m].scale * r for m, r in ranks.items()},
        }
        adapter_metadata.update({f"{prefix}.{k}": v for k, v in config.items()})
    return tensors, adapter_metadata


def _all_lokr(modules: dict[str, torch.nn.Module]) -> bool:
    """Is every adapted module's peft adapter a LoKr?"""
    configs = [m.peft_config["default"] for m in modules.values() if getattr(m, "peft_config", None)]
    return bool(configs) and all(getattr(c.peft_type, "value", c.peft_type) == "LOKR" for c in configs)


def lokr_layout(modules: dict[str, torch.nn.Module], why: dict) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """peft's own LoKr state dict and configs, prefixed per part (`unet.<module>.lokr_w1` ...): diffusers'
    `load_lora_adapter` rebuilds exactly these layers (trainer.adapters.lycoris). Returns (tensors, adapter metadata,
    {LOKR_LAYOUT_KEY: exact, sizes and `why`: the plain LoRA it replaces, or its SVDs' time-out})."""
    from trainer.adapters.variants import lora_layers

    tensors, adapter_metadata = peft_layout(modules)
    weights = sum(layer.get_base_layer().weight.numel() for m in modules.values() if getattr(m, "peft_config", None)
                  for layer in lora_layers(m).values())
    report = {"exact": True, "bytes": 4 * sum(t.numel() for t in tensors.values()), "weight_bytes": 4 * weights, **why}
    return tensors, adapter_metadata, {LOKR_LAYOUT_KEY: json.dumps(report)}


def _converted(modules: dict[str, torch.nn.Module], delta, max_error: float, deadline,
               exact_lokr: bool) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The plain-LoRA equivalent (tensors, adapter metadata, header entries). A LoKr whose plain LoRA misses
    `max_error` (or whose SVDs run out of `deadline`) is written in peft's LoKr layout instead, exact (`exact_lokr`)."""
    from trainer.adapters.compact import OutOfTime, compact_factors, meets_target
    from trainer.adapters.factors import lora_factors

    lokr = exact_lokr and _all_lokr(modules)
    try:
        factors, report = compact_factors(lora_factors(modules, delta), max_error, deadline)
    except OutOfTime as err:
        if not lokr:
            raise
        return lokr_layout(modules, {"plain_lora_out_of_time": err.report()})
    if lokr and report is not None and not meets_target(report):
        return lokr_layout(modules, {"plain_lora": report})
    tensors, adapter_metadata = factors_layout(factors)
    return tensors, adapter_metadata, ({} if report is None else {COMPACT_KEY: json.dumps(report)})


def diffusers_content(modules: dict[str, torch.nn.Module], metadata: dict[str, str] | None = None, delta=None,
                      convert: bool = False, max_error: float = 0.01, deadline=None,
                      exact_lokr: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) of the diffusers/PEFT-layout file; see save_diffusers_lora. Raises OutOfTime (LoHa's SVDs
    past `deadline`, trainer.adapters.compact.Deadline)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    header = {"format": "pt", **(metadata or {})}
    if convert:
        tensors, adapter_metadata, entries = _converted(modules, delta, max_error, deadline, exact_lokr)
        header.update(entries)
    else:
        tensors, adapter_metadata = peft_layout(modules)
    if not tensors:
        raise ValueError("no LoRA weights to save: neither the UNet nor the text encoder has an adapter")
    header[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True, default=str)
    return tensors, header


def save_diffusers_lora(path: Path, modules: dict[str, torch.nn.Module], metadata: dict[str, str] | None = None,
                        delta=None, convert: bool = False, max_error: float = 0.01, exact_lokr: bool = True) -> Path:
    """Write `path` atomically in the diffusers/PEFT layout. `metadata` values must be strings.

    convert: write the plain-LoRA equivalent (VeRA, AdaLoRA, Delta-LoRA, LoHa, LoKr), which diffusers can load; exact,
    except LoHa/LoKr layers whose exact form is larger than their weight (trainer.adapters.compact, `max_error`). A
    LoKr whose plain LoRA misses `max_error` is written in peft's LoKr layout, exact (`exact_lokr`; False: the
    plain LoRA anyway, with its measured error)."""
    tensors, header = diffusers_content(modules, metadata, delta, convert, max_error, exact_lokr=exact_lokr)
    return _write(Path(path), tensors, header)


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def training_metadata(cfg, base_kind: str, step: int, num_images: int, started_at: float,
                      prediction_type: str = "epsilon", unet_config=None) -> dict[str, str]:
    """The training facts every adapter file carries (kohya-style ss_* names; all values strings). `unet_config`:
    the denoiser's, for families whose files name the base's size (SD3.5 Medium/Large)."""
    import time

    from trainer import families
    from trainer.config import to_toml

    family = families.get(base_kind)
    return {
        "ss_output_name": cfg.output.name,
        "ss_base_model_version": family.kohya_version(unet_config),
        "modelspec.architecture": family.modelspec_architecture(prediction_type == "v_prediction", unet_config),
        "ss_v2": str(family.V2),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(cfg.lora.alpha),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "ss_num_train_images": str(num_images),
        "ss_steps": str(step),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_sd_model_name": cfg.model.path,
        "modelspec.title": cfg.output.name,
        "modelspec.trigger_phrase": cfg.data.trigger,
        "style_lora_config": to_toml(cfg),
    }


def plain_lora(modules: dict[str, torch.nn.Module], rank: int, kind: str | None = None, delta=None,
               max_error: float = 0.01, deadline=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every adapted layer's effective ΔW (DoRA: the whole re-normalised change) as plain kohya LoRA tensors and the
    report of trainer.lora_files.dora.plain_lora_tensors (rank, measured relative errors, sizes). Raises OutOfTime
    past `deadline`."""
    from trainer.adapters.factors import lora_factors
    from trainer.lora_files.dora import plain_lora_tensors

    modules = {p: m for p, m in modules.items() if m is not None and getattr(m, "peft_config", None)}
    return plain_lora_tensors(lora_factors(modules, delta), rank, kind, unet_config(modules), max_error,
                              deadline)


def save_plain_lora(path: Path, modules: dict[str, torch.nn.Module], metadata: dict[str, str], rank: int,
                    kind: str | None = None, delta=None, max_error: float = 0.01) -> tuple[Path, dict]:
    """Write plain_lora's file (rank 0: chosen by `max_error`); returns (path, report), the report also in the
    header."""
    from trainer.lora_files.dora import PLAIN_KEY
    from trainer.lora_files.kohya import write_kohya

    tensors, report = plain_lora(modules, rank, kind, delta, max_error)
    # ss_network_dim / ss_network_alpha keep describing the training; this file's own rank is in PLAIN_KEY
    return write_kohya(Path(path), tensors, {**metadata, PLAIN_KEY: json.dumps(report)}), report


def save_adapters(run_dir: Path, cfg, modules: dict[str, torch.nn.Module], meta: dict[str, str], *, base_kind: str,
                  tag_frequency: dict, cover_png: bytes | None, step: int | None = None, delta=None,
                  convert: bool = False, best: bool = False, budget_s: float | None = None,
                  warn=None) -> tuple[Path, ...]:
    """The files of a run: `<name>.safetensors` (kohya/A1111 layout, what A1111/Forge/ComfyUI users drop in),
    `<name>.diffusers.safetensors` (diffusers/PEFT layout) and, for DoRA, `<name>.plain.safetensors` (the DoRA as a
    plain LoRA for tools that cannot apply DoRA: written when output.plain_lora_rank asks for it or when it comes
    within output.export_max_error; otherwise the kohya file's header says what it would have lost). `step` names an
    intermediate save; `best`: the lowest validation loss so far (`<name>-best…`, train.keep_best).

    `budget_s` (export_budget; None: no limit): the time the optional files' SVDs may take together (DoRA's plain
    file, LoHa's compact diffusers file; a LoKr's falls back to peft's LoKr layout, exact and immediate). A file
    whose SVDs run past it is not written; the kohya file's header says why (EXPORT_SKIPPED_KEY) and `warn(text)` is
    called. The kohya file and closed-form diffusers files do not count against it."""
    from trainer.adapters.compact import Deadline, OutOfTime, meets_target
    from trainer.lora_files.dora import PLAIN_KEY, PLAIN_SKIPPED_KEY
    from trainer.lora_files.kohya import kohya_metadata, save_kohya_lora, write_kohya

    deadline = Deadline(budget_s)
    run_dir = Path(run_dir)
    stem = cfg.output.name + ("-best" if best else "" if step is None else f"-step{step:06d}")
    kohya_meta = kohya_metadata(meta, rank=cfg.lora.rank, alpha=cfg.lora.alpha, trigger=cfg.data.trigger,
                                tag_frequency=tag_frequency, base_kind=base_kind, cover_png=cover_png,
                                rslora=cfg.lora.rslora)
    plain, skipped, dropped = None, {}, []
    if cfg.lora.variant == "dora":  # written when asked for (a rank) or when it comes within the error target
        try:
            plain, report = plain_lora(modules, cfg.output.plain_lora_rank, base_kind, delta,
                                       cfg.output.export_max_error, deadline)
        except OutOfTime as err:
            skipped[f"{stem}.plain.safetensors"] = err.report()
        else:
            if not (cfg.output.plain_lora_rank or meets_target(report)):
                plain = None
                kohya_meta = {**kohya_meta, PLAIN_SKIPPED_KEY: json.dumps(report)}  # why there is no .plain file
        if plain is None:
            dropped.append(f"{stem}.plain.safetensors")
    try:
        diffusers = diffusers_content(modules, meta, delta, convert, cfg.output.export_max_error, deadline)
    except OutOfTime as err:
        diffusers = None
        skipped[f"{stem}.diffusers.safetensors"] = err.report()
        dropped.append(f"{stem}.diffusers.safetensors")
    if skipped:
        kohya_meta = {**kohya_meta, EXPORT_SKIPPED_KEY: json.dumps(skipped)}
        for name, why in skipped.items():
            text = (f"{name} not written: its SVDs ran past the export time budget ({why['spent_s']} s of "
                    f"{why['budget_s']} s, the training's time so far; {why['layers_done']} of {why['layers']} layers)")
            print(f"warning: {text}")
            if warn is not None:
                warn(text)
    for name in dropped:  # an older save's file of that name would pass for these weights
        (run_dir / name).unlink(missing_ok=True)
    if cfg.lora.variant in ("loha", "lokr"):  # LyCORIS keys, what A1111/Forge and ComfyUI read (trainer/adapters/lycoris.py)
        from trainer.lora_files.lycoris import save_lycoris_kohya

        kohya = save_lycoris_kohya(run_dir / f"{stem}.safetensors", modules, kohya_meta, cfg.lora, base_kind)
    else:
        kohya = save_kohya_lora(run_dir / f"{stem}.safetensors", modules, kohya_meta, delta=delta, kind=base_kind)
    paths = [kohya]
    if diffusers is not None:
        paths.append(_write(run_dir / f"{stem}.diffusers.safetensors", *diffusers))
    if plain is not None:
        header = {**kohya_meta, PLAIN_KEY: json.dumps(report)}
        paths.append(write_kohya(run_dir / f"{stem}.plain.safetensors", plain, header))
    return tuple(paths)
