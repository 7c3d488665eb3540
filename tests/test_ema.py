"""train.ema: the saved adapter is the EMA of the raw weights, the checkpoints keep both, and resuming is exact."""

import pytest
import torch
from safetensors.torch import load_file

import trainer.training.loop as loop

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DECAY = 0.6  # small, so that the average of 4 steps is far from the last weights


def file_name(param: str) -> str:
    """checkpoint parameter name -> diffusers-file key (no adapter name; text encoder with `text_model.`)."""
    name = param.replace(".default.", ".")
    return name.replace("text_encoder.", "text_encoder.text_model.", 1) if name.startswith("text_encoder.") else name


def test_saved_adapter_is_the_ema_of_the_raw_weights(make_cfg, train_capturing, tmp_path):
    cfg = make_cfg("train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.ema=true",
                   f"train.ema_decay={DECAY}", "train.lr_unet=5e-3", "train.lr_text_encoder=5e-3")
    base, final = train_capturing(cfg, tmp_path / "run")
    raw = [load_file(tmp_path / "run" / "checkpoints" / f"step-{s:06d}" / "lora.safetensors") for s in range(1, 5)]
    extra = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "extra.safetensors")
    assert int(extra["ema_state.optimization_step"]) == 4

    # diffusers' EMA with warmup, written out: step n (1-based) uses decay min(1 − (1 + (n − 1))^(−2/3), ema_decay),
    # and 0 (a copy) at n = 1
    names = [k for k in raw[0] if "lora_" in k and (".lora_A." in k or ".lora_B." in k)]
    ema = {k: raw[0][k].double() for k in names}
    for n, weights in enumerate(raw[1:], start=2):
        decay = min(1 - (1 + (n - 1)) ** (-2 / 3), DECAY)
        for k in names:
            ema[k] -= (1 - decay) * (ema[k] - weights[k].double())
    saved = load_file(final)
    moved = 0
    for k in names:
        torch.testing.assert_close(saved[file_name(k)].double(), ema[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(extra["ema." + k].double(), ema[k], rtol=1e-5, atol=1e-7)
        moved += not torch.allclose(saved[file_name(k)], raw[-1][k], atol=1e-6)
    assert moved > len(names) // 2, "the EMA differs from the last raw weights"

    # the live model keeps the raw weights (they go on training after every save)
    live = {f"unet.{n}": p.detach() for n, p in base.unet.named_parameters() if "lora_" in n}
    for k, v in live.items():
        assert torch.equal(v, raw[-1][k]), k


def test_ema_resumes_exactly(make_cfg, tmp_path):
    common = ("train.steps=4", "train.checkpoint_every=2", "train.ema=true", f"train.ema_decay={DECAY}",
              "lora.dropout=0.1")
    straight = load_file(loop.train(make_cfg(*common), tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    resumed = load_file(loop.train(make_cfg(*common, f'train.resume="{checkpoint}"'), tmp_path / "resumed"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    last = "checkpoints/step-000004/extra.safetensors"
    a, b = load_file(tmp_path / "straight" / last), load_file(tmp_path / "resumed" / last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="no EMA weights"):  # a checkpoint written without EMA
        plain = tmp_path / "plain"
        loop.train(make_cfg("train.steps=2", "train.checkpoint_every=1"), plain)
        loop.train(make_cfg("train.steps=3", "train.ema=true", f'train.resume="{plain}/checkpoints/step-000002"'),
                   tmp_path / "again")
