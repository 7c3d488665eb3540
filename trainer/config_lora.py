"""trainer.config.LoraConfig's checks across fields, apart so that config.py stays short; LoraConfig calls check_lora.

Which block names a base has needs its denoiser's config: trainer.adapters.blocks checks them when the adapter is
attached (after the base loads, before training). Here only what needs no base.
"""

from __future__ import annotations

import re

BLOCK_NAME = re.compile(r"[a-z]+(\.\d+)?")  # down.1, mid, up.2, block.3: the families' spellings (block_names)
# variants that cannot give each block its own rank: VeRA shares one random projection of rank vera_rank across
# layers, AdaLoRA moves its own rank budget between layers
SHARED_RANK = ("vera", "adalora")


def check_lora(lc) -> None:
    """Raise ValueError for settings of a LoraConfig (`lc`) that cannot work together."""
    if not (lc.train_unet or lc.train_text_encoder):
        raise ValueError("nothing to train: set train_unet or train_text_encoder to true")
    if lc.variant == "deltalora" and lc.dropout:
        raise ValueError("deltalora needs dropout = 0 (the frozen-weight update assumes the LoRA path has no dropout)")
    if lc.variant == "adalora" and lc.adalora_init_rank < lc.rank:
        raise ValueError(f"adalora_init_rank ({lc.adalora_init_rank}) must be >= rank ({lc.rank}), the final budget")
    if lc.conv_rank and lc.variant not in ("lora", "dora", "loraplus", "loha", "lokr"):
        raise ValueError(f"conv_rank (LoCon) works with variants lora, dora, loraplus, loha and lokr, "
                         f"not {lc.variant}")
    if lc.conv_rank and not lc.train_unet:
        raise ValueError("conv_rank (LoCon) adds UNet layers: it needs train_unet = true")
    if lc.rslora and lc.variant in ("loha", "lokr"):
        raise ValueError(f"rslora is a LoRA scaling; {lc.variant} scales by alpha/rank")
    if lc.variant == "adalora" and lc.adalora_tinit + lc.adalora_tfinal >= 1:
        raise ValueError("adalora_tinit + adalora_tfinal must leave some steps for re-allocation (sum < 1)")
    check_blocks(lc)


def check_blocks(lc) -> None:
    """lora.blocks: block-name spelling, something selected, a variant that takes per-block ranks, the denoiser on."""
    if lc.blocks is None:
        return
    bad = [name for name in lc.blocks if not BLOCK_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"lora.blocks: {bad[0]!r} is not a block name (down.N, mid, up.N in a UNet; block.N in a "
                         "transformer)")
    if not any(lc.blocks.values()):
        raise ValueError("lora.blocks selects nothing: give at least one block a rank > 0 (0 = not trained), or "
                         "leave lora.blocks unset to train every block")
    if lc.variant in SHARED_RANK:
        raise ValueError(f"lora.blocks gives each block its own rank, which lora.variant = {lc.variant} cannot take "
                         "(VeRA shares one rank across layers, AdaLoRA moves its rank budget itself)")
    if not lc.train_unet:
        raise ValueError("lora.blocks chooses denoiser blocks: it needs train_unet = true")
