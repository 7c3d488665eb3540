"""Fused kohya modules: several diffusers modules that one kohya key stands for (SD3's q, k and v are one `qkv`
Linear in Stability's MMDiT, so sd-scripts' files and ComfyUI's key map have one LoRA module for the three).

Writing: the members' LoRAs become one LoRA of the fused weight, exactly: down = the members' downs stacked, up =
their ups block-diagonal (ΔW_fused = [ΔW_q; ΔW_k; ΔW_v]); a member that was not trained is a zero block. Each
member's scale is already folded into its up (trainer.lora_files.kohya.uniform_module), so the fused module has
alpha = its rank. Reading: each member gets its rows of up and the down rows those rows use (zero columns dropped),
which is exact for these files and for sd-scripts' own (a shared down of rank r: every member keeps all r).

The family says which modules fuse (`kohya_slot(part, module)` -> (slot, count)); this module knows no base.
"""

from __future__ import annotations

import torch


def kohya_tensors(entries) -> dict[str, torch.Tensor]:
    """Flat kohya tensors from (key, slot or None, group) entries; entries sharing a key with slots are fused."""
    tensors: dict[str, torch.Tensor] = {}
    fused: dict[str, dict] = {}
    for key, slot, group in entries:
        if slot is None:
            tensors.update({f"{key}.{suffix}": t for suffix, t in group.items()})
        else:
            fused.setdefault(key, {})[slot] = group
    for key, members in fused.items():
        tensors.update({f"{key}.{suffix}": t for suffix, t in fuse(key, members).items()})
    return tensors


def fuse(key: str, members: dict[tuple[int, int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One kohya group for the fused weight from {(slot, count): member group} (alpha = rank in every member)."""
    count = next(iter(members))[1]
    if any("dora_scale" in g for g in members.values()) and len(members) < count:
        raise ValueError(f"{key}: DoRA on a fused weight needs all {count} of its parts (e.g. to_q, to_k and to_v) "
                         "in the LoRA targets: the untrained part's magnitude is not in the adapter")
    sample = next(iter(members.values()))
    (rank, fan_in), out = sample["lora_down.weight"].shape, sample["lora_up.weight"].shape[0]
    down = torch.zeros(count * rank, fan_in)
    up = torch.zeros(count * out, count * rank)
    for (slot, _), group in members.items():
        if group["lora_down.weight"].dim() != 2 or group["lora_up.weight"].shape[0] != out:
            raise ValueError(f"{key}: its fused parts must be Linear layers of one output size")
        down[slot * rank:(slot + 1) * rank] = group["lora_down.weight"]
        up[slot * out:(slot + 1) * out, slot * rank:(slot + 1) * rank] = group["lora_up.weight"]
    result = {"lora_down.weight": down, "lora_up.weight": up,
              "alpha": torch.tensor(float(count * rank), dtype=torch.float32)}
    if "dora_scale" in sample:  # every part is there (checked above): its rows, in slot order
        result["dora_scale"] = torch.cat([members[(slot, count)]["dora_scale"] for slot in range(count)])
    return result


def split(names: tuple[str, ...], group: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """[(member module, its kohya group)] of a fused group, each with its rows of up and the down rows they use;
    alpha keeps the group's alpha/rank at each member's rank. A member whose rows are all zero gets rank 1, zeros (the
    preview's hot-swap slot wants the same modules in every file of a base; a DoRA part keeps its magnitude, which
    weight decay moves even where up stayed zero)."""
    down, up = group["lora_down.weight"].float(), group["lora_up.weight"].float()
    rank, count = down.shape[0], len(names)
    if up.dim() != 2 or up.shape[0] % count:
        raise ValueError(f"its lora_up {tuple(up.shape)} does not split into {count} fused parts ({', '.join(names)})")
    out = up.shape[0] // count
    scale = float(group["alpha"]) / rank if "alpha" in group else 1.0
    members = []
    for slot, name in enumerate(names):
        rows = up[slot * out:(slot + 1) * out]
        used = rows.abs().sum(0) > 0
        if not used.any():  # an untrained (or zero) part keeps one zero column: same modules, ΔW 0
            used[0] = True
        member = {"lora_down.weight": down[used].contiguous(), "lora_up.weight": rows[:, used].contiguous(),
                  "alpha": torch.tensor(scale * int(used.sum()), dtype=torch.float32)}
        if "dora_scale" in group:
            member["dora_scale"] = group["dora_scale"][slot * out:(slot + 1) * out]
        members.append((name, member))
    return members
