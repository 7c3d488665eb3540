"""Component tests on the tiny base: a few real training steps on CPU."""

import math
import shutil
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import trainer.training.loop as loop
from trainer.events import STOP_FILE, read_events


def steps_of(run_dir):
    events, _ = read_events(run_dir / "events.jsonl")
    return [e for e in events if e["type"] == "step"], events


def test_few_steps_move_lora_and_keep_base(make_cfg, tiny_base, tmp_path, train_capturing):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = make_cfg("train.steps=3")
    base, final = train_capturing(cfg, tmp_path / "run")

    steps, events = steps_of(tmp_path / "run")
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) for e in steps)
    assert events[-1]["type"] == "done"
    assert (tmp_path / "run" / "config.toml").is_file()

    tensors = load_file(final)
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert any(k.startswith("unet.") for k in lora_b) and any(k.startswith("text_encoder.") for k in lora_b)
    assert all(v.abs().max() > 0 for v in lora_b.values()), "every LoRA B moved from its zero init"

    # The frozen base weights inside the trained model are bit-identical to the weights on disk.
    for trained, original in ((base.unet, UNet2DConditionModel.from_pretrained(tiny_base / "unet")),
                              (base.text_encoder, CLIPTextModel.from_pretrained(tiny_base / "text_encoder"))):
        reference = dict(original.named_parameters())
        checked = 0
        for name, p in trained.named_parameters():
            if "lora_" in name:
                continue
            assert torch.equal(p.detach().cpu(), reference[name.replace(".base_layer", "")].detach()), name
            checked += 1
        assert checked == len(reference)


def test_adapter_loads_in_diffusers_and_changes_output(make_cfg, tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    final = loop.train(make_cfg("train.steps=3", "train.lr_unet=1e-2", "train.lr_text_encoder=1e-2"), tmp_path / "run")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        out = pipe("zkstyle, a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                   generator=torch.Generator().manual_seed(0))
        return out.images

    before = image()
    pipe.load_lora_weights(str(final), adapter_name="style")
    after = image()
    assert pipe.unet.peft_config["style"].lora_alpha == 4.0  # alpha restored from metadata, not assumed = rank
    assert (before - after).abs().max() > 1e-4
    pipe.set_adapters(["style"], [0.0])
    assert torch.allclose(image(), before, atol=1e-6)


def test_unet_only_vpred_minsnr_offset_accum_checkpointing(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=2", "lora.train_text_encoder=false", "model.prediction_type=\"v_prediction\"",
                   "train.min_snr_gamma=5.0", "train.noise_offset=0.05", "train.grad_accum=2",
                   "train.gradient_checkpointing=true", "train.cache_latents=false",
                   "data.shuffle_captions=false", "data.caption_dropout=0.0")
    final = loop.train(cfg, tmp_path / "run")
    steps, _ = steps_of(tmp_path / "run")
    assert len(steps) == 2 and all(math.isfinite(e["loss"]) for e in steps)
    keys = load_file(final).keys()
    assert keys and all(k.startswith("unet.") for k in keys)


def test_text_encoder_only(make_cfg, tmp_path):
    final = loop.train(make_cfg("train.steps=2", "lora.train_unet=false"), tmp_path / "run")
    keys = load_file(final).keys()
    assert keys and all(k.startswith("text_encoder.") for k in keys)


def test_bad_image_is_reported_and_the_rest_trains(make_cfg, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(__file__).parent.parent / "examples" / "tiny-style", data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    loop.train(make_cfg("train.steps=1", f'data.path="{data}"'), tmp_path / "run")
    _, events = steps_of(tmp_path / "run")
    problems = [e for e in events if e["type"] == "problem"]
    assert [p["path"].endswith("broken.png") for p in problems] == [True]
    assert events[-1]["type"] == "done"


def _stop_at(run_dir, step):
    """Ask the trainer to stop (like the UI's Cancel) once it reports `step`."""
    def watch():
        offset = 0
        deadline = time.time() + 120
        while time.time() < deadline:
            events, offset = read_events(run_dir / "events.jsonl", offset)
            if any(e["type"] == "step" and e["step"] >= step for e in events):
                (run_dir / STOP_FILE).touch()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_stop_and_resume_twice_equals_uninterrupted(make_cfg, tmp_path):
    common = ("train.steps=6", "train.checkpoint_every=0", "lora.dropout=0.1")
    straight = load_file(loop.train(make_cfg(*common), tmp_path / "straight"))

    resumed_dir = tmp_path / "resumed"
    watcher = _stop_at(resumed_dir, 2)
    loop.train(make_cfg(*common), resumed_dir)
    watcher.join()
    _, events = steps_of(resumed_dir)
    assert events[-1]["type"] == "stopped"
    first_stop = events[-1]["step"]
    assert first_stop < 6

    watcher = _stop_at(resumed_dir, first_stop + 2)
    loop.train(make_cfg(*common, 'train.resume="latest"'), resumed_dir)
    watcher.join()
    loop.train(make_cfg(*common, 'train.resume="latest"'), resumed_dir)
    _, events = steps_of(resumed_dir)
    assert [e["type"] for e in events].count("resumed") == 2
    assert events[-1]["type"] == "done" and events[-1]["step"] == 6

    resumed = load_file(resumed_dir / "tiny-test.diffusers.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], atol=1e-6, rtol=0), key
    # Guard against a vacuous pass: the weights saved at the first stop differ from the final ones.
    at_stop = load_file(resumed_dir / "checkpoints" / f"step-{first_stop:06d}" / "lora.safetensors")
    assert not torch.equal(at_stop["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"],
                           resumed["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"])
