"""SD3.5 through the family seam: detection and labels, the flow-matching noise rule, the preview (kohya and
diffusers files, hot-swap) and the report on the tiny SD3.5 base, the Runs panel's file lines.
tests/test_sd3.py covers the files' exactness in the consumers, resume and the variants."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TINY_STYLE


@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    from trainer.families.tiny_sd3 import build_tiny_sd35

    return build_tiny_sd35(tmp_path_factory.mktemp("base") / "tiny-sd35")


@pytest.fixture(scope="module")
def sd35_run(sd35, tmp_path_factory) -> Path:
    """A short run on the tiny SD3.5 base with text-encoder LoRA and the report on: its folder."""
    from trainer.config import load_config
    from trainer.report.style_report import run_report
    from trainer.training.loop import train

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "presets" / "tiny-test.toml", [
        f'model.path="{sd35}"', f'data.path="{TINY_STYLE}"', f'output.dir="{out}"', "train.steps=6",
        "train.checkpoint_every=0", "train.save_every=0", "sample.every=0", "sample.prompts=[]", "sample.steps=2",
        "train.lr_unet=1e-2", "train.lr_text_encoder=1e-2"])
    run_dir = out / cfg.output.name
    train(cfg, run_dir)
    run_report(cfg, run_dir)  # as `python -m trainer train` does after training
    return run_dir


def test_detection_labels_and_metadata_of_both_sizes(sd35, tmp_path):
    from trainer import families
    from trainer.families import sd3
    from trainer.families.tiny_sd3 import build_tiny_sd35_large

    medium = families.describe_folder(sd35)
    assert medium == {"kind": "sd3", "label": "SD 3.5 Medium", "prediction_type": "flow"}
    large = families.describe_folder(build_tiny_sd35_large(tmp_path / "large"))
    assert large["label"] == "SD 3.5 Large"
    assert families.describe("sd3", "flow", "SD 3.5 Large") == "SD 3.5 Large, flow matching"
    config = json.loads((sd35 / "transformer" / "config.json").read_text())
    assert (sd3.kohya_version(config), sd3.modelspec_architecture(False, config)) == (
        "5-medium", "stable-diffusion-3-5-medium/lora")
    assert families.native_size(sd35) == 32 * 8  # latent sample size × the VAE's factor
    assert families.from_checkpoint_keys({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}) is sd3
    assert families.version_family("5-large") is sd3 and families.version_family("sdxl_base_v1-0") is not sd3


def test_flow_matching_noise_rule():
    from trainer.config import TrainConfig
    from trainer.families import flow

    class FakeBase:
        noise_scheduler = type("S", (), {"config": {"shift": 3.0}})()

    x0, noise = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    noisy = flow.add_noise(FakeBase, x0, noise, t)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(flow.target(FakeBase, x0, noise, t), noise - x0)
    # the shift moves σ towards noise: s·σ/(1 + (s − 1)·σ), and the base's shift is the default
    assert math.isclose(float(flow.shift_sigmas(torch.tensor(0.5), 3.0)), 0.75)
    val = flow.validation_timesteps(FakeBase, TrainConfig(), 2, "cpu")
    assert torch.allclose(val, flow.shift_sigmas(torch.tensor([0.25, 0.75]), 3.0) * 1000)
    # logit-normal σ (before the shift) has its median at sigmoid(logit_mean); uniform has mean 1/2
    gen = torch.Generator().manual_seed(0)
    drawn = flow.sample_sigmas(TrainConfig(logit_mean=1.0), 20000, gen)
    assert abs(float(drawn.median()) - 1 / (1 + math.exp(-1))) < 0.01
    drawn = flow.sample_sigmas(TrainConfig(timestep_sampling="uniform"), 20000, gen)
    assert abs(float(drawn.mean()) - 0.5) < 0.01
    assert float(flow.loss_weight(FakeBase, t, 5.0).sum()) == 4.0  # min-SNR does not apply
    with pytest.raises(ValueError, match="flow matching"):
        flow.training_scheduler(type("S", (), {"config": {}})(), "epsilon")


def test_preview_kohya_and_diffusers_files_and_hot_swap_agree(sd35, sd35_run):
    from trainer.preview.previewer import Previewer

    kohya = sd35_run / "tiny-test.safetensors"
    diffusers = sd35_run / "tiny-test.diffusers.safetensors"
    multi = Previewer(str(sd35), hotswap=False)
    info = multi.load_adapter(kohya, "k")
    assert info["parts"] == ["text_encoder", "text_encoder_2", "transformer"] and info["layout"] == "kohya"
    multi.load_adapter(diffusers, "d")
    swap = Previewer(str(sd35), hotswap=True, max_rank=16)
    swap.load_adapter(kohya, "k")
    swap.load_adapter(diffusers, "d")
    kw = dict(prompt="zkstyle, a red circle", steps=2, width=64, height=64, seed=3)
    images = {}
    for name, pv in (("multi", multi), ("swap", swap)):
        for adapter in ("k", "d", None):
            image, _ = pv.generate(adapters={adapter: 0.8} if adapter else None, **kw)
            images[name, adapter] = np.asarray(image).astype(int)
    assert np.array_equal(images["multi", "k"], images["multi", "d"])  # both layouts: the same ΔW
    assert np.abs(images["multi", "d"] - images["multi", None]).max() > 0  # the LoRA changes the image
    assert np.abs(images["swap", "d"] - images["multi", "d"]).max() <= 1  # the slot gives the same (fp rounding)
    assert np.array_equal(images["swap", None], images["multi", None])


def test_report_and_runs_panel_on_the_sd35_run(sd35_run):
    from app.downloads_view import downloads_markdown
    from app.jobs import RunStatus
    from app.runs_view import panel_markdown

    report = json.loads((sd35_run / "report.json").read_text())  # rendered through StableDiffusion3Pipeline
    assert set(report["style_lift"]) == {"0.5", "1.0"} and set(report["fidelity"]) == {"0.0", "0.5", "1.0"}
    assert report["verdict"]["verdict"] in ("learned", "partly", "not learned")
    events = [json.loads(line) for line in (sd35_run / "events.jsonl").read_text().splitlines()]
    assert "SD 3.5 Medium, flow matching" in panel_markdown(RunStatus(sd35_run, "done", "", 6, 6, events))
    start = next(e for e in events if e["type"] == "start")
    assert (start["base_kind"], start["base_label"], start["prediction_type"]) == ("sd3", "SD 3.5 Medium", "flow")
    lines = downloads_markdown(sorted(sd35_run.glob("*.safetensors")))
    assert "ComfyUI and Forge (Stability's MMDiT names, fused qkv) — exact" in lines
    assert "diffusers (`pipe.load_lora_weights`) and this app's Preview — exact" in lines
