"""`lora bake`: LoRAs merged into a base checkpoint, W' = W + Σ weight·ΔW per module (in float32, then the base's
dtype).

Into a folder: the base loaded, its weights changed, the pipeline saved by diffusers (save_pretrained).

Into a .safetensors file, from a single-file checkpoint (original LDM/SGM/Stability layout): the file rewritten with
its keys, dtypes and every tensor the LoRAs do not touch byte for byte. Where each loaded (diffusers) weight element
comes from in the file is not written down here: diffusers' own single-file conversion (the mapping function
from_single_file runs for the denoiser, and the CLIP conversion of create_diffusers_clip_model_from_ldm) is run on
*tags*, float64 stand-ins whose values name their source, so fused q/k/v, swapped halves, transposes and reshapes
are followed whatever the family. Two passes keep it light: first every file tensor is one zero-stride scalar tag
(-1 - its index), which tells which file tensors feed a changed weight; then only those carry per-element tags
(TAG_BASE + running element number). A changed weight whose elements do not all come from distinct file elements
(computed by the loader, or one element feeding two changed weights) is refused: bake into a folder instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.lora_files.kohya import find_module
from trainer.lora_tools.deltas import load_model

TAG_BASE = float(2**40)  # element tags start here: above any constant a conversion makes, exact in float64 to 2^53


def read_deltas(path: Path, base, deltas_of=None):
    """The LoRA file at `path` read against the loaded base (deltas_of: a stand-in reader for tests)."""
    if deltas_of is not None:
        return deltas_of(path)
    from trainer.lora_tools.deltas import read_lora

    return read_lora(path, model=base.parts(), base=None)


def summed_changes(checkpoint: str, files: list[tuple[Path, float]], base, deltas_of=None) -> dict:
    """{part.module: Σ weight·ΔW in float32} of all files, each checked against the base's family and shapes."""
    from trainer import families

    parts, total = base.parts(), {}
    for path, weight in files:
        lora = read_deltas(Path(path), base, deltas_of)
        if lora.family != base.kind:
            label = next((f.LABEL for f in families.FAMILIES if f.NAME == lora.family), lora.family)
            raise ValueError(f"{path}: a LoRA for {label} bases, but {checkpoint} is {base.family.LABEL}")
        for key, delta in lora.deltas.items():
            part, name = key.split(".", 1)
            module = find_module(parts[part], name)[1] if part in parts else None
            if module is None or not hasattr(module, "weight"):
                raise ValueError(f"{path}: {key} is not a module of the base {checkpoint}")
            if tuple(module.weight.shape) != tuple(delta.shape):
                raise ValueError(f"{path}: {key} changes a {tuple(delta.shape)} weight, the base's is "
                                 f"{tuple(module.weight.shape)}: the LoRA is for another model")
            change = delta.weight().float() * weight
            total[key] = total[key] + change if key in total else change
    return total


def check_out(checkpoint: str, kind: str, out: Path, overwrite: bool) -> bool:
    """True when `out` is a file to write; refuses what cannot be written, in one line."""
    to_file = out.suffix.lower() == ".safetensors"
    if to_file and kind != "file":
        raise ValueError(f"{checkpoint}: not a single-file checkpoint, so there is no original layout to write: bake "
                         "into a folder (--out without .safetensors) or pass the base's single-file checkpoint")
    if out.exists() and not overwrite and (to_file or out.is_file() or any(out.iterdir())):
        raise ValueError(f"{out}: exists; pass --overwrite to replace it, or choose another --out")
    if to_file and not out.parent.is_dir():
        raise ValueError(f"{out}: the folder {out.parent} does not exist")
    if to_file and out.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"{out}: is the base checkpoint itself; write the baked one beside it")
    return to_file


def bake_folder(base, changes: dict, out: Path) -> None:
    """Add each change to the loaded base's weights and save the pipeline as a diffusers folder."""
    parts = base.parts()
    with torch.no_grad():
        for key, change in changes.items():
            part, name = key.split(".", 1)
            weight = find_module(parts[part], name)[1].weight
            weight.copy_((weight.float() + change).to(weight.dtype))
    base.pipeline().save_pretrained(out, safe_serialization=True)


class _Captured(Exception):
    """Carries the converted state dict out of diffusers' CLIP loader before it loads anything."""

    def __init__(self, state: dict):
        super().__init__("captured")
        self.state = state


def clip_conversion(model, checkpoint: dict) -> dict:
    """What diffusers' create_diffusers_clip_model_from_ldm would load into `model`: its own dispatch (which CLIP of
    the file, by key names and position-embedding width) and conversion run, with the existing model standing in for
    the one it builds and the final load replaced by a capture, so nothing is built or loaded."""
    from types import SimpleNamespace

    from diffusers.loaders import single_file_utils as sfu

    def build(_config):
        return model

    build.config_class = SimpleNamespace(from_pretrained=lambda **_: model.config)

    def capture(_model, state, **_):
        raise _Captured(state)

    saved = sfu.load_model_dict_into_meta, sfu.is_accelerate_available
    sfu.load_model_dict_into_meta, sfu.is_accelerate_available = capture, lambda: True
    try:
        sfu.create_diffusers_clip_model_from_ldm(build, checkpoint, config="the loaded model")
    except _Captured as done:
        return done.state
    except ValueError:  # "does not seem to contain a valid CLIP model": this part is not in the file
        return {}
    finally:
        sfu.load_model_dict_into_meta, sfu.is_accelerate_available = saved
    return {}


def conversion(model, checkpoint: dict) -> dict:
    """The diffusers state dict from_single_file would load into `model` from `checkpoint` (tags here)."""
    from diffusers.loaders import single_file_model as sfm

    checkpoint = dict(checkpoint)  # the mapping functions pop keys
    if getattr(model, "config_class", None) is not None and model.__class__.__name__.startswith("CLIP"):
        return clip_conversion(model, checkpoint)
    mapping = sfm._get_single_file_loadable_mapping_class(type(model))
    if mapping is None:
        raise ValueError(f"{type(model).__name__}: diffusers has no single-file conversion for this part")
    if not sfm._should_convert_state_dict_to_diffusers(model.state_dict(), checkpoint):
        return checkpoint
    function = sfm.SINGLE_FILE_LOADABLE_CLASSES[mapping]["checkpoint_mapping_fn"]
    return function(config=dict(model.config), checkpoint=checkpoint)


def scalar_tags(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Every file tensor as one value, -1 - its index, expanded to its shape without memory."""
    return {key: torch.tensor(-1.0 - i, dtype=torch.float64).expand(shape) for i, (key, shape) in
            enumerate(shapes.items())}


def sources(checkpoint: str, key: str, tagged: torch.Tensor, names: list[str]) -> set[str]:
    """The file tensors whose scalar tags make up `tagged` (a converted weight); refuses a computed one."""
    values = torch.unique(tagged)
    index = (-values - 1).round().long()
    if bool(((-values - 1) != index.double()).any()) or bool((index < 0).any()) or bool((index >= len(names)).any()):
        raise ValueError(f"{checkpoint}: {key} is computed by the loader, not read from the file: it cannot be baked "
                         "into the file; bake into a folder instead")
    return {names[i] for i in index.tolist()}


def element_tags(shapes: dict[str, tuple], needed: list[str]) -> tuple[dict, list[int]]:
    """Scalar tags, with per-element tags (TAG_BASE + running number) on the `needed` tensors; their offsets."""
    tags, offsets, start = scalar_tags(shapes), [], 0
    for key in needed:
        count = int(torch.tensor(shapes[key]).prod()) if shapes[key] else 1
        tags[key] = (TAG_BASE + start + torch.arange(count, dtype=torch.float64)).reshape(shapes[key])
        offsets.append(start)
        start += count
    return tags, offsets


def changed_weights(base, changes: dict) -> dict[str, dict[str, str]]:
    """{part: {change key: the weight's state-dict key}}."""
    parts, by_part = base.parts(), {}
    for key in changes:
        part, name = key.split(".", 1)
        by_part.setdefault(part, {})[key] = find_module(parts[part], name)[0] + ".weight"
    return by_part


def file_positions(checkpoint: str, base, changes: dict, shapes: dict) -> dict:
    """{needed: the file tensors the changed weights read, offsets: where each starts in their concatenation,
    positions: {change key: each weight element's position there}}, by two tag passes over diffusers' conversion."""
    parts, names = base.parts(), list(shapes)
    by_part = changed_weights(base, changes)
    first = {}
    for part, keys in by_part.items():
        converted = conversion(parts[part], scalar_tags(shapes))
        for key, state_key in keys.items():
            if state_key not in converted:
                raise ValueError(f"{checkpoint}: {key} is not read from the file (the loader takes it from "
                                 "elsewhere): bake into a folder instead")
            first[key] = sources(checkpoint, key, converted[state_key], names)
    needed = sorted(set().union(*first.values()), key=names.index) if first else []
    tags, offsets = element_tags(shapes, needed)
    seen, out = torch.zeros(0, dtype=torch.long), {}
    for part, keys in by_part.items():
        converted = conversion(parts[part], tags)
        for key, state_key in keys.items():
            positions = converted[state_key].flatten() - TAG_BASE
            whole = positions.round()
            if bool((positions != whole).any()) or bool((whole < 0).any()):
                raise ValueError(f"{checkpoint}: {key} is computed from the file's values, not copied: bake into a "
                                 "folder instead")
            whole = whole.long()
            seen = torch.cat([seen, whole])
            out[key] = whole
    if seen.unique().numel() != seen.numel():
        raise ValueError(f"{checkpoint}: one value of the file feeds several changed weights: bake into a folder")
    return {"needed": needed, "offsets": offsets, "positions": out}


def bake_file(checkpoint: str, base, changes: dict, out: Path) -> int:
    """Write the single file `checkpoint` to `out` with the changes added where each weight is stored; returns the
    number of file tensors changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from trainer.io import atomic_path

    with safe_open(checkpoint, framework="pt") as f:
        metadata = f.metadata()
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        found = file_positions(checkpoint, base, changes, shapes)
        needed, offsets = found["needed"], found["offsets"]
        flat = torch.cat([f.get_tensor(k).float().flatten() for k in needed]) if needed else torch.zeros(0)
        parts = base.parts()
        for key, positions in found["positions"].items():
            part, name = key.split(".", 1)
            loaded = find_module(parts[part], name)[1].weight.detach().float().flatten()
            if not torch.equal(flat[positions], loaded):  # the mapping must reproduce what the loader loaded
                raise ValueError(f"{checkpoint}: {key}: the file's values do not match the loaded weight; cannot "
                                 "place the change in the file, bake into a folder instead")
            flat[positions] += changes[key].flatten()
        tensors = {key: f.get_tensor(key) for key in shapes}
    ends = [*offsets[1:], flat.numel()]
    for key, start, end in zip(needed, offsets, ends):
        tensors[key] = flat[start:end].reshape(shapes[key]).to(tensors[key].dtype).contiguous()
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return len(needed)


def bake(checkpoint: str, files: list[tuple[Path, float]], out: Path, *, overwrite: bool = False, deltas_of=None,
         single_file_config: str | None = None) -> dict:
    """Merge the weighted LoRA `files` into `checkpoint`; `out` a folder (diffusers pipeline) or, for a single-file
    base, a .safetensors in the base's own layout. Returns {out, family, modules, files, summary}."""
    from trainer.families.loading import resolve_source

    out = Path(out)
    if not files:
        raise ValueError(f"{checkpoint}: no LoRA files to bake")
    kind, where = resolve_source(checkpoint)
    to_file = check_out(checkpoint, kind, out, overwrite)
    base = load_model(checkpoint, single_file_config)
    changes = summed_changes(checkpoint, files, base, deltas_of)
    if not changes:
        raise ValueError(f"{files[0][0]}: no module changes to bake")
    if to_file:
        touched = bake_file(where, base, changes, out)
        how = f"{touched} tensors of the file changed, every other one kept byte for byte"
    else:
        bake_folder(base, changes, out)
        how = "saved as a diffusers pipeline folder"
    names = ", ".join(f"{Path(p).name}×{w:g}" for p, w in files)
    summary = f"{out}: {base.family.LABEL} base {checkpoint} with {names} baked into {len(changes)} modules; {how}"
    return {"out": str(out), "family": base.kind, "modules": len(changes),
            "files": [{"path": str(p), "weight": w} for p, w in files], "summary": summary}
