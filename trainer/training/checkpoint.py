"""Resumable checkpoints with no pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder checkpoints/step-NNNNNN/ holding the trainable (LoRA) weights, the optimizer and
LR-scheduler state, the step and the RNG state. It is written to a temp folder (every file fsynced) and renamed,
so a crash leaves either the whole checkpoint or none; old ones are renamed aside before they are deleted, so a
half-deleted folder never looks like a checkpoint.

Also here: the disk-space estimate a run checks before it loads anything (`check_disk_space`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.io import fsync_dir, fsync_file

STATE_FILE = "state.json"


def _adapter_params(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    # Trainable params plus frozen adapter params (LoRA-FA's A): everything the adapter is made of.
    return {f"{prefix}.{name}": p for prefix, module in modules.items() for name, p in module.named_parameters()
            if p.requires_grad or ".lora_" in name}


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in _adapter_params(modules).items()}


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict, live_groups: list[dict]) -> dict:
    state = {int(idx): dict(slots) for idx, slots in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    # JSON has no tuples: give back the tuples (betas, eps pairs) the optimizer was built with, so the restored
    # param groups equal the saved ones exactly.
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}
              for saved, live in zip(plain["param_groups"], live_groups)]
    return {"state": state, "param_groups": groups}


def one_number(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """tensors[key] when it holds one number (a step, a loss), else ValueError naming the key: never torch's
    'only one element tensors can be converted to Python scalars'."""
    value = tensors[key]
    if value.numel() != 1:
        raise ValueError(f"'{key}' holds {value.numel()} values where one number belongs")
    return value


def save_checkpoint(folder: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """`extra`: variant state that is not a parameter (Delta-LoRA snapshot, AdaLoRA sensitivity averages)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(modules), tmp / "lora.safetensors")
    opt_tensors, opt_plain = _split_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}, tmp / "extra.safetensors")
    state = {"step": step, "optimizer": opt_plain, "lr_scheduler": lr_scheduler.state_dict()}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    if folder.exists():  # the same step again (a resumed run): move the old one aside, never delete in place
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    fsync_dir(folder.parent)
    return folder


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler) -> tuple[int, dict]:
    """Restore weights, optimizer, scheduler and RNG in place; return the step to continue from and the extra state."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    weights = load_file(folder / "lora.safetensors")
    params = _adapter_params(modules)
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: checkpoint does not match this model/LoRA config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    wrong = next((n for n in sorted(params) if tuple(weights[n].shape) != tuple(params[n].shape)), None)
    if wrong is not None:
        raise ValueError(f"{folder}: checkpoint does not match this model/LoRA config ({wrong} has shape "
                         f"{list(weights[wrong].shape)}, this run's {list(params[wrong].shape)})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))
    optimizer.load_state_dict(_join_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"],
                                              optimizer.param_groups))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(load_file(folder / "rng.safetensors")["torch_cpu"])
    extra = load_file(folder / "extra.safetensors") if (folder / "extra.safetensors").is_file() else {}
    return int(state["step"]), extra


def resume_from(resume: str | None, run_dir: Path, modules: dict[str, torch.nn.Module], optimizer,
                lr_scheduler) -> tuple[int, dict, Path | None]:
    """train.resume: None (start at 0), "latest" (the run's newest checkpoint; none yet, e.g. killed before the
    first, starts over) or a checkpoint folder. Restores in place; returns (step, extra state, folder used)."""
    if not resume:
        return 0, {}, None
    if resume == "latest" and not list_checkpoints(run_dir):
        return 0, {}, None
    folder = list_checkpoints(run_dir)[-1] if resume == "latest" else Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume: no checkpoint at {folder}")
    step, extra = load_checkpoint(folder, modules, optimizer, lr_scheduler)
    return step, extra, folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    folders = [p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep`; also clear what a killed run left behind (.step-N.tmp/.old folders)."""
    folder = Path(run_dir) / "checkpoints"
    for old in list_checkpoints(run_dir)[:-keep]:
        trash = old.with_name(f".{old.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)  # atomic: the checkpoint is whole or gone, never half-deleted
        shutil.rmtree(trash, ignore_errors=True)
    for leftover in [*folder.glob(".step-*.tmp"), *folder.glob(".step-*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------- disk space

MIB = 2**20
FALLBACK_PARAMS_PER_RANK = 500_000  # hub ids (no local file to read): a little above SD1.5 attention LoRA per rank
UNET_PREFIXES = ("model.diffusion_model.",)  # single-file (original SD) key layout
TE_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")


class DiskSpaceError(ValueError):
    """Not enough free disk space for the run; the message shows the estimate and what is free."""


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a .safetensors header (JSON after an 8-byte length): no tensor is read."""
    from trainer.io import read_safetensors_header

    return {k: v["shape"] for k, v in read_safetensors_header(path).items() if k != "__metadata__"}


def _matches(key: str, targets: list[str]) -> bool:
    module = key.removesuffix(".weight")
    return key.endswith(".weight") and any(module == t or module.endswith("." + t) for t in targets)


def _lora_params(shapes: dict[str, list[int]], targets: list[str], rank: int) -> int:
    total = 0
    for key, shape in shapes.items():
        if _matches(key, targets) and len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            total += rank * (fan_in + shape[0]) + shape[0]  # A + B (+ a magnitude/scale vector for DoRA & co.)
    return total


def estimate_lora_params(cfg) -> int | None:
    """Adapter parameter count from the base's weight headers; None when the base is not a local file/folder."""
    from trainer import families
    from trainer.adapters.attach import denoiser_targets
    from trainer.families.loading import resolve_source

    lc = cfg.lora
    try:
        kind, where = resolve_source(cfg.model.path)
    except ValueError:
        return None  # the loader reports the real problem right after
    parts = []  # (shapes, targets)
    if kind == "folder":
        described = families.describe_folder(where)
        family = families.get(described["kind"]) if "kind" in described else families.FALLBACK
        for sub, wanted, targets in ((family.DENOISER, lc.train_unet, denoiser_targets(lc, family)),
                                     *((name, lc.train_text_encoder, lc.text_encoder_targets)
                                       for name in family.TEXT_ENCODERS)):
            if wanted:
                shapes = {}
                for f in sorted((Path(where) / sub).glob("*.safetensors")):
                    shapes.update(_safetensors_shapes(f))
                parts.append((shapes, targets))
    elif kind == "file":
        shapes = _safetensors_shapes(Path(where))
        family = families.from_checkpoint_keys(shapes)
        if lc.train_unet:
            parts.append(({k: v for k, v in shapes.items() if k.startswith(UNET_PREFIXES)},
                          denoiser_targets(lc, family)))
        if lc.train_text_encoder:
            parts.append(({k: v for k, v in shapes.items() if k.startswith(TE_PREFIXES)}, lc.text_encoder_targets))
    else:
        return None
    # None when the names do not match (a single file in Stability's fused-qkv names): the caller guesses instead;
    # lora.blocks: every block at the largest rank, an upper bound
    rank = max([lc.rank, *(lc.blocks or {}).values()])
    return sum(_lora_params(shapes, targets, rank) for shapes, targets in parts) or None


def estimate_run_bytes(cfg, total_steps: int) -> dict:
    """What a run writes at its peak: adapter files (2 formats, at every save and the end), resumable checkpoints
    (weights + 2 AdamW moments, keep+1 while the newest is written), sample PNGs (raw-size bound), the run zip,
    logs; +20 %. The latent cache lives in RAM and writes nothing."""
    tc = cfg.train
    params = estimate_lora_params(cfg)
    guessed = params is None
    if guessed:
        params = FALLBACK_PARAMS_PER_RANK * cfg.lora.rank
    adapter = params * 4 * 2  # fp32, kohya + diffusers files
    saves = 1 + ((total_steps - 1) // tc.save_every if tc.save_every else 0)
    n_ckpt = (total_steps - 1) // tc.checkpoint_every + 1 if tc.checkpoint_every else 1  # 1: a stop checkpoint
    ckpts = min(n_ckpt, tc.keep_checkpoints + 1)
    checkpoint = params * 4 * 3 + MIB
    w = cfg.sample.width or cfg.data.resolution
    h = cfg.sample.height or cfg.data.resolution
    n_samples = len(cfg.sample.prompts) * (1 + (total_steps // cfg.sample.every if cfg.sample.every else 0))
    samples = n_samples * w * h * 3
    parts = {"adapters": adapter * saves, "checkpoints": checkpoint * ckpts, "samples": samples,
             "run_zip": adapter * saves + samples, "logs": 16 * MIB}
    total = int(sum(parts.values()) * 1.2)
    detail = (f"{saves} adapter save(s) x {adapter / MIB:.1f} MiB + {ckpts} checkpoint(s) x {checkpoint / MIB:.1f} MiB"
              f" + {n_samples} sample(s) + run zip + logs, +20 %"
              + (" (adapter size guessed: the base is not a local file)" if guessed else ""))
    return {"needed_bytes": total, "lora_params": params, "detail": detail}


def check_disk_space(cfg, run_dir: Path, total_steps: int) -> dict:
    """Refuse (DiskSpaceError) when the run folder's disk has less free space than the run needs."""
    est = estimate_run_bytes(cfg, total_steps)
    probe = Path(run_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    est["free_bytes"] = free
    if free < est["needed_bytes"]:
        raise DiskSpaceError(
            f"not enough disk space in {run_dir}: this run needs about {est['needed_bytes'] / MIB:.0f} MiB "
            f"({est['detail']}), only {free / MIB:.0f} MiB free. Free some space, lower train.keep_checkpoints, "
            f"save adapters less often (train.save_every) or pick another output.dir.")
    return est
