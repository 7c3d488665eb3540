"""LyCORIS files (LoHa/LoKr) in the kohya/LyCORIS layout that A1111/Forge and ComfyUI read (the layout and its
scales are described in trainer.adapters.lycoris, which trains them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.adapters.lycoris import ADAPTER, layer_tensor, lycoris_kind, lokr_full_factors
from trainer.config import LoraConfig

LYCORIS_KEY = "style_lora_lycoris"  # header entry: how the LyCORIS tensors are to be read


def lycoris_module_tensors(layer) -> dict[str, torch.Tensor]:
    """One module's tensors in the LyCORIS layout (see the module doc), fp32."""
    if lycoris_kind(layer) == "loha":
        out = {n: layer_tensor(layer, n).float().contiguous() for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        out["alpha"] = torch.tensor(float(layer.alpha[ADAPTER]), dtype=torch.float32)
        return out
    w1, w2 = lokr_full_factors(layer)
    return {"lokr_w1": (w1 * float(layer.scaling[ADAPTER])).float().contiguous(), "lokr_w2": w2.float().contiguous(),
            "alpha": torch.tensor(float(layer.r[ADAPTER]), dtype=torch.float32)}


def lycoris_state_dict(modules: dict[str, torch.nn.Module], kind: str | None = None) -> dict[str, torch.Tensor]:
    """The LyCORIS tensors of every adapted layer, keyed by the kohya names of the base's family."""
    from trainer.adapters.variants import lora_layers
    from trainer.lora_files.kohya_names import family_of, unet_config

    family, config = family_of(kind), unet_config(modules)
    tensors: dict[str, torch.Tensor] = {}
    for part, module in modules.items():
        if module is None or not getattr(module, "peft_config", None):
            continue
        for name, layer in lora_layers(module).items():
            name = name.removeprefix("base_model.model.")
            if family.kohya_slot(part, name) is not None:  # attach refuses these before training (adapters.attach)
                raise ValueError(f"{part}.{name}: a LoHa/LoKr factor cannot be written for one part of a fused weight")
            key = family.kohya_name(part, name, config)
            tensors.update({f"{key}.{suffix}": t for suffix, t in lycoris_module_tensors(layer).items()})
    return tensors


def save_lycoris_kohya(path: Path, modules: dict[str, torch.nn.Module], metadata: dict[str, str], cfg: LoraConfig,
                       kind: str | None = None) -> Path:
    """Write the LyCORIS-layout file atomically, with the network args LyCORIS records and kohya's hashes."""
    from safetensors.torch import save_file

    from trainer.io import atomic_path
    from trainer.lora_files.kohya_meta import addnet_hashes

    tensors = lycoris_state_dict(modules, kind)
    if not tensors:
        raise ValueError("no LyCORIS weights to save: neither the UNet nor the text encoder has an adapter")
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != "modelspec.hash_sha256"}
    args = {"algo": cfg.variant, "conv_dim": str(cfg.conv_rank), "conv_alpha": str(cfg.conv_alpha)}
    if cfg.variant == "lokr":
        args["factor"] = str(cfg.lokr_factor)
    metadata.update(ss_network_module="lycoris.kohya", ss_network_args=json.dumps(args))
    metadata[LYCORIS_KEY] = ("loha: peft's alpha per module (alpha/r, r = hada_w1_b rows)" if cfg.variant == "loha" else
                             "lokr: full lokr_w1/lokr_w2 with the trained scale folded into lokr_w1 (alpha unused)")
    model_hash, legacy_hash = addnet_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    metadata["modelspec.hash_sha256"] = f"0x{model_hash}"
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)
