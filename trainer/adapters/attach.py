"""Attach the adapter to a loaded base: freeze it, add the variant's peft layers to the UNet and text encoders.

`attach_lora` is what the trainer calls; `attach_error` turns a peft refusal into one line for the user.
"""

from __future__ import annotations

import torch

from trainer.config import LoraConfig
from trainer.families.loading import Base, ModelError


def attach_lora(base: Base, cfg: LoraConfig, total_steps: int = 1000) -> dict[str, object]:
    """Freeze the base and add the trainable adapter 'default' (of cfg.variant) to the UNet and/or text encoder.

    Returns the peft tuners of variants that need per-step calls (AdaLoRA), keyed "unet"/"text_encoder"(_2).
    """
    from trainer.adapters.variants import add_adapter, peft_config

    for module in (base.unet, base.vae, *base.text_encoders().values()):
        module.requires_grad_(False)
    tuners = {}
    parts = [("unet", base.unet, cfg.train_unet, cfg.unet_targets)]
    for name, text_encoder in base.text_encoders().items():  # SDXL: both encoders, same targets
        parts.append((name, text_encoder, cfg.train_text_encoder, cfg.text_encoder_targets))
    for name, module, wanted, targets in parts:
        if not wanted:
            continue
        config = peft_config(cfg, targets, total_steps)
        if name == "unet" and cfg.conv_rank:
            from trainer.adapters.lycoris import add_locon

            config = add_locon(config, module, cfg)
        try:
            tuner = add_adapter(module, config)
        except ValueError as err:
            raise ModelError(attach_error(name, targets, err)) from None
        if tuner is not None:
            tuners[name] = tuner
    return tuners


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
