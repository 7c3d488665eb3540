"""data.masked_loss: a masked-out area gives no gradient at all, and a fully masked-out image cannot change the LoRA."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import trainer.training.loop as loop
from trainer.data.dataset import DatasetError
from trainer.events import read_events

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_images(folder, count: int, mode: str = "RGB", alpha: int = 255, sidecar_half: bool = False):
    """Random 64×64 images with captions; optional alpha, optional `name.mask.png` with the left half black."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels, "RGB")
        if mode == "RGBA":
            image.putalpha(alpha)
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a pattern", encoding="utf-8")
        if sidecar_half:
            mask = Image.new("L", (64, 64), 255)
            mask.paste(0, (0, 0, 32, 64))
            mask.save(folder / f"img{i}.mask.png")
    return folder


def settings(data, *extra):
    return (f'data.path="{data}"', "data.flip=false", "data.masked_loss=true", "train.lr_unet=1e-2",
            "train.lr_text_encoder=1e-2", *extra)


def test_masked_out_pixels_give_no_gradient(make_cfg, tmp_path, monkeypatch):
    data = make_images(tmp_path / "data", 4, sidecar_half=True)
    grads, real = [], loop.load_base

    def spy(*args, **kwargs):  # record the gradient that reaches the UNet's prediction
        base = real(*args, **kwargs)

        def hook(module, inputs, output):
            if output.sample.requires_grad:
                output.sample.register_hook(lambda g: grads.append(g.detach().clone()))
        base.unet.register_forward_hook(hook)
        return base

    monkeypatch.setattr(loop, "load_base", spy)
    loop.train(make_cfg(*settings(data, "train.steps=2")), tmp_path / "run")
    events, _ = read_events(tmp_path / "run" / "events.jsonl")
    start = next(e for e in events if e["type"] == "start")
    assert start["images"] == 4, "img*.mask.png are masks, not training images"
    assert not [e for e in events if e["type"] == "warning"]
    assert len(grads) == 2
    for grad in grads:
        half = grad.shape[-1] // 2
        assert torch.count_nonzero(grad[..., :half]) == 0, "the black half of the mask gives no gradient"
        assert torch.count_nonzero(grad[..., half:]) == grad[..., half:].numel(), "the white half trains"


def test_fully_masked_out_images_are_refused_before_training(make_cfg, tmp_path, monkeypatch):
    """Every mask empty: the run would end `done` with every loss 0.0 and lora_B exactly zero; it is refused up
    front instead, before the model loads."""
    data = make_images(tmp_path / "transparent", 4, mode="RGBA", alpha=0)  # the alpha channel is the mask
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(DatasetError, match="every mask is empty .*img0.png"):
        loop.train(make_cfg(*settings(data, "train.steps=3")), tmp_path / "run")
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_an_image_with_an_empty_mask_is_skipped_and_named(make_cfg, tmp_path):
    data = make_images(tmp_path / "data", 3, sidecar_half=True)
    Image.new("L", (64, 64), 0).save(data / "img2.mask.png")
    final = load_file(loop.train(make_cfg(*settings(data, "train.steps=2")), tmp_path / "run"))
    events, _ = read_events(tmp_path / "run" / "events.jsonl")
    start = next(e for e in events if e["type"] == "start")
    skipped = [e for e in events if e["type"] == "problem" and "mask is empty" in e["reason"]]
    assert start["images"] == 2 and [Path(e["path"]).name for e in skipped] == ["img2.mask.png"]
    assert any(torch.count_nonzero(v) > 0 for k, v in final.items() if ".lora_B." in k), "the others train"


def test_images_without_a_mask_train_whole_and_are_named(make_cfg, tmp_path):
    data = make_images(tmp_path / "data", 3, sidecar_half=True)
    make_images(tmp_path / "plain", 1)
    (tmp_path / "plain" / "img0.png").rename(data / "plain.png")
    loop.train(make_cfg(*settings(data, "train.steps=1")), tmp_path / "run")
    events, _ = read_events(tmp_path / "run" / "events.jsonl")
    warnings = [e["reason"] for e in events if e["type"] == "warning"]
    assert len(warnings) == 1 and "1 image(s) have no mask" in warnings[0] and "plain.png" in warnings[0]
