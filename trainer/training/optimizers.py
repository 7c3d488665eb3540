"""The optimizers of `train.optimizer`, each from the library made for it.

- adamw: torch's AdamW (fused on CUDA); LoRA+ / LoRA-FA through peft's factories (trainer.adapters.variants.make_optimizer).
- adamw8bit: bitsandbytes' AdamW8bit (CUDA only: refused before anything loads, `check_optimizer_available`).
- prodigy: prodigyopt's Prodigy, learning-rate free (the lr multiplies its estimate: 1.0), decoupled weight decay
  and bias correction as the community style-LoRA recipes use it; warmup protected by safeguard_warmup.
- adafactor: transformers' Adafactor with relative_step / scale_parameter off and the fixed (scheduled) learning
  rate, as kohya's presets use it.
- lion: lion-pytorch's Lion (sign updates; use a 3-10x lower learning rate than AdamW).

Every one keeps its state as tensors plus plain numbers, so trainer.training.checkpoint saves it without pickle and a resumed
run continues bit-exactly (tests/test_optimizers.py).
"""

from __future__ import annotations

import torch

from trainer.config import LoraConfig, TrainConfig


def check_optimizer_available(tc: TrainConfig) -> None:
    """adamw8bit needs bitsandbytes' CUDA kernels: refuse up front, with what to do instead."""
    if tc.optimizer != "adamw8bit":
        return
    if not torch.cuda.is_available():
        raise ValueError("train.optimizer = adamw8bit needs a CUDA GPU (bitsandbytes 8-bit kernels); this machine has "
                         "none. Use adamw, adafactor, prodigy or lion here.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("train.optimizer = adamw8bit needs the bitsandbytes package: "
                         "pip install -e '.[cuda]' (or pip install bitsandbytes)") from None


def build_optimizer(tc: TrainConfig, lora: LoraConfig, parts: list[tuple[torch.nn.Module, float]], fused: bool):
    """One optimizer over the adapter parameters of every (module, learning rate) part."""
    from trainer.adapters.variants import make_optimizer

    adamw = dict(betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        return make_optimizer(lora, parts, adamw, fused=fused)
    # The parameter groups and their learning rates (LoRA+: B at ratio × lr, from peft's factory) are the AdamW
    # ones; only the update rule changes. (LoRA-FA's projected update is AdamW's own: the config refuses the mix.)
    groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g.get("weight_decay", tc.weight_decay)}
              for g in make_optimizer(lora, parts, adamw, fused=False).param_groups if g["params"]]
    if tc.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **adamw)
    if tc.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, betas=adamw["betas"], eps=tc.adam_eps, weight_decay=tc.weight_decay, decouple=True,
                       use_bias_correction=True, safeguard_warmup=tc.warmup_steps > 0, d_coef=tc.prodigy_d_coef)
    if tc.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=None, weight_decay=tc.weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if tc.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(groups, betas=(tc.adam_beta1, tc.lion_beta2), weight_decay=tc.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {tc.optimizer!r}")
