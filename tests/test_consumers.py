"""DoRA as a plain LoRA (truncated SVD, measured error) and the Runs panel's guide to which file goes into which tool.

Models are the tiny base's UNet/CLIP with peft DoRA attached in-test (tests.test_export.attach: lora_B and the
magnitudes moved off their init), so every layer's weight change is non-trivial and partly full rank."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_export import comfyui_weight, spec_key, tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def peft_changes(modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{kohya key: (W, peft's merged W' − W)} in float64, for every LoRA layer."""
    import copy

    from peft.tuners.lora import LoraLayer

    out = {}
    for part, model in modules.items():
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                merged = copy.deepcopy(layer).double()
                merged.merge(adapter_names=["default"])
                weight = layer.get_base_layer().weight.detach().double()
                out[spec_key(part, name)] = (weight, merged.get_base_layer().weight.detach() - weight)
    return out


@pytest.mark.parametrize("rank", [1, 3, 200])
def test_plain_lora_from_dora_reports_the_error_every_tool_sees(tiny_base, tmp_path, rank):
    from trainer.lora_files.export import save_plain_lora

    modules = tiny_models(tiny_base, "dora", "dora")
    path, report = save_plain_lora(tmp_path / "p.safetensors", modules, {"ss_output_name": "p"}, rank)
    state = load_file(path)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert json.loads(header["style_lora_plain"]) == report
    assert "style_lora_dora_scale" not in header and not any(k.endswith("dora_scale") for k in state)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
    # one rank (a layer smaller than `rank` is zero-padded), alpha = rank: every loader applies up·down; never a
    # rank at which the file holds more numbers than the weights it changes (40 here)
    assert ranks == {report["rank"]} and report["rank"] == min(rank, 40)
    assert report["bytes"] <= report["weight_bytes"]
    assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {float(report["rank"])}

    lost, total, worst = {}, {}, 0.0
    for key, (weight, want) in peft_changes(modules).items():
        group = {s: state[f"{key}.{s}"].double() for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        got = comfyui_weight(weight, group) - weight  # A1111 / kohya / diffusers apply the same up·down here
        part = "unet" if key.startswith("lora_unet_") else "text_encoder"
        lost[part] = lost.get(part, 0.0) + float((got - want).pow(2).sum())
        total[part] = total.get(part, 0.0) + float(want.pow(2).sum())
        worst = max(worst, float((got - want).norm() / want.norm()))
    for part in ("unet", "text_encoder"):
        measured = (lost[part] / total[part]) ** 0.5
        assert measured == pytest.approx(report["rel_error"][part], rel=1e-3, abs=5e-6), part  # fp32 factors
    assert worst == pytest.approx(report["max_layer_rel_error"], rel=1e-3, abs=5e-6)
    # the magnitude rescales whole rows of W: a full-rank change that a low rank cannot hold, not even the size cap's
    assert report["rel_error"]["unet"] > 1e-3 and not report["exact"]


def test_downloads_guide_names_the_tool_for_each_file(tiny_base, tmp_path):
    import app.downloads_view as view
    from trainer.lora_files import dora
    from trainer.lora_files.export import save_diffusers_lora, save_plain_lora
    from trainer.lora_files.kohya import save_kohya_lora

    assert (view.DORA_SCALE_KEY, view.PLAIN_KEY) == (dora.DORA_SCALE_KEY, dora.PLAIN_KEY)
    run = tmp_path / "run"
    run.mkdir()
    modules = tiny_models(tiny_base, "dora", "dora")
    save_kohya_lora(run / "s.safetensors", modules, {})
    save_diffusers_lora(run / "s.diffusers.safetensors", modules)
    _, report = save_plain_lora(run / "s.plain.safetensors", modules, {}, 2)
    save_kohya_lora(run / "s-step000010.safetensors", modules, {})
    plain_lora = tiny_models(tiny_base, "patterns", "alpha_ne_r")
    save_kohya_lora(tmp_path / "lora.safetensors", plain_lora, {})

    from app.jobs import adapter_files

    text = view.downloads_markdown(adapter_files(run))
    lines = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("- `s")}
    assert set(lines) == {"s.safetensors", "s.diffusers.safetensors", "s.plain.safetensors"}
    assert "ComfyUI and Forge — exact (DoRA)" in lines["s.safetensors"] and ".plain.safetensors" in lines["s.safetensors"]
    assert "diffusers" in lines["s.diffusers.safetensors"]
    plain = lines["s.plain.safetensors"]
    assert "rank 2" in plain and f"unet {report['rel_error']['unet']:.2%}" in plain and "A1111" in plain
    assert "intermediate step" in text
    assert "A1111/Forge, ComfyUI, kohya `merge_lora.py`, diffusers — exact" in view.file_use(tmp_path / "lora.safetensors")
    assert view.downloads_markdown([]) == ""
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    assert view.read_metadata(tmp_path / "broken.safetensors") == {}


def test_cli_convert_of_a_dora_file_needs_the_base_and_uses_it(tiny_base, tmp_path):
    """`convert` refuses a DoRA file without --model (its kohya dora_scale is relative to the base weights) and with
    it writes the same peft magnitudes as the live adapter."""
    from trainer.lora_files.kohya import save_kohya_lora

    modules = tiny_models(tiny_base, "dora", None)
    kohya = save_kohya_lora(tmp_path / "k.safetensors", modules, {})
    out = tmp_path / "d.safetensors"
    cmd = [sys.executable, "-m", "trainer", "convert", str(kohya), str(out), "--to", "diffusers"]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--model" in refused.stderr and not out.exists()
    done = subprocess.run([*cmd, "--model", str(tiny_base)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from peft.utils import get_peft_model_state_dict

    live = get_peft_model_state_dict(modules["unet"])
    converted = load_file(out)
    for key, value in live.items():
        if key.endswith("lora_magnitude_vector"):
            torch.testing.assert_close(converted[f"unet.{key}"], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_consumer_table_script_measures_what_the_docs_claim(tmp_path):
    """scripts/consumer_table.py on three rows: LoRA and AdaLoRA exact everywhere, DoRA's kohya file exact in ComfyUI
    only, its plain-LoRA file the same (truncation) error in every tool."""
    out = tmp_path / "consumers.md"
    done = subprocess.run([sys.executable, "scripts/consumer_table.py", "--steps", "4", "--variants", "lora,dora,adalora",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {}
    for line in out.read_text().splitlines():
        if line.startswith("| ") and not line.startswith(("| run", "| ---")):
            label, *cells = [c.strip() for c in line.strip("|").split("|")]
            rows[label] = cells  # A1111, ComfyUI / Forge, kohya merge_lora.py, diffusers kohya, diffusers file
    assert set(rows) == {"lora (r8, α4)", "dora (r8, α4)", "dora (r8, α4) → `.plain.safetensors` (rank 16)",
                         "dora, conv layers too", "dora, conv layers too → `.plain.safetensors` (rank 8)",
                         "adalora (ranks differ per layer)"}
    for label in ("lora (r8, α4)", "adalora (ranks differ per layer)"):
        assert all(c.startswith("exact") for c in rows[label]), rows[label]
    for label in ("dora (r8, α4)", "dora, conv layers too"):
        a1111, comfy, kohya, diffusers_kohya, diffusers_file = rows[label]
        assert comfy.startswith("exact") and diffusers_file.startswith("exact"), rows[label]
        assert all(c.startswith("**no**") for c in (a1111, kohya, diffusers_kohya)), rows[label]
    plain = rows["dora (r8, α4) → `.plain.safetensors` (rank 16)"]
    assert len(set(plain[:4])) == 1 and plain[4] == "—"  # the truncation's error, the same in every tool
