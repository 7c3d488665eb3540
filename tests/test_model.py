"""Base-model loading: every kind of model.path gets either a loaded model or a message naming it."""

import pytest
import torch
from safetensors.torch import save_file

from trainer.config import LoraConfig, ModelConfig
from trainer.adapters.attach import attach_lora
from trainer.families.loading import ModelError, load_base, resolve_source


def test_folder_loads_and_reads_prediction_type(tiny_base):
    base = load_base(ModelConfig(path=str(tiny_base)))
    assert base.prediction_type == "epsilon" and base.kind == "sd1"
    assert base.noise_scheduler.config.num_train_timesteps == 1000
    vbase = load_base(ModelConfig(path=str(tiny_base), prediction_type="v_prediction"))
    assert vbase.noise_scheduler.config.prediction_type == "v_prediction"


def test_source_kinds(tiny_base, tmp_path):
    assert resolve_source(str(tiny_base)) == ("folder", str(tiny_base))
    assert resolve_source("stable-diffusion-v1-5/stable-diffusion-v1-5")[0] == "hub"
    ckpt = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, ckpt)
    assert resolve_source(str(ckpt)) == ("file", str(ckpt))


@pytest.mark.parametrize("name, content, message", [
    ("model.ckpt", b"pickle", "pickles"),
    ("weights.bin", b"pickle", "pickles"),
    ("missing.safetensors", None, "no such file or folder"),
    ("notes.txt", b"hello", "expected a .safetensors checkpoint"),
    ("empty_dir", "dir", "not a diffusers pipeline"),
])
def test_bad_paths_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError) as err:
        load_base(ModelConfig(path=str(path)))
    assert str(path) in str(err.value) and message in str(err.value)


def test_unreachable_hub_id_and_junk_single_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="someone/not-here': cannot load.*hub access"):
        load_base(ModelConfig(path="someone/not-here"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="junk.safetensors': cannot load"):
        load_base(ModelConfig(path=str(junk)))


def test_attach_lora_trains_only_adapters(tiny_base):
    base = load_base(ModelConfig(path=str(tiny_base)))
    attach_lora(base, LoraConfig(rank=2, alpha=1.0))
    trainable = [n for n, p in base.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"to_q", "to_k", "to_v", "0"}
    te_trainable = [n for n, p in base.text_encoder.named_parameters() if p.requires_grad]
    assert te_trainable and all("lora_" in n for n in te_trainable)
    assert not any(p.requires_grad for p in base.vae.parameters())
    assert base.unet.peft_config["default"].lora_alpha == 1.0
