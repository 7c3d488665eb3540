"""Any trained adapter layer as plain-LoRA factors: ΔW = scale·up·down exactly (DoRA's magnitude kept beside), for
the files every consumer loads (trainer.lora_files) whatever the variant: LoRA, DoRA, VeRA, AdaLoRA, Delta-LoRA,
LoHa and LoKr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.adapters.lycoris import low_rank, is_lycoris
from trainer.adapters.variants import ADAPTER, DeltaLora, lora_layers


@dataclass
class Factors:
    """ΔW = scale · up @ down (conv: reshaped), plus DoRA's magnitude when present."""

    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    down: torch.Tensor  # [r, in] or [r, in, k, k]
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: the learned per-output-row norm of W0 + ΔW
    weight: torch.Tensor | None = None  # DoRA: the base weight W0 (ComfyUI's dora_scale and the plain export need it)
    kron: tuple[torch.Tensor, torch.Tensor] | None = None  # LoKr: (A, B) with ΔW.flatten(1) = kron(A, B) exactly
    lycoris: bool = False  # LoHa/LoKr closed form: exact, but can be larger than the weight (trainer.adapters.compact)


def _factors_of(layer, delta: DeltaLora | None, name: str) -> Factors:
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.vera.layer import VeraLayer

    if is_lycoris(layer):  # LoHa / LoKr: their exact ΔW in closed low-rank form (trainer/adapters/lycoris.py)
        return lycoris_factors(layer)
    if isinstance(layer, VeraLayer):  # ΔW = diag(b)·B·diag(d)·A
        a = layer.vera_A[ADAPTER][:, : layer.in_features].float()
        b = layer.vera_B[ADAPTER][: layer.out_features, :].float()
        d, bvec = layer.vera_lambda_d[ADAPTER].float(), layer.vera_lambda_b[ADAPTER].float()
        return Factors(up=bvec[:, None] * b, down=d[:, None] * a, scale=1.0)
    if isinstance(layer, AdaLoraLayer):  # ΔW = P·diag(λ)·Q · s/(ranknum + 1e-5); pruned ranks have λ = 0
        e = layer.lora_E[ADAPTER].float().flatten()
        keep = e.nonzero().flatten()
        if keep.numel() == 0:
            keep = torch.tensor([0])
        up = layer.lora_B[ADAPTER].float()[:, keep]
        down = (layer.lora_A[ADAPTER].float() * layer.lora_E[ADAPTER].float())[keep]
        scale = float(layer.scaling[ADAPTER]) / (float(layer.ranknum[ADAPTER]) + 1e-5)
        return Factors(up=up, down=down, scale=scale)
    up = layer.lora_B[ADAPTER].weight.detach().float()
    down = layer.lora_A[ADAPTER].weight.detach().float()
    scale = float(layer.scaling[ADAPTER])
    magnitude = weight = None
    if getattr(layer, "use_dora", {}).get(ADAPTER):
        magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach().float()
        weight = layer.get_base_layer().weight.detach()
    if delta is not None and delta.lam and name in delta.snapshot:
        # total ΔW = s·BA + λ·s·(BA − B_K·A_K): a rank-2r LoRA [(1+λ)B, −λB_K] @ [A; A_K] at scale s.
        a0, b0 = (t.float() for t in delta.snapshot[name])
        up = torch.cat([(1 + delta.lam) * up, -delta.lam * b0], dim=1)
        down = torch.cat([down, a0], dim=0)
    return Factors(up=up.detach(), down=down.detach(), scale=scale, magnitude=magnitude, weight=weight)


def lora_factors(modules: dict[str, torch.nn.Module], delta: DeltaLora | None = None) -> dict[str, Factors]:
    """{"unet.<module path>": Factors} for every adapted layer of every module, whatever the variant."""
    return {f"{prefix}.{name}": _factors_of(layer, delta, f"{prefix}.{name}")
            for prefix, module in modules.items() for name, layer in lora_layers(module).items()}


def delta_weight(f: Factors, weight_shape: torch.Size) -> torch.Tensor:
    """ΔW the factors stand for (without DoRA's re-normalisation)."""
    up, down = f.up.flatten(1), f.down.flatten(1)
    return (f.scale * up @ down).reshape(weight_shape)


def lycoris_factors(layer) -> Factors:
    """The layer's exact ΔW as plain-LoRA Factors (scale 1) in closed form (trainer/adapters/lycoris.py), and for
    LoKr the Kronecker factors whose SVD trainer.adapters.compact takes when these factors are too large."""
    from trainer.adapters.lycoris import lokr_full_factors, lycoris_kind

    delta, up, down = low_rank(layer)
    kron = None
    if lycoris_kind(layer) == "lokr":  # ΔW.flatten(1) = kron(s·w1, w2.flatten(1)), conv included
        w1, w2 = lokr_full_factors(layer)
        kron = (w1 * float(layer.scaling[ADAPTER]), w2.flatten(1))
    if delta.dim() == 4:
        up, down = up[:, :, None, None], down.reshape(-1, *delta.shape[1:])
    return Factors(up=up.float().contiguous(), down=down.float().contiguous(), scale=1.0, kron=kron, lycoris=True)
