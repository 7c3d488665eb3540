"""`lora meta`: edit a LoRA file's ModelSpec and ss_* metadata (title, author, description, trigger phrase, tags,
license, thumbnail) without touching its tensors.

The file is rewritten as its header (tensor entries unchanged, new `__metadata__`) followed by the very same data
bytes, so every tensor stays byte-identical. kohya's hashes (sshs_model_hash, sshs_legacy_hash, and the
modelspec.hash_sha256 this app writes beside them) are recomputed for the new file, as kohya computes them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

SHORT = {"title": ("modelspec.title",), "author": ("modelspec.author",), "description": ("modelspec.description",),
         "trigger": ("modelspec.trigger_phrase", "ssmd_keywords"), "tags": ("modelspec.tags",),
         "license": ("modelspec.license",)}
EDITABLE_PREFIXES = ("modelspec.", "ss_", "ssmd_")
THUMBNAIL_SIDE = 256  # ModelSpec suggests a small preview image


def read_raw(path: Path) -> tuple[dict, bytes]:
    """(the safetensors header as JSON, the data bytes after it) of `path`; ValueError naming a broken file."""
    data = path.read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError("header too small or cut off")
        header = json.loads(data[8:8 + size])
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable .safetensors file ({err})") from None
    return header, data[8 + size:]


def thumbnail_png(image_path: Path) -> bytes:
    """An image file as PNG bytes at most THUMBNAIL_SIDE px on its longer side."""
    from PIL import Image, UnidentifiedImageError

    from trainer.lora_files.kohya_meta import small_png

    try:
        return small_png(Path(image_path).read_bytes(), THUMBNAIL_SIDE)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"{image_path}: not a readable image ({err})") from None


def apply_sets(metadata: dict[str, str], sets: dict[str, str], where: Path) -> dict[str, str | None]:
    """Apply KEY=VALUE edits to `metadata` (an empty value removes the key); returns {key: new value or None}."""
    changed: dict[str, str | None] = {}
    for name, value in sets.items():
        keys = SHORT.get(name, (name,))
        if name not in SHORT and not name.startswith(EDITABLE_PREFIXES):
            raise ValueError(f"{where}: cannot set {name!r}: use one of {', '.join(SHORT)}, or a modelspec.*, ss_* "
                             "or ssmd_* key")
        if name == "tags":  # ModelSpec: comma-separated
            value = ", ".join(t.strip() for t in value.split(",") if t.strip())
        for key in keys:
            if value:
                metadata[key] = value
            else:
                metadata.pop(key, None)
            changed[key] = value or None
    return changed


def edit_metadata(path: Path, sets: dict[str, str], *, thumbnail: str | None = None, out: Path | None = None,
                  overwrite: bool = False) -> dict:
    """Write `path` with edited metadata to `out` (None with overwrite: in place); the tensors stay byte-identical."""
    from safetensors.torch import load

    from trainer.io import atomic_path
    from trainer.lora_files.kohya_meta import addnet_hashes, thumbnail_uri
    from trainer.lora_tools.write import check_output

    path = Path(path)
    if out is None and not overwrite:
        raise ValueError(f"{path}: give --out NEW.safetensors, or --overwrite to edit the file in place")
    target = Path(out) if out is not None else path
    check_output(target, overwrite)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    header, data = read_raw(path)
    metadata = dict(header.pop("__metadata__", {}) or {})
    changed = apply_sets(metadata, sets, path)
    if thumbnail:
        png = thumbnail_png(Path(thumbnail))
        metadata["modelspec.thumbnail"] = thumbnail_uri(png)
        metadata["ssmd_cover_images"] = json.dumps([base64.b64encode(png).decode("ascii")])
        changed["modelspec.thumbnail"] = f"{len(png)} bytes of PNG"
    if "sshs_model_hash" in metadata:  # the hashes of the NEW file, as kohya computes them
        model_hash, legacy_hash = addnet_hashes(load(_serialise(header, data, {})), metadata)
        metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
        metadata["modelspec.hash_sha256"] = f"0x{model_hash}"
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(_serialise(header, data, metadata))
    summary = [f"{target}: metadata edited, tensors unchanged"]
    summary += [f"  {k} = {v if v is None or len(v) < 120 else v[:120] + '...'}" for k, v in changed.items()]
    return {"out": str(target), "changed": changed, "summary": "\n".join(summary)}


def _serialise(tensors: dict, data: bytes, metadata: dict[str, str]) -> bytes:
    """A safetensors file from its tensor entries (offsets into `data`), metadata and data bytes; the header is
    padded with spaces to a multiple of 8 bytes, as safetensors writes it."""
    header = dict(tensors)
    if metadata:
        header = {"__metadata__": {k: str(v) for k, v in metadata.items()}, **header}
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data

