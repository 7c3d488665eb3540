"""lora.blocks: LoRA on chosen denoiser blocks only, each block at its own rank (kohya's block_dims).

The base's family names its blocks (`block_names(denoiser config)`: down.N, mid, up.N in a UNet; block.N in an MMDiT)
and says which block a module path lies in (`block_of`); nothing here knows a family. A module of the targets is
trained when its block has a rank > 0; modules outside every block (conv_in, time embeddings, conv_out, an MMDiT's
embedders) are not. The ranks reach peft as rank_pattern / alpha_pattern keyed by full module paths (which peft
matches exactly), so every file writer already handles them: the kohya file pads each module to one rank with zeros
(trainer.lora_files.kohya.uniform_module), the diffusers file keeps the patterns in its peft metadata.

A block's alpha keeps the run's scale: alpha = lora.alpha·r_block/lora.rank, so every module scales its update by
lora.alpha/lora.rank as without blocks (rsLoRA keeps lora.alpha: alpha/√r is already its rule across ranks).
kohya's default differs: block_alphas defaults to network_alpha in every block (sd-scripts networks/lora.py,
get_block_dims_and_alphas), so a lower block rank there also means a larger scale.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from trainer.config import LoraConfig
from trainer.families.loading import ModelError


def check_block_names(cfg: LoraConfig, family, denoiser_config) -> None:
    """Refuse lora.blocks names this base does not have, in one line listing the ones it has."""
    valid = family.block_names(denoiser_config)
    unknown = [name for name in cfg.blocks if name not in valid]
    if unknown:
        raise ModelError(f"lora.blocks: this {family.label(denoiser_config)} base has no block "
                         f"{', '.join(map(repr, unknown))}; its blocks are {', '.join(valid)} ({family.BLOCKS_HELP})")


def check_blocks_before_loading(model_path: str, cfg: LoraConfig) -> None:
    """The lora.blocks names against a local diffusers folder's denoiser config, before the (minutes-long) load; other
    sources (hub ids, single files) are checked when the adapter is attached."""
    from trainer import families
    from trainer.families.loading import resolve_source

    if cfg.blocks is None or not cfg.train_unet:
        return
    try:
        kind, where = resolve_source(model_path)
        config = families.denoiser_config(Path(where)) if kind == "folder" else None
        family = families.from_configs(config, {"text_encoder", "text_encoder_2"}) if config else None
    except (OSError, ValueError):  # ModelError included: the loader reports it right after
        return
    if family is not None:
        check_block_names(cfg, family, config)


def block_alpha(cfg: LoraConfig, rank: int) -> float:
    """The alpha of a module trained at a block's `rank` (see the module docstring)."""
    return cfg.alpha if cfg.rslora else cfg.alpha * rank / cfg.rank


def restrict_to_blocks(config, model: torch.nn.Module, cfg: LoraConfig, family):
    """The denoiser's peft `config` (LoRA, LoHa or LoKr; LoCon's convolutions included) cut to lora.blocks: its
    targets become the full paths of the modules in blocks with a rank, each at its block's rank and alpha (LoCon's
    3×3 convolutions keep lora.conv_rank / conv_alpha, as they do without blocks)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    check_block_names(cfg, family, model.config)
    ranks, alphas = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    kept = {}
    for name, _ in model.named_modules():
        if name and check_target_module_exists(config, name):
            rank = cfg.blocks.get(family.block_of(name) or "", 0)
            if rank:
                kept[name] = rank
    if not kept:
        chosen = ", ".join(name for name, rank in cfg.blocks.items() if rank)
        raise ModelError(f"lora.blocks: no target module lies in {chosen} (targets: {sorted(config.target_modules)}); "
                         "choose blocks that hold them, or other lora.unet_targets")
    setting = {name: (ranks.get(name, rank), alphas.get(name, block_alpha(cfg, rank))) for name, rank in kept.items()}
    # the most common (rank, alpha) becomes the config's own: only the others need a pattern, and peft tries every
    # pattern on every module (seconds for hundreds of patterns on a full-size UNet)
    rank, alpha = Counter(setting.values()).most_common(1)[0][0]
    config.r = rank
    setattr(config, "lora_alpha" if hasattr(config, "lora_alpha") else "alpha", alpha)  # LoRA's or LyCORIS' name
    config.target_modules = sorted(kept)
    config.rank_pattern = {name: r for name, (r, _) in setting.items() if r != rank}
    config.alpha_pattern = {name: a for name, (_, a) in setting.items() if a != alpha}
    return config
