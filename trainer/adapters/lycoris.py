"""LyCORIS on peft's LoHa/LoKr tuners, LoCon (LoRA on the UNet's resnet convolutions), and their files.

peft's layers compute (as LyCORIS does; scale s = alpha/r):
- LoHa: ΔW = s·(w1_a·w1_b) ∘ (w2_a·w2_b), w*_a [out, r], w*_b [r, in·kh·kw], reshaped to W's shape;
- LoKr: ΔW = s·kron(w1, w2), each factor full or w*_a·w*_b, reshaped to W's shape (conv: w1 broadcast over the kernel).

kohya/LyCORIS layout, as A1111's built-in Lora extension (network_hada.py, network_lokr.py) and ComfyUI
(comfy/weight_adapter/loha.py, lokr.py) read it, keyed `<lora_unet_…|lora_te_…>.<name>`:
- LoHa: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` in peft's shapes and `alpha`; both apply alpha/r with
  r = hada_w1_b.shape[0], per module: peft's own alpha is exact.
- LoKr: both apply alpha/r only when a factor is stored decomposed (r = its _b rank) and 1.0 when both are full;
  A1111 1.10 also fails on a decomposed factor (`if self.w1b:` on a tensor). So each file factor is stored full
  (`lokr_w1`, `lokr_w2`: small, about √in × √out), peft's scale folded into `lokr_w1`, and `alpha` = r as LyCORIS
  writes it for full factors (read by no one): every reader applies exactly s·kron(w1, w2).

diffusers loads neither: the `.diffusers.safetensors` file is the ΔW as a plain LoRA. Both products have closed
low-rank forms, with no SVD: (A₁B₁)∘(A₂B₂) = (A₁ ⊙ A₂)(B₁ ⊙ B₂) (row-wise / column-wise Khatri–Rao, rank r²) and
kron(U₁V₁, U₂V₂) = kron(U₁, U₂)·kron(V₁, V₂) (a decomposed factor a·b gives its rank r). Where those factors would
be larger than the weight they change, trainer.adapters.compact takes the exact SVD from the structure and keeps the
rank an error target asks for, under that size cap. The file's rank per module is in its peft rank_pattern. A LoKr
whose plain LoRA misses the target is written in peft's own LoKr layout instead (trainer.lora_files.export), which
diffusers' load_lora_adapter reads exactly.
"""

from __future__ import annotations


import torch

from trainer.config import LoraConfig

ADAPTER = "default"
LYCORIS = ("loha", "lokr")
LOCON_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")


# ----------------------------------------------------------------------------- attaching


def lycoris_config(cfg: LoraConfig, targets: list[str]):
    """peft's LoHa/LoKr config. lora.dropout becomes peft's rank dropout (its LyCORIS layers have no input dropout)."""
    from peft import LoHaConfig, LoKrConfig

    common = dict(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=list(targets),
                  init_weights=True)  # ΔW = 0 at the start, as LoRA's zero B
    if cfg.variant == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(**common, decompose_factor=cfg.lokr_factor)


def locon_modules(unet: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(3×3 convolutions, other Linear/Conv2d layers) inside the UNet's resnets and down/upsamplers: what kohya's
    conv_dim adds. kohya gives the 3×3 ones conv_dim/conv_alpha and the rest (1×1 shortcuts, time_emb_proj) the
    network's own rank and alpha; so does this."""
    convs, others = [], []
    for name, module in unet.named_modules():
        if not any(block in f".{name}." for block in LOCON_BLOCKS) or ".base_layer" in name:
            continue
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
            convs.append(name)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            others.append(name)
    return convs, others


def add_locon(config, unet: torch.nn.Module, cfg: LoraConfig):
    """LoCon: extend a peft config (LoRA, LoHa or LoKr) with the UNet's resnet layers, the 3×3 convolutions at
    lora.conv_rank / lora.conv_alpha (peft rank_pattern / alpha_pattern with their full names)."""
    convs, others = locon_modules(unet)
    config.target_modules = sorted(set(config.target_modules or []) | set(convs) | set(others))
    config.rank_pattern = {**(config.rank_pattern or {}), **{name: cfg.conv_rank for name in convs}}
    config.alpha_pattern = {**(config.alpha_pattern or {}), **{name: cfg.conv_alpha for name in convs}}
    return config


def is_lycoris(layer) -> bool:
    from peft.tuners.lycoris_utils import LycorisLayer

    return isinstance(layer, LycorisLayer)


# ----------------------------------------------------------------------------- the factors of a layer


def layer_tensor(layer, name: str) -> torch.Tensor | None:
    params = getattr(layer, name, {})
    return params[ADAPTER].detach().double() if ADAPTER in params else None


def lycoris_kind(layer) -> str:
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer

    if (layer_tensor(layer, "hada_t1") if isinstance(layer, LoHaLayer) else layer_tensor(layer, "lokr_t2")) is not None:
        raise ValueError(f"{type(layer).__name__}: Tucker-decomposed (use_effective_conv2d) factors are not exported")
    if isinstance(layer, LoHaLayer):
        return "loha"
    if isinstance(layer, LoKrLayer):
        return "lokr"
    raise ValueError(f"{type(layer).__name__}: not a LoHa or LoKr layer")


def lokr_full_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 [a, c], w2 [b, d(, kh, kw)]) of a peft LoKr layer, products taken (float64, unscaled)."""
    w1 = layer_tensor(layer, "lokr_w1")
    if w1 is None:
        w1 = layer_tensor(layer, "lokr_w1_a") @ layer_tensor(layer, "lokr_w1_b")
    w2 = layer_tensor(layer, "lokr_w2")
    if w2 is None:
        w2 = layer_tensor(layer, "lokr_w2_a") @ layer_tensor(layer, "lokr_w2_b")
    weight = layer.get_base_layer().weight
    if weight.dim() == 4 and w2.dim() == 2:  # conv: [b, d·kh·kw] -> [b, d, kh, kw] (same kron, reshaped)
        w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:])
    return w1, w2


def _split(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix [m, n] = U·V with the smaller inner size: (matrix, I_n) or (I_m, matrix)."""
    m, n = matrix.shape
    eye = lambda k: torch.eye(k, dtype=matrix.dtype)  # noqa: E731
    return (matrix, eye(n)) if n <= m else (eye(m), matrix)


def lycoris_delta(layer) -> torch.Tensor:
    """peft's ΔW of the layer (float64, W's shape)."""
    return low_rank(layer)[0]


def low_rank(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ΔW, up [out, k], down [k, in·kh·kw]) with ΔW = up·down exactly (float64; closed form, see the module doc)."""
    scale = float(layer.scaling[ADAPTER])
    shape = layer.get_base_layer().weight.shape
    if lycoris_kind(layer) == "loha":
        a1, b1, a2, b2 = (layer_tensor(layer, n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1) * scale
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return ((a1 @ b1) * (a2 @ b2) * scale).reshape(shape), up, down
    w1, w2 = lokr_full_factors(layer)
    u1, v1 = _lokr_split(layer, "lokr_w1", w1)
    u2, v2 = _lokr_split(layer, "lokr_w2", w2.flatten(1))
    delta = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2) * scale
    return delta.reshape(shape), torch.kron(u1, u2) * scale, torch.kron(v1, v2)


def _lokr_split(layer, name: str, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr factor as U·V with the smaller inner size: its trained a·b when stored decomposed (rank r), else
    the factor against an identity."""
    a, b = layer_tensor(layer, f"{name}_a"), layer_tensor(layer, f"{name}_b")
    if a is not None and a.shape[1] < min(full.shape):
        return a, b.reshape(b.shape[0], -1)
    return _split(full)
