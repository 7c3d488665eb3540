"""Attach the adapter to a loaded base: freeze it, add the variant's peft layers to the UNet and text encoders.

`attach_lora` is what the trainer calls; `attach_error` turns a peft refusal into one line for the user.
"""

from __future__ import annotations

import torch

from trainer.config import LoraConfig
from trainer.families.loading import Base, ModelError


def attach_lora(base: Base, cfg: LoraConfig, total_steps: int = 1000) -> dict[str, object]:
    """Freeze the base and add the trainable adapter 'default' (of cfg.variant) to the UNet and/or text encoder.

    Returns the peft tuners of variants that need per-step calls (AdaLoRA), keyed by part ("unet" or "transformer",
    "text_encoder"(_2)).
    """
    from trainer.adapters.variants import add_adapter, peft_config

    for module in (base.unet, base.vae, *base.text_encoders().values(), *base.frozen_text_encoders()):
        module.requires_grad_(False)
    tuners = {}
    denoiser = base.family.DENOISER
    parts = [(denoiser, base.unet, cfg.train_unet, denoiser_targets(cfg, base.family))]
    for name, text_encoder in base.text_encoders().items():  # SDXL, SD3: both CLIPs, same targets
        parts.append((name, text_encoder, cfg.train_text_encoder, cfg.text_encoder_targets))
    for name, module, wanted, targets in parts:
        if not wanted:
            continue
        config = peft_config(cfg, targets, total_steps)
        if name == denoiser and cfg.conv_rank:
            from trainer.adapters.lycoris import add_locon

            config = add_locon(config, module, cfg)
        if name == denoiser and cfg.blocks is not None:
            from trainer.adapters.blocks import restrict_to_blocks

            config = restrict_to_blocks(config, module, cfg, base.family)
        try:
            tuner = add_adapter(module, config)
        except ValueError as err:
            raise ModelError(attach_error(name, targets, err)) from None
        check_file_names(base, name, module, cfg.variant)
        if tuner is not None:
            tuners[name] = tuner
    return tuners


def check_file_names(base: Base, part: str, model: torch.nn.Module, variant: str) -> None:
    """Refuse, before training, a module the run's kohya file could not hold: one without a kohya name in the base's
    family (e.g. SD3's last adaLN, stored with its halves swapped), or a LoHa/LoKr factor on one part of a weight
    that kohya files fuse (SD3's q/k/v are one qkv Linear there, and a Kronecker or Hadamard factor does not split)."""
    from trainer.adapters.variants import lora_layers

    family = base.family
    fused: dict[str, tuple[set[int], int, str]] = {}  # kohya key -> (slots adapted, slot count, a module)
    for name in lora_layers(model):
        name = name.removeprefix("base_model.model.")
        try:
            key = family.kohya_name(part, name, base.unet.config)
        except ValueError as err:
            raise ModelError(f"lora: {err}; the kohya/A1111 file could not hold it, so leave it out of the targets") from None
        slot = family.kohya_slot(part, name)
        if slot is None:
            continue
        if variant in ("loha", "lokr"):
            raise ModelError(f"lora.variant = {variant}: {part}.{name} is one part of a weight that {family.LABEL} kohya "
                             "files fuse (q, k and v are one qkv Linear there), which a LoHa/LoKr factor cannot be "
                             "split over; use variant lora or dora, or targets without q/k/v (e.g. lora.unet_targets = "
                             '["attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2"])')
        fused.setdefault(key, (set(), slot[1], name))[0].add(slot[0])
    for slots, count, name in fused.values():
        if variant == "dora" and len(slots) < count:  # the untrained parts' DoRA magnitudes would be missing
            raise ModelError(f"lora.variant = dora: {part}.{name} is one part of a weight that {family.LABEL} kohya "
                             "files fuse (q, k and v are one qkv Linear there); DoRA on it needs all of q, k and v in "
                             "the targets (e.g. attn.to_q, attn.to_k and attn.to_v), or none of them")


def denoiser_targets(cfg: LoraConfig, family) -> list[str]:
    """lora.unet_targets, or the family's default (the attention) when unset."""
    return list(cfg.unet_targets) if cfg.unet_targets is not None else list(family.DEFAULT_TARGETS)


def attach_error(part: str, targets: list[str], err: Exception) -> str:
    """What to tell the user when peft (or transformers under it) refuses to attach LoRA to `part`."""
    part = part.replace("_", " ")
    if "not found in the base model" in str(err) or "did not match" in str(err):  # peft: a real target mismatch
        return f"lora: the {part} has no module matching {targets}: {err}"
    from trainer.versions import incompatible_versions

    # anything else is the library's own reason (e.g. a peft too old for this transformers): pass it on as it is
    return f"lora: peft could not attach LoRA to the {part}: {err}" + (f" ({incompatible_versions()})"
                                                                       if incompatible_versions() else "")


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
