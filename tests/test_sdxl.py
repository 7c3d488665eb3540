"""SDXL and SD2 (v-prediction) bases on tiny random pipelines built in-process: detection, training, both export
layouts loaded back by diffusers' own loaders (the kohya SDXL file through diffusers' SGM-name mapping), conversion
and preview."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import ROOT, TINY_STYLE


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    from trainer.families.tiny_xl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("bases") / "tiny-sdxl")


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory) -> Path:
    from trainer.families.tiny_xl import build_tiny_sd2

    return build_tiny_sd2(tmp_path_factory.mktemp("bases") / "tiny-sd2")


def config(base: Path, out: Path, *overrides: str):
    from trainer.config import load_config

    return load_config(ROOT / "presets" / "tiny-test.toml", [
        f'model.path="{base}"', f'data.path="{TINY_STYLE}"', f'output.dir="{out}"', "train.steps=3",
        "train.checkpoint_every=0", "train.save_every=0", "sample.every=0", "sample.prompts=[]",
        "lora.dropout=0.0", "data.caption_dropout=0.0", "train.lr_unet=1e-2", "train.lr_text_encoder=1e-2", *overrides])


def latents(pipe, prompt: str = "zkstyle, a red circle") -> torch.Tensor:
    """The denoised latents of a fixed prompt and seed: compared before any VAE rounding."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def lora_modules(model, adapter: str) -> int:
    return sum(1 for m in model.modules() if adapter in getattr(m, "lora_A", {}))


def test_base_family_is_detected_from_the_model(tiny_sdxl, tiny_sd2, tiny_base):
    from trainer.families import describe_folder, kind_from_configs
    from trainer.config import ModelConfig
    from trainer.families.loading import load_base

    assert describe_folder(tiny_sdxl) == {"kind": "sdxl", "label": "SDXL", "prediction_type": "epsilon"}
    assert describe_folder(tiny_sd2) == {"kind": "sd2", "label": "SD 2.x", "prediction_type": "v_prediction"}
    assert describe_folder(tiny_base)["kind"] == "sd1"
    assert "error" in describe_folder(tiny_base / "unet")
    xl = load_base(ModelConfig(path=str(tiny_sdxl)))
    assert (xl.kind, type(xl.pipeline()).__name__) == ("sdxl", "StableDiffusionXLPipeline")
    assert set(xl.text_encoders()) == {"text_encoder", "text_encoder_2"}
    sd2 = load_base(ModelConfig(path=str(tiny_sd2)))
    assert (sd2.kind, sd2.prediction_type, sd2.text_encoder_2) == ("sd2", "v_prediction", None)
    with pytest.raises(ValueError, match="refiner"):
        kind_from_configs({"addition_embed_type": "text_time"}, has_text_encoder=False, has_text_encoder_2=True)


def test_sdxl_time_ids_follow_the_crop():
    from trainer.families.sdxl import sdxl_time_ids
    from trainer.data.images import crop_box

    # 300x200 (w x h) into a 128x64 bucket: resized to 128x85, cropped 10 px from the top (rounding: (85-64)//2).
    assert crop_box((300, 200), (128, 64)) == (0, 10, 128, 85)
    assert sdxl_time_ids((300, 200), (128, 64), flip=False).tolist() == [200, 300, 10, 0, 64, 128]
    # 200x100 into 64x64: resized to 128x64, 32 px cut on the left; flipped, the crop is measured from the right.
    assert sdxl_time_ids((200, 100), (64, 64), flip=False).tolist() == [100, 200, 0, 32, 64, 64]
    assert sdxl_time_ids((201, 100), (64, 64), flip=True).tolist()[3] == 129 - 32 - 64


def test_sdxl_trains_exports_and_loads_in_diffusers(tiny_sdxl, tmp_path, train_capturing):
    from diffusers import StableDiffusionXLPipeline

    from trainer.lora_files.convert import convert_file

    run = tmp_path / "run"
    cfg = config(tiny_sdxl, tmp_path, "output.name=\"xl\"", "lora.alpha=8.0", "lora.rank=4",
                 "train.cache_text_embeddings=false")
    live, final = train_capturing(cfg, run)
    kohya_path = run / "xl.safetensors"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")  # after the dataset summary
    assert start["base_kind"] == "sdxl" and events[-1]["type"] == "done"

    with safe_open(str(kohya_path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    prefixes = {k.split("_text_model")[0] if k.startswith("lora_te") else "_".join(k.split("_")[:4]) for k in keys}
    assert prefixes == {"lora_te1", "lora_te2", "lora_unet_input_blocks", "lora_unet_middle_block",
                        "lora_unet_output_blocks"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in keys  # level 1, depth 2
    with safe_open(str(final), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}

    # The live trained model, the diffusers file and the kohya file (through diffusers' own SGM/kohya mapping)
    # give the same latents; the base alone does not.
    reference = latents(live.pipeline())
    results = {}
    for name, path in (("diffusers", final), ("kohya", kohya_path)):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(str(path), adapter_name="style")
        for part in ("unet", "text_encoder", "text_encoder_2"):  # every module of the file was loaded
            loaded = lora_modules(getattr(pipe, part), "style")
            assert loaded == lora_modules(getattr(live, "unet" if part == "unet" else part), "default"), (name, part)
        results[name] = latents(pipe)
    base = latents(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl))
    assert rel(results["diffusers"], reference) < 1e-4
    assert rel(results["kohya"], reference) < 1e-4
    assert rel(base, reference) > 100 * max(rel(results["diffusers"], reference), 1e-6)

    # Conversion both ways keeps every tensor (the SDXL family is read from the file's metadata).
    back = convert_file(kohya_path, tmp_path / "k2d.safetensors", "diffusers")
    again = convert_file(back, tmp_path / "d2k.safetensors", "kohya")
    with safe_open(str(back), "pt") as a, safe_open(str(final), "pt") as b:
        assert set(a.keys()) == set(b.keys())
    with safe_open(str(again), "pt") as a, safe_open(str(kohya_path), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k))

    # Preview: one SDXL base, both files switched in (multi-adapter and hot-swap slot), same image as diffusers.
    from trainer.preview.previewer import Previewer

    kw = dict(prompt="zkstyle, a red circle", steps=2, guidance=3.0, width=64, height=64, seed=0)
    for hotswap in (False, True):
        pv = Previewer(str(tiny_sdxl), device="cpu", hotswap=hotswap)
        assert pv.state()["kind"] == "sdxl"
        pv.load_adapter(kohya_path, "k")
        pv.load_adapter(final, "d")
        k_image, _ = pv.generate(adapters={"k": 1.0}, **kw)
        d_image, _ = pv.generate(adapters={"d": 1.0}, **kw)
        b_image, _ = pv.generate(adapters=None, **kw)
        k, d, b = (torch.tensor(list(i.getdata()), dtype=torch.float32) for i in (k_image, d_image, b_image))
        assert (k - d).abs().max() <= 1, hotswap  # 8-bit images: at most one level of rounding apart
        assert (b - d).abs().max() > 8, hotswap


def test_sdxl_refuses_an_sd15_lora_with_a_clear_message(tiny_sdxl, tiny_base, tmp_path):
    from trainer.preview.previewer import AdapterError, Previewer
    from tests.test_preview import make_adapter

    kohya, diffusers = make_adapter(tiny_base, tmp_path, "sd15", seed=1)
    pv = Previewer(str(tiny_sdxl), device="cpu")
    with pytest.raises(AdapterError, match="sd15.safetensors.*SD1.x/SD2.x"):
        pv.load_adapter(kohya)
    with pytest.raises(AdapterError, match="sd15.diffusers.safetensors"):
        pv.load_adapter(diffusers)


def test_sd2_v_prediction_trains_and_exports(tiny_sd2, tmp_path, train_capturing):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    live, final = train_capturing(config(tiny_sd2, tmp_path, "output.name=\"sd2\""), run)
    assert live.prediction_type == "v_prediction"
    start = next(e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["type"] == "start")
    assert (start["base_kind"], start["prediction_type"]) == ("sd2", "v_prediction")
    with safe_open(str(run / "sd2.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"]) == ("sd_v2", "True", "True")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert all(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_text_model"))
               for k in keys)
    reference = latents(live.pipeline())
    for path in (final, run / "sd2.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(path))
        assert rel(latents(pipe), reference) < 1e-4, path.name


@pytest.mark.parametrize("preset", ["sdxl-style", "sd2-style"])
def test_sdxl_and_sd2_presets_train_on_tiny_bases(preset, tiny_sdxl, tiny_sd2, tmp_path):
    """The shipped presets as they are (gradient checkpointing, noise offset, min-SNR, latent cache; SDXL: UNet only
    with the text embeddings + pooled embeddings cached), only pointed at a tiny base and shrunk to 2 steps."""
    from trainer.config import load_config, load_preset
    from trainer.training.loop import train

    cfg = load_preset(preset)
    assert cfg.data.resolution == (1024 if preset == "sdxl-style" else 768)
    assert cfg.lora.train_text_encoder is (preset == "sd2-style")  # SDXL: UNet only by default
    base = tiny_sdxl if preset == "sdxl-style" else tiny_sd2
    cfg = load_config(ROOT / "presets" / f"{preset}.toml", [
        f'model.path="{base}"', f'data.path="{TINY_STYLE}"', f'output.dir="{tmp_path}"', "train.steps=2",
        "data.resolution=64", "data.bucket_step=16", "data.min_bucket=32", "data.max_bucket=128",
        "data.min_image_size=16", "data.shuffle_captions=false", "data.caption_dropout=0.0",
        "train.save_every=0", "train.checkpoint_every=0", "sample.every=0", "sample.steps=2"])
    final = train(cfg, tmp_path / "run")
    with safe_open(str(final), "pt") as f:
        parts = {k.split(".")[0] for k in f.keys()}
    assert parts == ({"unet"} if preset == "sdxl-style" else {"unet", "text_encoder"})
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events if e["type"] in ("samples", "done")] == ["samples", "done"]
    assert all(e["loss"] == e["loss"] for e in events if e["type"] == "step")  # finite, not NaN


def test_ui_shows_the_detected_base_without_loading_it(tiny_sdxl, tiny_sd2, tmp_path):
    from safetensors.torch import save_file

    from app import form, jobs
    from app.ui import panel_markdown

    assert "SDXL, epsilon-prediction" in form.describe_base(str(tiny_sdxl))
    assert "SD 2.x, v-prediction" in form.describe_base(str(tiny_sd2))
    assert "SD 1.x" in form.describe_base("builtin:tiny-sd15")
    assert "detected when the run loads it" in form.describe_base("someone/some-model")
    xl_file, sd2_file = tmp_path / "xl.safetensors", tmp_path / "sd2.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, xl_file)
    save_file({"cond_stage_model.model.ln_final.weight": torch.zeros(1)}, sd2_file)
    assert "SDXL" in form.describe_base(str(xl_file)) and "SD 2.x" in form.describe_base(str(sd2_file))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    assert "junk.safetensors: not a readable" in form.describe_base(str(tmp_path / "junk.safetensors"))
    (tmp_path / "short.safetensors").write_bytes(b"ab")
    assert "short.safetensors: not a readable" in form.describe_base(str(tmp_path / "short.safetensors"))

    from app.preview import base_size  # the preview's width/height follow the base's own resolution

    assert (base_size(str(tiny_sdxl)), base_size("builtin:demo-sd"), base_size("someone/some-model")) == (64, 32, None)

    events = [{"type": "start", "images": 3, "device": "cpu", "precision": "no", "base_kind": "sd2",
               "prediction_type": "v_prediction"}]
    status = jobs.RunStatus(run_dir=tmp_path / "r", state="running", events=events)
    assert "SD 2.x, v-prediction" in panel_markdown(status)


def test_sdxl_text_projection_uses_comfyuis_key_both_ways(tiny_sdxl, tmp_path):
    """SDXL's second encoder has its projection beside the text model: ComfyUI's key map names it
    `lora_te2_text_projection` (clip_g.transformer.text_projection), diffusers `text_encoder_2.text_projection`."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from trainer.lora_files.export import save_diffusers_lora
    from trainer.lora_files.convert import convert_file
    from trainer.lora_files.kohya import save_kohya_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    te2 = pipe.text_encoder_2
    te2.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=["text_projection", "q_proj", "k_proj", "v_proj",
                                                                      "out_proj"]))
    g = torch.Generator().manual_seed(0)
    for name, p in te2.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    want = te2.text_projection.get_delta_weight("default")
    kohya = save_kohya_lora(tmp_path / "k.safetensors", {"text_encoder_2": te2}, {}, kind="sdxl")
    diffusers = save_diffusers_lora(tmp_path / "d.safetensors", {"text_encoder_2": te2})
    assert {k for k in load_file(kohya) if "projection" in k} == {
        f"lora_te2_text_projection.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {k for k in load_file(diffusers) if "projection" in k} == {
        f"text_encoder_2.text_projection.lora_{s}.weight" for s in "AB"}
    # both directions of convert, and files written with the old spelling still read
    assert load_file(convert_file(kohya, tmp_path / "kd.safetensors", "diffusers")).keys() == load_file(diffusers).keys()
    assert load_file(convert_file(diffusers, tmp_path / "dk.safetensors", "kohya")).keys() == load_file(kohya).keys()
    legacy = {k.replace("lora_te2_text_projection", "lora_te2_text_model_text_projection"): v
              for k, v in load_file(kohya).items()}
    save_file(legacy, tmp_path / "legacy.safetensors")
    assert load_file(convert_file(tmp_path / "legacy.safetensors", tmp_path / "ld.safetensors", "diffusers")).keys() \
        == load_file(diffusers).keys()
    # both files load in diffusers with the trained ΔW on the projection
    for path in (kohya, diffusers):
        loaded = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        loaded.load_lora_weights(str(path), adapter_name="x")
        got = loaded.text_encoder_2.text_projection.get_delta_weight("x")
        assert rel(got, want) < 1e-5, path.name
