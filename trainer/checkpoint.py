"""Resumable checkpoints with no pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder checkpoints/step-NNNNNN/ holding the trainable (LoRA) weights, the optimizer and
LR-scheduler state, the step and the RNG state. It is written to a temp folder and renamed, so a crash
leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {int(idx): dict(slots) for idx, slots in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


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
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
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
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))
    optimizer.load_state_dict(_join_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(load_file(folder / "rng.safetensors")["torch_cpu"])
    extra = load_file(folder / "extra.safetensors") if (folder / "extra.safetensors").is_file() else {}
    return int(state["step"]), extra


def list_checkpoints(run_dir: Path) -> list[Path]:
    folders = [p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
