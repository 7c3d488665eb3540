"""lora extract: a "tuned" copy of the tiny SD1.5 base gets known rank-2 changes in two UNet attention layers, a
text-encoder layer and a 3×3 conv, saved as a diffusers folder; extraction at rank 4 recovers each change (max
relative error < 1e-5), reports the error it measures, at rank 1 leaves exactly the SVD tail, skips the conv unless
--conv-rank asks for it, honours --no-text-encoders and --min-diff, and refuses a checkpoint of another family."""

from __future__ import annotations

import pytest
import torch

from trainer.lora_tools.extract import extract_deltas

pytestmark = pytest.mark.usefixtures("one_thread")
LINEAR = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
          "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
          "text_encoder.encoder.layers.0.self_attn.q_proj")
CONV = "unet.down_blocks.0.resnets.0.conv1"


def rank_two(shape, seed: int) -> torch.Tensor:
    """A rank-2 ΔW of `shape` with singular values of clearly different size (entries around 0.1)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    u, _ = torch.linalg.qr(torch.randn(rows, 2, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, 2, generator=g, dtype=torch.float64))
    scale = 0.1 * (rows * cols) ** 0.5
    return ((u * torch.tensor([scale, 0.3 * scale], dtype=torch.float64)) @ v.T).reshape(shape)


def module_of(pipe, key: str):
    part, name = key.split(".", 1)
    model = getattr(pipe, part)
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule("text_model." + name)


@pytest.fixture(scope="module")
def tuned(tiny_base, tmp_path_factory):
    """(tuned diffusers folder, {key: the ΔW actually stored: float32(W + ΔW) − W})."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, dtype=torch.float32, safety_checker=None)
    added = {}
    with torch.no_grad():
        for seed, key in enumerate((*LINEAR, CONV)):
            weight = module_of(pipe, key).weight
            before = weight.detach().clone()
            weight.add_(rank_two(tuple(weight.shape), seed).float())
            added[key] = (weight.detach() - before).double()
    folder = tmp_path_factory.mktemp("tuned") / "tuned"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, added


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_rank_four_recovers_each_change(tiny_base, tuned):
    folder, added = tuned
    deltas, base, report = extract_deltas(str(tiny_base), str(folder), rank=4, dynamic=None, param=None)
    assert base.kind == "sd1"
    assert set(deltas) == set(LINEAR)  # nothing else changed; the 3×3 conv waits for --conv-rank
    assert [(k, why) for k, _, why in report["left"]] == [(CONV, "3x3 conv (no --conv-rank)")]
    for key in LINEAR:
        delta = deltas[key]
        assert delta.rank == 4  # as kohya: the rank asked (the two extra columns carry float rounding only)
        assert rel(delta.weight(), added[key]) < 1e-5
        measured = float(torch.linalg.matrix_norm(delta.weight().double() - added[key]) /
                         torch.linalg.matrix_norm(added[key]))
        assert report["modules"][key]["error"] == pytest.approx(measured, abs=1e-6)
        assert report["modules"][key]["error"] < 1e-5


def test_rank_one_leaves_the_svd_tail(tiny_base, tuned):
    folder, added = tuned
    deltas, _, report = extract_deltas(str(tiny_base), str(folder), rank=1, dynamic=None, param=None)
    for key in LINEAR:
        s = torch.linalg.svdvals(added[key].reshape(added[key].shape[0], -1))
        tail = float((s[1:].pow(2).sum() / s.pow(2).sum()).sqrt())  # ≈ 0.3 / sqrt(1 + 0.09) by construction
        assert report["modules"][key]["error"] == pytest.approx(tail, abs=1e-6)
        assert tail == pytest.approx(0.3 / 1.09 ** 0.5, abs=1e-4)
        assert deltas[key].rank == 1
    # the whole change: the three tails and the conv left out, weighted by each module's ‖ΔW‖
    from trainer.lora_tools.extract import total_error

    norms = {k: float(torch.linalg.vector_norm(v)) for k, v in added.items()}
    lost = sum((report["modules"][k]["error"] * norms[k]) ** 2 for k in LINEAR) + norms[CONV] ** 2
    assert total_error(report["modules"], report["left"]) == pytest.approx((lost / sum(
        n ** 2 for n in norms.values())) ** 0.5, rel=1e-6)


def test_conv_rank_extracts_the_3x3_conv_as_locon(tiny_base, tuned):
    folder, added = tuned
    deltas, _, report = extract_deltas(str(tiny_base), str(folder), rank=4, dynamic=None, param=None, conv_rank=2)
    assert set(deltas) == {*LINEAR, CONV} and not report["left"]
    conv = deltas[CONV]
    assert conv.down.shape[1:] == added[CONV].shape[1:] and conv.up.shape[2:] == (1, 1) and conv.rank == 2
    assert rel(conv.weight(), added[CONV]) < 1e-5
    # dynamic rank: sv_ratio 10 keeps both singular values (ratio 1 : 0.3), capped by --conv-rank 1 on the conv
    deltas, _, report = extract_deltas(str(tiny_base), str(folder), rank=8, dynamic="sv_ratio", param=10,
                                       conv_rank=1)
    assert {k: m["rank"] for k, m in report["modules"].items()} == {**dict.fromkeys(LINEAR, 2), CONV: 1}


def test_text_encoders_and_min_diff_leave_modules_out(tiny_base, tuned):
    folder, added = tuned
    deltas, _, _ = extract_deltas(str(tiny_base), str(folder), rank=2, dynamic=None, param=None,
                                  text_encoders=False)
    assert set(deltas) == set(LINEAR[:2])
    smallest = min(float(added[k].abs().max()) for k in LINEAR)
    deltas, _, report = extract_deltas(str(tiny_base), str(folder), rank=2, dynamic=None, param=None,
                                       min_diff=smallest)
    assert len(deltas) == 2 and sum(why == "below --min-diff" for _, _, why in report["left"]) == 1


def test_other_family_and_missing_rank_are_refused(tiny_base, tuned):
    with pytest.raises(ValueError, match=r"builtin:tiny-sd35: a SD 3.*extract needs a fine-tune"):
        extract_deltas(str(tiny_base), "builtin:tiny-sd35", rank=4, dynamic=None, param=None)
    with pytest.raises(ValueError, match="give --rank"):
        extract_deltas(str(tiny_base), str(tuned[0]), rank=None, dynamic=None, param=None)


def test_extract_writes_a_kohya_file_holding_the_change(tiny_base, tuned, tmp_path):
    from safetensors.torch import load_file

    from trainer import families
    from trainer.lora_tools.extract import extract

    folder, added = tuned
    out = tmp_path / "extracted.safetensors"
    result = extract(str(tiny_base), str(folder), out, rank=4, dynamic=None, param=None, conv_rank=4)
    assert result["family"] == "sd1" and set(result["modules"]) == set(added)
    tensors, family = load_file(str(out)), families.get("sd1")
    for key, change in added.items():
        name = family.kohya_name(*key.split(".", 1))
        down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
        scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
        assert rel((up.flatten(1) @ down.flatten(1)).reshape(change.shape) * scale, change) < 1e-5
    assert result["error"] < 1e-5 and result["summary"].startswith(f"{out}: 4 modules of a SD 1")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        extract(str(tiny_base), str(folder), out, rank=4, dynamic=None, param=None)


def test_extracted_diffusers_file_loads_in_diffusers_with_the_change(tiny_base, tuned, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests.test_lora_tools import peft_deltas
    from trainer.lora_tools.extract import extract

    folder, added = tuned
    out = tmp_path / "extracted.diffusers.safetensors"
    result = extract(str(tiny_base), str(folder), out, rank=2, dynamic=None, param=None, conv_rank=2, to="diffusers")
    assert result["error"] < 1e-5
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.load_lora_weights(str(out))
    got = peft_deltas({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert set(got) == set(added)
    for key, change in added.items():
        assert rel(got[key], change) < 1e-5, key


def test_cli_extract_takes_the_original_as_base_as_the_issue_spells_it(tiny_base, tuned, tmp_path, capsys):
    import json

    from trainer.cli import main

    folder, added = tuned
    out = tmp_path / "cli.safetensors"
    assert main(["lora", "extract", "--base", str(tiny_base), "--tuned", str(folder), "--rank", "2", "--conv-rank", "2",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["error"] < 1e-5 and set(result["modules"]) == set(added) and out.is_file()
    assert main(["lora", "extract", "--from", str(tiny_base), "--tuned", str(folder), "--rank", "2",
                 "--out", str(out)]) == 2  # the old spelling still works; the output exists: refused in one line
    assert "exists; pass --overwrite" in capsys.readouterr().err
