"""Adapter files: kohya/A1111 layout (trainer.lora_files.kohya) and its conversion to/from the diffusers/PEFT layout.

Models are the tiny base's real UNet/CLIP with peft adapters attached in-test and lora_B randomised, so every
delta weight is non-trivial. Strength must survive exactly: lora_alpha != r, rsLoRA, rank/alpha patterns, DoRA, conv.
"""

import base64
import copy
import hashlib
import io
import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_save

import trainer.lora_files.convert as convert
import trainer.lora_files.kohya as kohya
from trainer.lora_files.convert import convert_file
from trainer.lora_files.kohya import (
    diffusers_to_kohya,
    kohya_metadata,
    kohya_state_dict,
    kohya_to_diffusers,
    save_kohya_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PATTERNS = dict(rank_pattern={"proj_in": 2, "q_proj": 3}, alpha_pattern={"to_k": 1.5, "conv1": 7.0, "fc1": 0.5})
CASES = {
    "alpha_ne_r": dict(r=4, lora_alpha=8.0),
    "rslora": dict(r=4, lora_alpha=3.0, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=4.0, **PATTERNS),
    "dora": dict(r=4, lora_alpha=6.0, use_dora=True),
}


def attach(unet, text_encoder, unet_case, te_case, seed=0):
    from peft import LoraConfig

    modules = {}
    for i, (part, model, targets, case) in enumerate(
        (("unet", unet, UNET_TARGETS, unet_case), ("text_encoder", text_encoder, TE_TARGETS, te_case))
    ):
        if case is None:
            continue
        config = dict(CASES[case]) if isinstance(case, str) else dict(case)
        for key in ("rank_pattern", "alpha_pattern"):  # the patterns name modules of both parts: keep this part's
            if key in config:
                config[key] = {k: v for k, v in config[key].items() if k in targets}
        model.add_adapter(LoraConfig(target_modules=targets, **config))
        g = torch.Generator().manual_seed(seed + i)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: make the update non-trivial
                p.data = torch.randn(p.shape, generator=g) * 0.2
            if "lora_magnitude_vector" in name:  # = ||W|| at init: move it off so DoRA rescales rows
                p.data = p.data * (1 + 0.2 * torch.randn(p.shape, generator=g))
        modules[part] = model
    return modules


def tiny_models(tiny_base, unet_case, te_case, seed=0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_base / "text_encoder")
    return attach(unet, text_encoder, unet_case, te_case, seed)


def spec_key(part, name):
    """The A1111/ComfyUI key of a module, written from the convention (not from trainer.lora_files.kohya)."""
    prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
    return prefix + name.replace(".", "_")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def comfyui_weight(weight, group, eps=None):
    """ComfyUI's LoRA patch (comfy/weight_adapter/lora.py + base.py weight_decompose, strength 1), written from its
    source and not from trainer code: ΔW = up·down·alpha/r; with an output-axis dora_scale [out, 1(, 1, 1)]
    W' = (W + ΔW)·dora_scale/(‖W‖_row + eps), the row norm of the ORIGINAL weight, eps = finfo(patch dtype).eps
    (pass fp32's to evaluate the fp32 patch in float64)."""
    eps = torch.finfo(weight.dtype).eps if eps is None else eps
    up, down = group["lora_up.weight"], group["lora_down.weight"]
    alpha = group["alpha"].item() / down.shape[0] if "alpha" in group else 1.0
    diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha
    if "dora_scale" not in group:
        return weight + diff
    scale = group["dora_scale"]
    assert scale.shape[0] == weight.shape[0], "output-axis dora_scale"
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    return (weight + diff) * (scale / (norm + eps))


def assert_matches_peft(modules, state):
    """Every peft LoRA layer's effective weight equals what ComfyUI builds from `state` (A1111 and kohya's
    merge_lora.py apply the same up·down·alpha/r without DoRA), and the file has one rank with alpha = rank."""
    from peft.tuners.lora import LoraLayer

    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    assert len(ranks) == 1 and {v.item() for k, v in state.items() if k.endswith(".alpha")} == {float(*ranks)}
    checked = 0
    for part, model in modules.items():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            key = spec_key(part, name)
            group = {s: state[f"{key}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
                     if f"{key}.{s}" in state}
            assert group["alpha"].dim() == 0 and group["alpha"].dtype == torch.float32
            weight = layer.get_base_layer().weight.detach().float()
            merged_copy = copy.deepcopy(layer)
            merged_copy.merge(adapter_names=["default"])
            want = merged_copy.get_base_layer().weight.detach()
            assert rel_err(comfyui_weight(weight, group) - weight, want - weight) < 1e-5, key
            checked += 1
    assert checked == sum(k.endswith(".lora_down.weight") for k in state) and checked > 0


@pytest.mark.parametrize("case", list(CASES))
def test_delta_weights_exact_and_survive_round_trip(tiny_base, tmp_path, case):
    modules = tiny_models(tiny_base, case, case)
    state = kohya_state_dict(modules)
    assert_matches_peft(modules, state)
    assert any(v.dim() == 4 and k.endswith("lora_down.weight") and v.shape[-1] == 3 for k, v in state.items()), "3x3 conv"
    assert ("dora" in case) == any(k.endswith(".dora_scale") for k in state)

    first = save_kohya_lora(tmp_path / "a.safetensors", modules, {"ss_output_name": "a"})
    model = modules if "dora" in case else None  # DoRA's kohya dora_scale is relative to the base weights
    middle = convert_file(first, tmp_path / "b.safetensors", "diffusers", model=model)
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) and ".lora_" in k for k in load_file(middle))
    # resolving names against the live (peft-wrapped) base gives the same modules as the built-in SD1.5 names
    assert kohya_to_diffusers(state, modules)[0].keys() == load_file(middle).keys()
    last = load_file(convert_file(middle, tmp_path / "c.safetensors", "kohya", model=model))
    assert last.keys() == state.keys()
    assert_matches_peft(modules, last)

    # a file written by trainer.lora_files.export (the live peft config as metadata: rsLoRA, patterns, DoRA) converts exactly too
    from trainer.lora_files.export import save_diffusers_lora

    exported = save_diffusers_lora(tmp_path / "d.safetensors", modules)
    assert_matches_peft(modules, load_file(convert_file(exported, tmp_path / "e.safetensors", "kohya", model=model)))
    if model is not None:  # without the base weights a DoRA file cannot be converted exactly: refused, named
        with pytest.raises(ValueError, match="a.safetensors.*--model"):
            convert_file(first, tmp_path / "f.safetensors", "diffusers")
        with pytest.raises(ValueError, match="d.safetensors.*--model"):
            convert_file(exported, tmp_path / "g.safetensors", "kohya")


def test_every_kohya_key_maps_to_exactly_one_module_of_the_base(tiny_base):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    state = kohya_state_dict(tiny_models(tiny_base, "dora", "patterns"))
    base = {"unet": UNet2DConditionModel.from_pretrained(tiny_base / "unet"),
            "text_encoder": CLIPTextModel.from_pretrained(tiny_base / "text_encoder")}
    names = [(spec_key(part, name), module) for part, model in base.items() for name, module in model.named_modules()]
    for key, tensor in state.items():
        lora_name, _, suffix = key.partition(".")
        assert suffix in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"), key
        found = [m for n, m in names if n == lora_name]
        assert len(found) == 1, f"{key} maps to {len(found)} modules (ComfyUI: 'lora key not loaded')"
        module = found[0]
        assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        out_dim, in_dim = module.weight.shape[:2]
        rank = state[f"{lora_name}.lora_down.weight"].shape[0]
        kernel = tuple(module.weight.shape[2:])
        expected = {"lora_down.weight": (rank, in_dim, *kernel), "lora_up.weight": (out_dim, rank, *[1] * len(kernel)),
                    "alpha": (), "dora_scale": (out_dim, *[1] * (1 + len(kernel)))}[suffix]
        assert tuple(tensor.shape) == expected, key


def render(pipe):
    out = pipe("zkstyle, a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    return out.images


def fresh_pipe(tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("unet_case", "te_case", "direct_kohya"), [
    ("alpha_ne_r", "rslora", True),
    # rank/alpha patterns: diffusers' own kohya loader keeps one alpha per part, so the file has one rank and
    # alpha = rank with the scales folded into lora_up, and loads directly. Its DoRA handling is not ComfyUI's
    # (dora_scale relative to the base weights), so DoRA loads through our conversion (with the base weights).
    ("dora", "dora", False),
    ("patterns", "patterns", True),
])
def test_files_load_in_diffusers_and_draw_like_the_live_model(tiny_base, tmp_path, unet_case, te_case, direct_kohya):
    from trainer.lora_files.export import save_diffusers_lora

    pipe = fresh_pipe(tiny_base)
    before = render(pipe)
    modules = attach(pipe.unet, pipe.text_encoder, unet_case, te_case)
    live = render(pipe)
    assert (live - before).abs().max() > 1e-2, "the adapter must visibly change the image"

    kohya_file = save_kohya_lora(tmp_path / "k.safetensors", modules, {})
    files = [save_diffusers_lora(tmp_path / "d.safetensors", modules),
             convert_file(kohya_file, tmp_path / "kd.safetensors", "diffusers", model=modules)]
    files += [kohya_file] if direct_kohya else []
    for path in files:
        loaded = fresh_pipe(tiny_base)
        loaded.load_lora_weights(str(path))
        assert (render(loaded) - live).abs().max() < 1e-4, path.name


def png_bytes():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_metadata_strings_cover_and_hashes(tiny_base, tmp_path):
    from PIL import Image

    modules = tiny_models(tiny_base, "alpha_ne_r", None)
    base = {"ss_output_name": "my-style", "ss_resolution": "(64, 64)", "ss_training_started_at": "1700000000.0"}
    tags = {"1_style": {"zkstyle": 3, "red circle": 1}}
    meta = kohya_metadata(base, rank=4, alpha=8.0, trigger="zkstyle", tag_frequency=tags, base_kind="sd1",
                          cover_png=png_bytes())
    path = save_kohya_lora(tmp_path / "m.safetensors", modules, meta)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert all(isinstance(v, str) for v in header.values())
    assert {k: header[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                                   "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture",
                                   "modelspec.implementation", "modelspec.title", "modelspec.trigger_phrase",
                                   "modelspec.resolution")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
        "modelspec.title": "my-style", "modelspec.trigger_phrase": "zkstyle", "modelspec.resolution": "64x64"}
    assert json.loads(header["ss_tag_frequency"]) == tags
    assert header["modelspec.date"].startswith("2023-11-14")

    cover = base64.b64decode(json.loads(header["ssmd_cover_images"])[0])
    assert Image.open(io.BytesIO(cover)).format == "PNG"
    uri = header["modelspec.thumbnail"]  # ModelSpec's thumbnail: the same image, at most 256 px, as a data URI
    assert uri.startswith("data:image/png;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.size == Image.open(io.BytesIO(cover)).size or max(thumb.size) == 256

    raw = path.read_bytes()
    payload = raw[8 + struct.unpack("<Q", raw[:8])[0]:]
    assert header["sshs_model_hash"] == hashlib.sha256(payload).hexdigest()
    assert header["modelspec.hash_sha256"] == "0x" + header["sshs_model_hash"]
    assert re.fullmatch(r"[0-9a-f]{8}", header["sshs_legacy_hash"])
    # kohya hashes with ss_* metadata only, so editing other entries keeps the hashes
    again = save_kohya_lora(tmp_path / "n.safetensors", modules, {**meta, "modelspec.description": "edited"})
    with safe_open(str(again), framework="pt") as f:
        assert {k: f.metadata()[k] for k in ("sshs_model_hash", "sshs_legacy_hash")} == {
            k: header[k] for k in ("sshs_model_hash", "sshs_legacy_hash")}

    # the legacy hash reads 64 KiB at 1 MiB of a serialisation with ss_* metadata only: needs a file past 1 MiB
    big = tiny_models(tiny_base, dict(r=64, lora_alpha=32.0), None)
    big_path = save_kohya_lora(tmp_path / "big.safetensors", big, {"ss_output_name": "big", "modelspec.title": "x"})
    assert big_path.stat().st_size > 0x110000
    with safe_open(str(big_path), framework="pt") as f:
        big_header = f.metadata()
    kohya_bytes = safetensors_save(load_file(big_path), metadata={k: v for k, v in big_header.items()
                                                                  if k.startswith("ss_")})
    assert big_header["sshs_legacy_hash"] == hashlib.sha256(kohya_bytes[0x100000:0x110000]).hexdigest()[:8]

    with pytest.raises(ValueError, match="PNG"):
        kohya_metadata(base, rank=4, alpha=8.0, trigger="", tag_frequency={}, base_kind="sd1", cover_png=b"GIF89a")
    with pytest.raises(ValueError, match="flux"):
        kohya_metadata(base, rank=4, alpha=8.0, trigger="", tag_frequency={}, base_kind="flux", cover_png=None)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tiny_base, tmp_path, monkeypatch):
    modules = tiny_models(tiny_base, "alpha_ne_r", "alpha_ne_r")
    good = save_kohya_lora(tmp_path / "good.safetensors", modules, {})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(kohya, "save_file", crash)
    monkeypatch.setattr(convert, "save_file", crash)  # convert writes diffusers files itself
    target = tmp_path / "new.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_kohya_lora(target, modules, {})
    with pytest.raises(OSError, match="disk full"):
        convert_file(good, target, "diffusers")
    assert not target.exists()

    target.write_bytes(b"previous adapter")
    with pytest.raises(OSError, match="disk full"):
        save_kohya_lora(target, modules, {})
    assert target.read_bytes() == b"previous adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", "new.safetensors"]


@pytest.mark.parametrize("name", ["lora.ckpt", "lora.pt", "lora.bin", "notes.txt", "fake.safetensors"])
def test_convert_refuses_anything_but_safetensors(tmp_path, monkeypatch, name):
    src = tmp_path / name
    if name.endswith((".ckpt", ".pt", ".bin")):
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, src)
    else:
        src.write_bytes(b"this is not a tensor file")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never run on user files"))
    with pytest.raises(ValueError, match=re.escape(str(src))):
        convert_file(src, tmp_path / "out.safetensors", "diffusers")
    assert not (tmp_path / "out.safetensors").exists()


def test_foreign_kohya_file_resolves_against_sd15_names():
    """Keys of a real SD1.5 LoRA (modules the tiny base lacks) resolve without a base model; bad keys are refused."""
    def lora(rank, out_dim, in_dim, alpha=None, kernel=()):
        group = {"lora_down.weight": torch.randn(rank, in_dim, *kernel), "lora_up.weight": torch.randn(out_dim, rank, *[1] * len(kernel))}
        return group | ({"alpha": torch.tensor(alpha)} if alpha is not None else {})

    groups = {
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0": lora(8, 1280, 1280, 4.0),
        "lora_unet_up_blocks_3_resnets_2_conv_shortcut": lora(8, 320, 640, 4.0, (1, 1)),
        "lora_unet_time_embedding_linear_1": lora(8, 1280, 320, 4.0),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": lora(16, 768, 3072),  # no alpha: scale 1.0
        "lora_te1_text_model_encoder_layers_3_self_attn_q_proj": lora(8, 768, 768, 2.0),
    }
    state = {f"{name}.{suffix}": t for name, group in groups.items() for suffix, t in group.items()}
    tensors, meta = kohya_to_diffusers(state)
    assert "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_A.weight" in tensors
    assert "unet.up_blocks.3.resnets.2.conv_shortcut.lora_B.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.11.mlp.fc2.lora_A.weight" in tensors
    assert meta["unet.r"] == 8 and meta["unet.lora_alpha"] == 4.0
    assert meta["text_encoder.rank_pattern"] == {"encoder.layers.11.mlp.fc2": 16}
    assert meta["text_encoder.alpha_pattern"] == {"encoder.layers.11.mlp.fc2": 16.0}  # alpha = rank

    back = diffusers_to_kohya(tensors, meta)
    for name, group in groups.items():  # same ΔW, now at one rank (16) with alpha = rank: scale folded into up
        name = name.replace("lora_te1_", "lora_te_")
        alpha = group.get("alpha", torch.tensor(float(group["lora_down.weight"].shape[0]))).item()
        want = group["lora_up.weight"].flatten(1) @ group["lora_down.weight"].flatten(1) * alpha / group["lora_down.weight"].shape[0]
        up, down = back[f"{name}.lora_up.weight"], back[f"{name}.lora_down.weight"]
        assert back[f"{name}.alpha"].item() == down.shape[0] == 16
        assert rel_err(up.flatten(1) @ down.flatten(1), want) < 1e-6, name

    bad = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_x.lora_down.weight": torch.zeros(1, 1),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_x.lora_up.weight": torch.zeros(1, 1)}
    with pytest.raises(ValueError, match="to_x"):
        kohya_to_diffusers(bad)
    input_axis = {f"lora_unet_time_embedding_linear_1.{k}": v for k, v in lora(8, 1280, 320, 4.0).items()}
    input_axis["lora_unet_time_embedding_linear_1.dora_scale"] = torch.ones(1, 320)
    with pytest.raises(ValueError, match="input axis"):
        kohya_to_diffusers(input_axis)
    # SGM block names are SDXL's: resolved against the real SDXL UNet (input block 4 = level 1, layer 0)
    sdxl, _ = kohya_to_diffusers({f"lora_unet_input_blocks_4_1_proj_in.{k}": v for k, v in lora(4, 8, 8).items()})
    assert set(sdxl) == {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight",
                         "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight"}


def test_diffusers_file_without_metadata_warns_and_assumes_alpha_equals_rank(tiny_base, tmp_path):
    from peft.utils import get_peft_model_state_dict

    unet = tiny_models(tiny_base, "alpha_ne_r", None)["unet"]
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    with pytest.warns(UserWarning, match="alpha = rank"):
        out = diffusers_to_kohya(state, {})
    assert all(v.item() == 4.0 for k, v in out.items() if k.endswith(".alpha"))

    save_file(state, tmp_path / "bare.safetensors")
    with pytest.warns(UserWarning, match="alpha = rank"):
        convert_file(tmp_path / "bare.safetensors", tmp_path / "k.safetensors", "kohya")


def test_unexpressible_adapters_are_refused(tiny_base):
    from peft import LoraConfig
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_base / "text_encoder")
    text_encoder.add_adapter(LoraConfig(r=2, target_modules=["token_embedding", "q_proj"]))
    with pytest.raises(ValueError, match="token_embedding"):
        kohya_state_dict({"text_encoder": text_encoder})
    with pytest.raises(ValueError, match="no LoRA weights"):
        save_kohya_lora(tiny_base.parent / "never.safetensors", {"unet": torch.nn.Linear(2, 2)}, {})


@pytest.mark.slow
def test_per_module_ranks_and_alphas_load_exactly_through_diffusers_at_full_sd15_size():
    """diffusers' kohya loader turns per-module alphas into an alpha_pattern whose keys (`…attn1.processor.to_k_lora.
    down.weight`) miss the attention modules of the real SD1.5 UNet; the tiny base hides this. On the full-size
    architecture (random weights, as bench/train_speed.random_base builds it) the old per-module-alpha file loads
    at the wrong strength, ours (one rank, alpha = rank, scale folded into lora_up) at the trained one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    from trainer.families.sd1 import REFERENCE_UNET as SD15_UNET
    from trainer.adapters.factors import lora_factors

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    targets = [f"down_blocks.{b}.attentions.{a}.{m}" for b in (0, 1) for a in (0, 1)
               for m in ("proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
                         "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.attn2.to_out.0")]
    # AdaLoRA-like: every module its own rank and alpha
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=targets,
                                rank_pattern={t: 1 + i % 4 for i, t in enumerate(targets)},
                                alpha_pattern={t: 0.5 + 0.75 * i for i, t in enumerate(targets)}))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape) * 0.1
    want = {t: unet.get_submodule(t).get_delta_weight("default") for t in targets}

    ours = kohya_state_dict({"unet": unet})
    old = {}  # the previous export: each module at its own rank with alpha = scale·rank
    for name, f in lora_factors({"unet": unet}).items():
        key = "lora_unet_" + name.removeprefix("unet.").replace(".", "_")
        old |= {f"{key}.lora_down.weight": f.down, f"{key}.lora_up.weight": f.up,
                f"{key}.alpha": torch.tensor(f.scale * f.down.shape[0])}
    errors = {}
    for label, state in (("ours", ours), ("old", old)):
        tensors, alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
        StableDiffusionPipeline.load_lora_into_unet(tensors, alphas, unet, adapter_name=label)
        errors[label] = max(rel_err(unet.get_submodule(t).get_delta_weight(label), want[t]) for t in targets)
    assert errors["ours"] < 1e-4, errors
    assert errors["old"] > 0.1, errors  # the failure this guards against is real at this size
