"""One module's change of the base weight (Delta) and a LoRA file read into them (LoraFile): the types the toolbox
passes around (trainer.lora_tools.deltas reads files into them).

A Delta is ΔW = scale·up·down (a LoRA, kept low-rank) or the full ΔW (LoHa, LoKr, DoRA's effective change): what a
consumer adds to the base weight at strength 1. Keys are "part.module": the part as diffusers files name it (unet,
transformer, text_encoder, text_encoder_2) and the module path as the base's model names it (text encoders without
`text_model.`), e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Delta:
    """ΔW of one module: scale·up·down when `full` is None, else `full`. `shape` is the base weight's."""

    shape: tuple[int, ...]
    down: torch.Tensor | None = None  # [r, in(, kh, kw)]
    up: torch.Tensor | None = None  # [out, r(, 1, 1)]
    scale: float = 1.0
    full: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        """The LoRA rank; None for a full ΔW."""
        return None if self.down is None else self.down.shape[0]

    def weight(self) -> torch.Tensor:
        """ΔW in float32, shaped like the base weight."""
        if self.full is not None:
            return self.full.float().reshape(self.shape)
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(self.shape) * self.scale

    def scaled(self, weight: float) -> Delta:
        """This change at strength `weight` (the low-rank form kept)."""
        if self.full is not None:
            return Delta(self.shape, full=self.full * weight)
        return Delta(self.shape, self.down, self.up, self.scale * weight)


@dataclass
class LoraFile:
    """A LoRA file read into Deltas, with what `lora info` tells about it."""

    path: Path
    layout: str  # "kohya" | "diffusers" | "lycoris" | "peft" ... (trainer.lora_tools.layouts)
    trainer: str  # who wrote it, as far as the keys and metadata tell ("this app", "kohya sd-scripts", ...)
    family: str  # the base family's NAME
    variant: str  # "lora" | "dora" | "loha" | "lokr" | "locon" ...
    deltas: dict[str, Delta]
    header: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, tuple[int | None, float | None]] = field(default_factory=dict)  # "part.module": (rank, alpha)
    needs_base: list[str] = field(default_factory=list)  # DoRA modules read without the base: ΔW not resolved

    def require_base(self) -> None:
        """Refuse to use ΔW that needs the base model's weights (DoRA) when the file was read without them."""
        if self.needs_base:
            raise ValueError(f"{self.path}: a DoRA LoRA ({self.needs_base[0]} ...); its change depends on the base "
                             "model's weights: pass --model")
