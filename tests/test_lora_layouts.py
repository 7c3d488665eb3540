"""Files of other trainers' layouts (tests/lora_layouts.py, one per layout and base) go through
trainer.lora_tools.layouts: detect names the layout and the trainer, normalize renames the keys to the kohya (K) or
diffusers (D) form, and ΔW computed from the normalized tensors is the one the writer's consumer applies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.lora_layouts import write_layout
from trainer.lora_tools import layouts

CASES = {  # base -> layouts written for it
    "tiny-sd15": ("kohya", "loha", "lokr", "ai-toolkit", "onetrainer", "simpletuner", "peft", "diffusers-old"),
    "tiny-xl": ("kohya", "loha", "lokr", "ai-toolkit", "onetrainer", "onetrainer-comfy", "simpletuner", "peft",
                "lycoris-wrapper"),
    "tiny-sd35": ("kohya", "loha", "lokr", "ai-toolkit", "onetrainer", "onetrainer-comfy", "simpletuner", "peft"),
}
DETECTED = {  # layout written -> (detect's layout, trainer); base-dependent ones below
    "kohya": ("kohya", "kohya sd-scripts"), "loha": ("lycoris", "LyCORIS"), "lokr": ("lycoris", "LyCORIS"),
    "ai-toolkit": ("kohya", "ai-toolkit"), "onetrainer": ("kohya", "OneTrainer"),
    "onetrainer-comfy": ("comfyui", "OneTrainer"), "simpletuner": ("diffusers", "SimpleTuner"),
    "peft": ("peft", "peft"), "diffusers-old": ("diffusers-old", "unknown"), "lycoris-wrapper": ("lycoris", "SimpleTuner"),
}
DETECTED_TRANSFORMER = {"ai-toolkit": ("diffusers", "ai-toolkit"), "onetrainer": ("onetrainer", "OneTrainer")}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{name: (parts, family)} of the tiny bases, loaded when first asked for."""
    from trainer.config import ModelConfig
    from trainer.families.loading import load_base
    from trainer.families.tiny_xl import build_tiny_sdxl

    loaded = {}

    def get(name: str):
        if name not in loaded:
            path = (str(build_tiny_sdxl(tmp_path_factory.mktemp("bases") / "xl")) if name == "tiny-xl"
                    else f"builtin:{name}")
            base = load_base(ModelConfig(path=path))
            loaded[name] = (base.parts(), base.family)
        return loaded[name]

    return get


def kohya_table(parts, family) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{kohya name: (part, modules in row order)}: the family's kohya names, and for the denoiser its diffusers
    module paths with `_` too (the second spelling read_lora takes)."""
    from trainer.lora_files.kohya_names import module_names

    table = {k: (p, m if isinstance(m, tuple) else (m,)) for k, (p, m) in module_names(parts, family.NAME).items()}
    prefix = family.KOHYA_PREFIXES[family.DENOISER]
    for name, _ in parts[family.DENOISER].named_modules():
        table.setdefault(prefix + name.replace(".", "_"), (family.DENOISER, (name,)))
    return table


def kohya_delta(t: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """ΔW of one (K) module as ComfyUI applies it (comfy/weight_adapter lora.py, loha.py, lokr.py)."""
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * ((alpha or down.shape[0]) / down.shape[0])
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape) * (
            (alpha or rank) / rank)
    dim = None
    w1, w2 = t.get("lokr_w1"), t.get("lokr_w2")
    if w1 is None:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    if w2 is None:
        w2, dim = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    return torch.kron(w1, w2).reshape(shape) * (alpha / dim if alpha is not None and dim else 1.0)


def normalized_deltas(state, form, header, parts, family) -> dict[str, torch.Tensor]:
    """{"part.module": ΔW} from normalized tensors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    suffixes = layouts.K_SUFFIXES if form == "K" else layouts.D_SUFFIXES
    for key, value in state.items():
        suffix = layouts._suffix(key, suffixes)
        assert suffix is not None, key
        groups.setdefault(key[: -len(suffix)], {})[suffix[1:]] = value
    out = {}
    meta = json.loads(header.get("lora_adapter_metadata", "{}"))
    table = kohya_table(parts, family) if form == "K" else {}
    for stem, t in groups.items():
        if form == "K":
            part, members = table[stem]
        else:
            part, _, module = stem.partition(".")
            members = (module if module.startswith("text_projection") else module.removeprefix("text_model."),)
        weights = [parts[part].get_submodule(m if m in dict(parts[part].named_modules()) else "text_model." + m)
                   .weight for m in members]
        shape = (sum(w.shape[0] for w in weights), *weights[0].shape[1:])
        if form == "K":
            delta = kohya_delta(t, shape)
        else:
            down, up = t["lora_A.weight"], t["lora_B.weight"]
            scale = meta.get(f"{part}.lora_alpha", down.shape[0]) / meta.get(f"{part}.r", down.shape[0])
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
        row = 0
        for m, w in zip(members, weights):
            out[f"{part}.{m}"] = delta[row: row + w.shape[0]]
            row += w.shape[0]
    return out


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@pytest.mark.parametrize("base,layout", [(b, lay) for b, lays in CASES.items() for lay in lays])
def test_layout_is_detected_and_normalized_with_the_same_delta(bases, tmp_path, base, layout):
    parts, family = bases(base)
    path = tmp_path / "adapter_model.safetensors"
    expected = write_layout(layout, path, parts, family, seed=len(layout))
    state, header = read(path)
    want = DETECTED_TRANSFORMER.get(layout, DETECTED[layout]) if family.DENOISER == "transformer" else DETECTED[layout]
    assert layouts.detect(set(state), header) == want
    header |= layouts.sidecar_header(path, family.DENOISER)
    normalized, form = layouts.normalize(state, header, family.DENOISER)
    if form == "K":
        assert all(k.startswith(layouts.K_PREFIXES) and layouts._suffix(k, layouts.K_SUFFIXES) for k in normalized)
    else:
        assert all(k.split(".")[0] in layouts.D_PARTS and layouts._suffix(k, layouts.D_SUFFIXES) for k in normalized)
        assert all(".text_model." in k or ".text_projection." in k for k in normalized if k.startswith("text_"))
    got = normalized_deltas(normalized, form, header, parts, family)
    assert sorted(got) == sorted(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(got[key], delta.float(), rtol=1e-5, atol=1e-6, msg=key)


def test_unknown_and_mixed_keys_are_refused():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="no LoRA layout.*kohya"):
        layouts.normalize({"model.layers.0.q.weight": one}, {}, "unet")
    with pytest.raises(ValueError, match="mixes"):
        layouts.normalize({"lora_unet_a.lora_down.weight": one, "unet.a.lora_A.weight": one}, {}, "unet")
    assert layouts.detect({"lora_unet_a.alpha"}, {"style_lora_alpha": "1"}) == ("kohya", "this app")


@pytest.mark.parametrize("base,layout", [(b, lay) for b, lays in CASES.items() for lay in lays])
def test_read_lora_gives_each_layouts_delta(bases, tmp_path, base, layout):
    """read_lora, with the base given, reads every layout's file into Deltas whose weight() is the ΔW its consumer
    applies (max relative error < 1e-5), and tells the layout and trainer detect names."""
    from trainer.lora_tools.deltas import read_lora

    parts, family = bases(base)
    path = tmp_path / "adapter_model.safetensors"
    expected = write_layout(layout, path, parts, family, seed=len(layout) + 1)
    file = read_lora(path, model=parts)
    assert file.family == family.NAME
    assert (file.layout, file.trainer) == layouts.detect(set(read(path)[0]), read(path)[1])
    assert sorted(file.deltas) == sorted(expected)
    for key, delta in expected.items():
        got = file.deltas[key].weight()
        assert got.shape == delta.shape, key
        assert ((got - delta).abs().max() / delta.abs().max()).item() < 1e-5, key


@pytest.mark.parametrize("base,layout", [(b, lay) for b, lays in CASES.items() for lay in lays])
def test_each_layout_goes_through_info_resize_and_merge(bases, tmp_path, base, layout):
    """Another trainer's file through the toolbox: info names its layout and writer, resize at a rank above the true
    one is exact (and writes the family's kohya or diffusers layout), merge with itself at 0.5 + 0.25 gives 0.75 ΔW."""
    from trainer.lora_tools.deltas import read_lora
    from trainer.lora_tools.info import describe_file
    from trainer.lora_tools.merge import merge_files
    from trainer.lora_tools.resize import resize_file

    parts, family = bases(base)
    path = tmp_path / "adapter_model.safetensors"
    expected = write_layout(layout, path, parts, family, seed=len(layout) + 2)
    info = describe_file(path, model=parts)
    assert (info["layout"], info["trainer"]) == layouts.detect(set(read(path)[0]), read(path)[1])
    assert info["family"] == family.NAME and info["modules"] == len(expected)
    if layout == "lokr":  # its w2 is decomposed: A1111 1.10 fails on those (docs/consumers.md)
        assert info["consumers"]["exact"] == "ComfyUI/Forge"
    resized = resize_file(path, tmp_path / "resized.safetensors", rank=64, model=parts)
    assert resized["error"] < 1e-5
    merged = merge_files([(path, 0.5), (tmp_path / "resized.safetensors", 0.25)], tmp_path / "merged.safetensors",
                         rank=None if resized["variant_in"] not in ("loha", "lokr") else 64, model=parts)
    for name, factor in (("resized.safetensors", 1.0), ("merged.safetensors", 0.75)):
        got = read_lora(tmp_path / name, model=parts).deltas
        assert sorted(got) == sorted(expected), name
        for key, delta in expected.items():
            error = ((got[key].weight() - factor * delta).norm() / (factor * delta).norm()).item()
            assert error < 1e-5, (name, key, error)
    assert merged["error"] < 1e-5
