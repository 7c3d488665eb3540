"""The LoRA toolbox on trained LyCORIS (LoHa, LoKr with LoCon) runs of the tiny SD1.5 base and an SD3.5 run whose
kohya file fuses q/k/v: each file's ΔW as read equals the trained one, resize/merge measure what they lose, and
their outputs give that ΔW under ComfyUI's formula (tests/sd3_comfyui.py for SD3) and in diffusers.
"""

from __future__ import annotations

import pytest

from tests.test_lora_tools import file_deltas, rel
from tests.test_lycoris import merged_deltas
from tests.test_sd3 import config as sd3_config, diffusers_deltas, merged, tiny_folder, train_live
from tests.test_export import spec_key
from trainer.lora_tools.deltas import read_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def measured_error(got: dict, want: dict) -> float:
    return (sum(float((got[k] - want[k]).norm() ** 2) for k in want) / sum(float(w.norm() ** 2) for w in want.values())) ** 0.5


@pytest.mark.parametrize("variant, extra", [
    ("loha", ["lora.rank=2", "lora.alpha=3.0", "lora.conv_rank=2", "lora.conv_alpha=1.0"]),
    ("lokr", ["lora.rank=2", "lora.alpha=3.0", "lora.conv_rank=2", "lora.conv_alpha=4.0"]),
])
def test_lycoris_runs_read_resize_and_merge(variant, extra, make_cfg, train_capturing, tiny_base, tmp_path):
    from trainer.lora_tools.info import describe_file
    from trainer.lora_tools.merge import merge_files
    from trainer.lora_tools.resize import resize_file

    cfg = make_cfg("train.steps=3", f'lora.variant="{variant}"', "lora.dropout=0.0", "train.lr_unet=5e-3",
                   "train.lr_text_encoder=5e-3", *extra)
    base, final = train_capturing(cfg, tmp_path / "run")
    live = {}
    for name, (_, delta) in merged_deltas({"unet": base.unet, "text_encoder": base.text_encoder}).items():
        live[name] = delta
    kohya = final.with_name("tiny-test.safetensors")
    lf = read_lora(kohya, model=str(tiny_base))
    assert lf.layout == "lycoris" and lf.variant == variant
    got = {spec_key(*k.split(".", 1)): d.weight().double() for k, d in lf.deltas.items()}
    assert got.keys() == live.keys() and max(rel(got[k], live[k]) for k in live) < 1e-5
    info = describe_file(kohya, model=str(tiny_base))
    assert info["consumers"]["exact"] == "A1111 1.10, ComfyUI/Forge" and info["trained_variant"] == variant

    want = {k: d.weight().double() for k, d in lf.deltas.items()}
    exact = resize_file(kohya, tmp_path / "full.safetensors", rank=64, model=str(tiny_base))
    assert exact["error"] < 1e-5 and exact["layout"] == "kohya"
    small = resize_file(kohya, tmp_path / "r1.safetensors", rank=1, model=str(tiny_base))
    got = file_deltas(tmp_path / "r1.safetensors", None)
    assert small["error"] == pytest.approx(measured_error(got, want), rel=1e-4)
    for key, stats in small["modules"].items():
        assert stats["error"] == pytest.approx(rel(got[key], want[key]), rel=1e-3, abs=1e-7)
    with pytest.raises(ValueError, match="full-rank ΔW.*pass --rank"):
        merge_files([(kohya, 1.0)], tmp_path / "m.safetensors", model=str(tiny_base))
    both = merge_files([(kohya, 0.5), (tmp_path / "full.safetensors", 0.5)], tmp_path / "m.safetensors", rank=64,
                       model=str(tiny_base))
    got = file_deltas(tmp_path / "m.safetensors", None)
    assert both["error"] < 1e-5 and max(rel(got[k], want[k]) for k in want) < 1e-5


def test_sd3_fused_qkv_files_resize_exactly_and_load(tmp_path):
    from tests.sd3_comfyui import comfy_deltas
    from trainer.lora_tools.resize import resize_file

    base, final = train_live(sd3_config(tmp_path, 'output.name="m"'), tmp_path / "run")
    live = {f"{p}.{m}": d for (p, m), d in merged({"transformer": base.unet, **base.text_encoders()}, "default").items()
            if d.any()}
    kohya = final.with_name("m.safetensors")
    folder = tiny_folder()
    got = file_deltas(kohya, str(folder))
    assert max(rel(got[k], live[k]) for k in live) < 1e-5 and all(not got[k].any() for k in got.keys() - live.keys())
    result = resize_file(kohya, tmp_path / "r.safetensors", rank=16, model=str(folder))
    assert result["error"] < 1e-5
    from tests.test_sd3 import pipeline

    resized = comfy_deltas(tmp_path / "r.safetensors", pipeline(folder))  # ComfyUI's SD3 key map and patch
    for (part, module), delta in resized.items():
        if f"{part}.{module}" in live:
            assert rel(delta, live[f"{part}.{module}"]) < 1e-5, module
    resize_file(final, tmp_path / "r.diffusers.safetensors", rank=2, model=str(folder))
    loaded = diffusers_deltas(folder, tmp_path / "r.diffusers.safetensors")
    expected = file_deltas(tmp_path / "r.diffusers.safetensors", str(folder))
    assert max(rel(loaded[tuple(k.split(".", 1))], expected[k]) for k in expected if expected[k].any()) < 1e-5
