"""Validation: held-out images, a loss at fixed timesteps and noise, the UI's plot rows, train.keep_best, resume."""

import shutil

import pytest
from safetensors import safe_open

import trainer.training.loop as loop
from app.loss_view import last_validation, loss_rows
from tests.conftest import TINY_STYLE
from trainer.config import ConfigError
from trainer.events import read_events

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def events_of(run_dir, kind=None):
    events, _ = read_events(run_dir / "events.jsonl")
    return [e for e in events if kind is None or e["type"] == kind]


def test_split_fixed_noise_loss_and_plot_rows(make_cfg, tmp_path):
    # learning rate 0: the adapter never changes (B stays zero), so a loss at fixed timesteps and noise must repeat
    frozen = make_cfg("train.steps=4", "data.validation_split=0.25", "train.validation_every=2",
                      "train.lr_unet=0.0", "train.lr_text_encoder=0.0")
    loop.train(frozen, tmp_path / "frozen")
    held = events_of(tmp_path / "frozen", "validation_set")
    assert held and (held[0]["images"], held[0]["training_images"]) == (3, 9)  # 12 images, a quarter held out
    assert events_of(tmp_path / "frozen", "start")[0]["images"] == 9  # the held-out ones do not train
    values = [e["loss"] for e in events_of(tmp_path / "frozen", "validation")]
    assert [e["step"] for e in events_of(tmp_path / "frozen", "validation")] == [2, 4]
    assert values[0] == values[1] and values[0] > 0

    # a training run: the same held-out images (seeded), the loss moves, and the plot gets both series
    loop.train(make_cfg("train.steps=4", "data.validation_split=0.25", "train.validation_every=2",
                        "train.lr_unet=1e-2", "train.lr_text_encoder=1e-2"), tmp_path / "trained")
    trained = events_of(tmp_path / "trained", "validation")
    assert [e["step"] for e in trained] == [2, 4] and trained[0]["loss"] != values[0]
    rows = loss_rows(events_of(tmp_path / "trained"))
    assert [r for r in rows if r[2] == "validation"] == [(2, trained[0]["loss"], "validation"),
                                                          (4, trained[1]["loss"], "validation")]
    assert [r[0] for r in rows if r[2] == "train"] == [1, 2, 3, 4]
    assert "val loss" in last_validation(events_of(tmp_path / "trained"))


def test_keep_best_and_resume(make_cfg, tmp_path):
    common = ("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5", "train.validation_every=1",
              "train.keep_best=true", "data.validation_split=0.25", "train.lr_unet=3e-2", "train.lr_text_encoder=3e-2", "lora.dropout=0.1")
    loop.train(make_cfg(*common), tmp_path / "straight")
    validation = events_of(tmp_path / "straight", "validation")
    assert [e["step"] for e in validation] == [1, 2, 3, 4, 5, 6]
    best = min(validation, key=lambda e: e["loss"])
    assert validation[-1]["best_step"] == best["step"] and validation[-1]["best_loss"] == best["loss"]
    lows = [e["step"] for i, e in enumerate(validation) if all(e["loss"] < v["loss"] for v in validation[:i])]
    assert [e["step"] for e in events_of(tmp_path / "straight", "best")] == lows
    kohya = tmp_path / "straight" / "tiny-test-best.safetensors"
    assert (tmp_path / "straight" / "tiny-test-best.diffusers.safetensors").is_file()
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["ss_steps"] == str(best["step"])

    # resumed from step 2, the run remembers the best so far and validates exactly as the straight run did
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    loop.train(make_cfg(*common, f'train.resume="{checkpoint}"'), tmp_path / "resumed")
    again = events_of(tmp_path / "resumed", "validation")
    assert [(e["step"], e["loss"], e["best_loss"], e["best_step"]) for e in again] == [
        (e["step"], e["loss"], e["best_loss"], e["best_step"]) for e in validation[2:]]


def test_separate_validation_folder(make_cfg, tmp_path):
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    for image in sorted(TINY_STYLE.glob("*.png"))[:2]:
        shutil.copy(image, held_out / image.name)
    loop.train(make_cfg("train.steps=2", f'data.validation_path="{held_out}"'), tmp_path / "run")
    assert events_of(tmp_path / "run", "validation_set")[0]["images"] == 2
    assert events_of(tmp_path / "run", "start")[0]["images"] == 12
    assert [e["step"] for e in events_of(tmp_path / "run", "validation")] == [2]  # every = 0: at the end


def test_validation_settings_that_cannot_work_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="held-out"):
        make_cfg("train.keep_best=true")
    with pytest.raises(ConfigError, match="held-out"):
        make_cfg("train.validation_every=5")
    with pytest.raises(ConfigError, match="not both"):
        make_cfg("data.validation_split=0.1", 'data.validation_path="x"')
