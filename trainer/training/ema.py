"""EMA of the adapter weights (train.ema), on diffusers' EMAModel.

The shadow (averaged) weights are updated after every optimizer step. Adapter files, samples and validation use
them (swapped in place for the call, then the raw weights come back); the raw weights keep training and are what
checkpoints/.../lora.safetensors holds, with the shadow weights and EMA step beside them in extra.safetensors, so a
resumed run continues both exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from trainer.config import TrainConfig
from trainer.training.checkpoint import one_number

PREFIX = "ema."
STEP_KEY = "ema_state.optimization_step"


def _trained_params(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}.{name}": p for prefix, module in modules.items() for name, p in module.named_parameters()
            if p.requires_grad}


class AdapterEMA:
    """diffusers' EMAModel over the trainable adapter parameters, which it names for the checkpoint."""

    def __init__(self, tc: TrainConfig, modules: dict[str, torch.nn.Module]):
        from diffusers.training_utils import EMAModel

        self.params = _trained_params(modules)
        # use_ema_warmup: decay = 1 − (1 + step)^(−2/3), capped at ema_decay (an early average is not dominated by
        # the random start); without it diffusers ramps as (1 + step)/(10 + step).
        self.model = EMAModel(list(self.params.values()), decay=tc.ema_decay, use_ema_warmup=tc.ema_warmup)

    def step(self) -> None:
        self.model.step(list(self.params.values()))

    @contextmanager
    def applied(self):
        """The EMA weights in the live modules for the duration of the block."""
        params = list(self.params.values())
        self.model.store(params)
        self.model.copy_to(params)
        try:
            yield
        finally:
            self.model.restore(params)

    def state(self) -> dict[str, torch.Tensor]:
        out = {PREFIX + name: s.detach() for name, s in zip(self.params, self.model.shadow_params)}
        out[STEP_KEY] = torch.tensor(self.model.optimization_step, dtype=torch.int64)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.params if PREFIX + name not in tensors]
        if missing or STEP_KEY not in tensors:
            raise ValueError(f"train.ema: the checkpoint holds no EMA weights for {missing[:2] or 'its step'} "
                             "(it was written with train.ema = false)")
        with torch.no_grad():
            for name, shadow in zip(self.params, self.model.shadow_params):
                if tensors[PREFIX + name].shape != shadow.shape:
                    raise ValueError(f"train.ema: {PREFIX + name} has shape {list(tensors[PREFIX + name].shape)}, "
                                     f"this run's {list(shadow.shape)}")
                shadow.copy_(tensors[PREFIX + name].to(shadow))
        self.model.optimization_step = int(one_number(tensors, STEP_KEY))


def make_ema(tc: TrainConfig, modules: dict[str, torch.nn.Module]) -> AdapterEMA | None:
    return AdapterEMA(tc, modules) if tc.ema else None


def ema_state(ema: AdapterEMA | None) -> dict[str, torch.Tensor]:
    return ema.state() if ema else {}


def load_ema_state(ema: AdapterEMA | None, tensors: dict[str, torch.Tensor]) -> None:
    if ema:
        ema.load_state(tensors)


def update_ema(ema: AdapterEMA | None) -> None:
    if ema:
        ema.step()


@contextmanager
def ema_weights(ema: AdapterEMA | None):
    """Use the EMA weights inside the block (nothing changes without EMA)."""
    if ema is None:
        yield
    else:
        with ema.applied():
            yield
