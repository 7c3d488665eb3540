"""Header metadata of kohya LoRA files: the ss_* / modelspec.* entries A1111/Forge and ComfyUI read, and the
tensor hashes kohya computes (sshs_model_hash, sshs_legacy_hash)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import re

import torch

from trainer import families

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def kohya_metadata(
    base: dict[str, str], *, rank: int, alpha: float, trigger: str, tag_frequency: dict, base_kind: str,
    cover_png: bytes | None, rslora: bool = False,
) -> dict[str, str]:
    """kohya ss_* and SAI modelspec.* header entries on top of `base` (e.g. export.training_metadata). All strings."""
    family = families.get(base_kind)
    meta = {k: str(v) for k, v in base.items()}
    v_prediction = meta.get("ss_v_parameterization") == "True"
    default = str(family.default_resolution(v_prediction))
    resolution = re.findall(r"\d+", meta.get("ss_resolution", "")) or [default, default]
    started = float(meta.get("ss_training_started_at", 0) or 0) or datetime.datetime.now().timestamp()
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        # ss_network_alpha uses kohya's alpha/r convention; rsLoRA's alpha/sqrt(r) is the same scale at alpha·sqrt(r).
        "ss_network_alpha": str(alpha * math.sqrt(rank) if rslora else alpha),
        "ss_base_model_version": meta.get("ss_base_model_version") or family.kohya_version(),
        "ss_v2": str(family.V2),
        "ss_v_parameterization": str(v_prediction),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        # modelspec values as kohya's library/sai_model_spec.py writes them for a LoRA.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": meta.get("modelspec.architecture") or family.modelspec_architecture(v_prediction),
        "modelspec.implementation": "diffusers",
        "modelspec.title": meta.get("modelspec.title") or meta.get("ss_output_name") or "LoRA",
        "modelspec.resolution": f"{resolution[0]}x{resolution[-1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
        meta["ssmd_keywords"] = trigger  # the additional-networks metadata editor's trigger words
    if cover_png is not None:
        if not cover_png.startswith(PNG_SIGNATURE):
            raise ValueError("cover image must be PNG bytes")
        # A JSON list of base64 images: what sd-webui-additional-networks writes and A1111/ComfyUI read as a preview.
        meta["ssmd_cover_images"] = json.dumps([base64.b64encode(cover_png).decode("ascii")])
        meta["modelspec.thumbnail"] = thumbnail_uri(small_png(cover_png))
    return meta


def small_png(png: bytes, side: int = 256) -> bytes:
    """An image (any format Pillow reads) as PNG bytes at most `side` px on its longer side: a thumbnail."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail_uri(png: bytes) -> str:
    """ModelSpec's thumbnail (sai_model_spec: a data URI): the PNG as base64."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya train_util.precalculate_safetensors_hashes: sha256 of the tensor payload (bytes after the header) and
    the legacy hash (first 8 hex of sha256 of 64 KiB at 1 MiB), over a serialisation with only ss_* metadata."""
    from safetensors.torch import save

    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash
