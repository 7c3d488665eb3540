"""The LoRA toolbox (trainer/lora_tools, `python -m trainer lora ...`): read, resize, merge, meta and info on the
tiny SD1.5 base, with numbers: exactness where exact, reported errors equal to measured ones, byte-identical tensors.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_export import comfyui_weight, spec_key, tiny_models
from trainer.lora_files.export import save_diffusers_lora
from trainer.lora_files.kohya import save_kohya_lora
from trainer.lora_tools.deltas import read_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def clean_parts(tiny_base):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(tiny_base / "unet"),
            "text_encoder": CLIPTextModel.from_pretrained(tiny_base / "text_encoder")}


@torch.no_grad()
def peft_deltas(modules) -> dict[str, torch.Tensor]:
    """{"part.module": W' − W} in float64 as peft merges each LoRA layer (DoRA included)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for part, model in modules.items():
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                merged = copy.deepcopy(layer).double()
                weight = layer.get_base_layer().weight.detach().double()
                merged.merge()  # the active adapter: "default", or diffusers' "default_0"
                out[f"{part}.{name.removeprefix('text_model.')}"] = merged.get_base_layer().weight.detach() - weight
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def file_deltas(path, parts) -> dict[str, torch.Tensor]:
    return {k: d.weight().double() for k, d in read_lora(path, model=parts).deltas.items()}


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory):
    """kohya and diffusers files of three runs (alpha ≠ r; per-module rank/alpha patterns; DoRA) and their ΔW."""
    folder = tmp_path_factory.mktemp("lora-tools")
    out = {}
    for seed, case in enumerate(("alpha_ne_r", "patterns", "dora")):
        modules = tiny_models(tiny_base, case, case, seed=seed)
        kohya, diffusers = folder / f"{case}.safetensors", folder / f"{case}.diffusers.safetensors"
        save_kohya_lora(kohya, modules, {"ss_output_name": case})
        save_diffusers_lora(diffusers, modules, {"ss_output_name": case})
        out[case] = (kohya, diffusers, peft_deltas(modules))
    return out


def test_read_lora_gives_the_trained_delta_of_every_layout(files, tiny_base):
    parts = clean_parts(tiny_base)
    for case, (kohya, diffusers, want) in files.items():
        for path in (kohya, diffusers):
            got = file_deltas(path, parts)
            assert got.keys() == want.keys()
            assert max(rel(got[k], want[k]) for k in want) < 1e-5, (case, path.name)
    lf = read_lora(files["dora"][0])  # without the base: read, but its ΔW cannot be used
    assert lf.variant == "dora" and lf.needs_base
    with pytest.raises(ValueError, match="pass --model"):
        lf.require_base()


def test_resize_is_exact_at_the_true_rank_and_reports_the_measured_error(files, tiny_base, tmp_path):
    from trainer.lora_tools.resize import resize_file

    parts = clean_parts(tiny_base)
    kohya, diffusers, want = files["patterns"]
    result = resize_file(kohya, tmp_path / "r8.safetensors", rank=8, model=parts)
    got = file_deltas(tmp_path / "r8.safetensors", parts)
    assert max(rel(got[k], want[k]) for k in want) < 1e-5 and result["error"] < 1e-6
    result = resize_file(diffusers, tmp_path / "r1.safetensors", rank=1, model=parts)
    assert result["layout"] == "diffusers"
    got = file_deltas(tmp_path / "r1.safetensors", parts)
    for key, stats in result["modules"].items():
        assert stats["rank"] == 1 and stats["error"] == pytest.approx(rel(got[key], want[key]), rel=1e-4, abs=1e-7)
        singular = torch.linalg.svdvals(want[key].flatten(1))
        assert stats["kept"] == pytest.approx(float(singular[0] / singular.norm()), rel=1e-4)
    measured = (sum(float((got[k] - want[k]).norm() ** 2) for k in want) / sum(float(w.norm() ** 2) for w in want.values())) ** 0.5
    assert result["error"] == pytest.approx(measured, rel=1e-4) and 0.05 < result["error"] < 1


def test_dynamic_resize_picks_kohyas_rank_per_module(files, tiny_base, tmp_path):
    from trainer.lora_tools.lowrank import choose_rank
    from trainer.lora_tools.resize import resize_file

    kohya, _, want = files["patterns"]  # ranks 2, 3 and 4
    result = resize_file(kohya, tmp_path / "fro.safetensors", dynamic="sv_fro", param=0.99, rank=8)
    for key, stats in result["modules"].items():
        singular = torch.linalg.svdvals(want[key].flatten(1).float())
        assert stats["rank"] == choose_rank(singular, "sv_fro", 0.99, 8), key
        assert stats["kept"] >= 0.99
    ranks = {s["rank"] for s in result["modules"].values()}
    assert len(ranks) > 1, "dynamic ranks differ between modules"


def test_resize_of_dora_needs_the_base_and_gives_its_whole_change(files, tiny_base, tmp_path):
    from trainer.lora_tools.resize import resize_file

    kohya, _, want = files["dora"]
    with pytest.raises(ValueError, match=f"{kohya}.*pass --model"):
        resize_file(kohya, tmp_path / "plain.safetensors", rank=4)
    parts = clean_parts(tiny_base)
    result = resize_file(kohya, tmp_path / "plain.safetensors", rank=16, model=parts)
    state = load_file(tmp_path / "plain.safetensors")
    assert not any(k.endswith("dora_scale") for k in state)
    for key, stats in result["modules"].items():  # ComfyUI's formula on the plain file vs peft's DoRA change
        part, module = key.split(".", 1)
        name = spec_key(part, module)
        group = {s: state[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        weight = torch.zeros(want[key].shape)
        assert stats["error"] == pytest.approx(rel(comfyui_weight(weight, group), want[key]), rel=1e-3, abs=1e-6)


def test_merge_is_exact_by_stacking_and_measures_the_svd_error(files, tiny_base, tmp_path):
    from trainer.lora_tools.merge import merge_files

    parts = clean_parts(tiny_base)
    (a, _, want_a), (_, b, want_b) = files["alpha_ne_r"], files["patterns"]
    result = merge_files([(a, 0.7), (b, -0.5)], tmp_path / "m.safetensors", model=parts)
    got = file_deltas(tmp_path / "m.safetensors", parts)
    want = {k: 0.7 * want_a[k] + -0.5 * want_b[k] for k in want_a}
    assert result["exact"] and max(rel(got[k], want[k]) for k in want) < 1e-5
    state = load_file(tmp_path / "m.safetensors")  # and in ComfyUI's / A1111's formula
    for key in list(want)[:10]:
        part, module = key.split(".", 1)
        group = {s: state[f"{spec_key(part, module)}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        assert rel(comfyui_weight(torch.zeros(want[key].shape), group), want[key]) < 1e-5
    result = merge_files([(a, 0.7), (b, -0.5)], tmp_path / "m2.safetensors", rank=2, model=parts)
    got = file_deltas(tmp_path / "m2.safetensors", parts)
    measured = (sum(float((got[k] - want[k]).norm() ** 2) for k in want) / sum(float(w.norm() ** 2) for w in want.values())) ** 0.5
    assert result["error"] == pytest.approx(measured, rel=1e-4) and result["error"] > 0.01


def test_merge_refuses_files_for_different_bases(files, tmp_path):
    from trainer.lora_tools.deltas import Delta
    from trainer.lora_tools.merge import merge_files
    from trainer.lora_tools.write import write_lora

    other = tmp_path / "other.safetensors"
    delta = Delta((64, 64), torch.randn(2, 64), torch.randn(64, 2))
    write_lora(other, {"transformer.transformer_blocks.0.attn.to_q": delta}, "sd3", "diffusers", {})
    with pytest.raises(ValueError, match="different bases cannot be merged"):
        merge_files([(files["alpha_ne_r"][0], 1.0), (other, 1.0)], tmp_path / "x.safetensors")


def test_diffusers_loads_resized_and_merged_files(files, tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.lora_tools.merge import merge_files
    from trainer.lora_tools.resize import resize_file

    kohya, diffusers, want = files["alpha_ne_r"]
    resize_file(diffusers, tmp_path / "r.safetensors", rank=2)
    merge_files([(kohya, 0.5), (diffusers, 0.5)], tmp_path / "m.safetensors", to="diffusers")
    for name in ("r.safetensors", "m.safetensors"):
        expected = file_deltas(tmp_path / name, None)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
        pipe.load_lora_weights(str(tmp_path / name))
        got = peft_deltas({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
        assert got.keys() == expected.keys()
        assert max(rel(got[k], expected[k]) for k in expected) < 1e-5, name


def test_meta_edits_leave_tensors_byte_identical_and_redo_the_hashes(files, tmp_path):
    from PIL import Image

    from trainer.lora_files.kohya_meta import addnet_hashes
    from trainer.lora_tools.info import describe_file
    from trainer.lora_tools.meta import edit_metadata, read_raw

    src = files["alpha_ne_r"][0]
    image = tmp_path / "thumb.jpg"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(image)
    out = tmp_path / "tagged.safetensors"
    edit_metadata(src, {"title": "Red style", "trigger": "rdstl", "author": "me", "tags": "red, painterly"},
                  thumbnail=str(image), out=out)
    (old_entries, old_data), (new_entries, new_data) = read_raw(src), read_raw(out)
    old_entries.pop("__metadata__"), new_entries.pop("__metadata__")
    assert new_data == old_data and new_entries == old_entries  # the very same tensor bytes and offsets
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "Red style" and meta["modelspec.trigger_phrase"] == "rdstl"
    assert meta["modelspec.tags"] == "red, painterly" and meta["modelspec.thumbnail"].startswith("data:image/png;base64,")
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == addnet_hashes(load_file(out), meta)
    info = describe_file(out)
    assert info["hashes"]["sshs_current"] and info["metadata"]["modelspec.author"] == "me"
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        edit_metadata(src, {"title": "x"}, out=out)
    with pytest.raises(ValueError, match="cannot set 'lora_A'"):
        edit_metadata(out, {"lora_A": "x"}, overwrite=True)
    edit_metadata(out, {"title": ""}, overwrite=True)  # in place; an empty value removes the key
    with safe_open(str(out), "pt") as f:
        assert "modelspec.title" not in f.metadata()


def test_info_hashes_and_consumers_agree_with_the_tools_and_the_docs(files, tmp_path):
    import hashlib

    from trainer.lora_tools.info import describe_file

    kohya, diffusers, _ = files["dora"]
    data = kohya.read_bytes()
    info = describe_file(kohya)
    assert info["layout"] == "kohya" and info["variant"] == "dora" and info["family"] == "sd1"
    assert info["hashes"]["autov2"] == hashlib.sha256(data).hexdigest()[:10]
    assert info["hashes"]["autov1"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert info["hashes"]["sshs_current"] and info["hashes"]["addnet"] == info["hashes"]["sshs_model_hash"]
    rows = {line.split("|")[1].strip(): line for line in (ROOT / "docs" / "consumers.md").read_text().splitlines()
            if line.startswith("| ")}
    dora_row = [c.strip() for c in rows["dora (r8, α4)"].split("|")[2:-1]]
    assert [c.startswith("exact") for c in dora_row] == [False, True, False, False, True]
    assert info["consumers"]["exact"] == "ComfyUI/Forge"
    assert describe_file(diffusers)["consumers"]["exact"].startswith("diffusers")
    groups = describe_file(files["patterns"][0])["groups"]
    assert groups["text_encoder"]["modules"] == 12 and groups["unet.down_blocks.0"]["modules"] > 0


def test_cli_commands_print_json_and_refuse_in_one_line(files, tmp_path):
    kohya = files["alpha_ne_r"][0]
    run = [sys.executable, "-m", "trainer", "lora"]
    done = subprocess.run([*run, "resize", str(kohya), "--rank", "2", "--out", str(tmp_path / "r.safetensors"),
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rank"] == 2 and (tmp_path / "r.safetensors").is_file()
    again = subprocess.run([*run, "resize", str(kohya), "--rank", "2", "--out", str(tmp_path / "r.safetensors")],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "exists; pass --overwrite" in again.stderr and "Traceback" not in again.stderr
    info = subprocess.run([*run, "info", str(tmp_path / "r.safetensors")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert info.returncode == 0 and "kohya layout, locon" in info.stdout and "rank 2" in info.stdout


def test_a_file_without_metadata_is_told_by_its_real_shapes(tmp_path):
    """A full-size UNet-only kohya file with diffusers module names and no metadata (as ai-toolkit and OneTrainer
    write SDXL files) names modules an SD1 UNet has too: the shapes of the real bases tell it is SDXL."""
    from safetensors.torch import save_file

    from trainer import families
    from trainer.lora_tools.deltas import module_shapes

    family = "sdxl"
    shapes = module_shapes({"unet": families.get(family).reference_models()["unet"]})
    state, g = {}, torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        if key.endswith(("attn2.to_k", "attn2.to_v")):
            name = "lora_unet_" + key.removeprefix("unet.").replace(".", "_")
            state[f"{name}.lora_down.weight"] = torch.randn(4, shape[1], generator=g)
            state[f"{name}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g)
            state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, tmp_path / "a.safetensors")
    lf = read_lora(tmp_path / "a.safetensors")
    assert lf.family == family and len(lf.deltas) == len(state) // 3


def test_resize_gives_convolutions_their_own_rank(files, tiny_base, tmp_path):
    """kohya resize_lora.py's --new_conv_rank: 3×3 convolutions at --conv-rank, everything else at --rank."""
    from trainer.lora_tools.resize import resize_file

    kohya, _, want = files["alpha_ne_r"]
    result = resize_file(kohya, tmp_path / "c.safetensors", rank=1, conv_rank=3)
    got = read_lora(tmp_path / "c.safetensors").deltas
    kernels = {k for k, w in want.items() if w.dim() == 4 and w.shape[-1] == 3}
    assert kernels and len(kernels) < len(want)
    for key, stats in result["modules"].items():
        assert stats["rank"] == (3 if key in kernels else 1) and got[key].rank == result["rank"] == 3, key
    with pytest.raises(ValueError, match="--conv-rank must be ≥ 1"):
        resize_file(kohya, tmp_path / "d.safetensors", rank=1, conv_rank=0)


def test_file_weight_arguments(tmp_path):
    from trainer.lora_tools.cli import weighted

    odd = tmp_path / "my:style.safetensors"  # a ':' in a file name is not a weight
    odd.write_bytes(b"")
    assert weighted([str(odd), f"{odd}:-0.5", "a.safetensors:0.7", "b.safetensors"]) == [
        (odd, 1.0), (odd, -0.5), (Path("a.safetensors"), 0.7), (Path("b.safetensors"), 1.0)]
    with pytest.raises(ValueError, match="the weight after ':' must be a number"):
        weighted(["a.safetensors:strong"])
