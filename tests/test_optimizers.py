"""train.optimizer: each optimizer trains on the tiny base and resumes from the pickle-free checkpoint exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

import trainer.training.checkpoint as ck
import trainer.training.loop as loop
from trainer.config import ConfigError, TrainConfig, LoraConfig
from trainer.training.optimizers import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEW = ["prodigy", "adafactor", "lion"]  # adamw8bit needs CUDA (tests/test_gpu.py); adamw: tests/test_train.py
LR = {"prodigy": 1.0, "adafactor": 1e-3, "lion": 1e-4}


def tiny_parts(seed: int):
    torch.manual_seed(seed)
    unet = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Conv2d(4, 4, 3))  # 2-D (factored) and 4-D weights
    text = torch.nn.Linear(4, 3)
    return {"unet": unet, "text_encoder": text}


def step(modules, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in modules.values():
        for p in module.parameters():
            p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NEW + ["adamw"])
def test_optimizer_state_round_trips_exactly_through_the_checkpoint(name, tmp_path):
    tc = TrainConfig(optimizer=name, lr_unet=LR.get(name, 1e-3), lr_text_encoder=LR.get(name, 1e-3), warmup_steps=0)

    def fresh():
        modules = tiny_parts(0)
        opt = build_optimizer(tc, LoraConfig(), [(m, tc.lr_unet) for m in modules.values()], fused=False)
        return modules, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    modules, opt, sched = fresh()
    for s in range(3):
        step(modules, opt, s)
        sched.step()
    folder = ck.save_checkpoint(tmp_path / "step-000003", 3, modules, opt, sched)
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in folder.iterdir())
    json.loads((folder / ck.STATE_FILE).read_text())  # param groups (Prodigy's d, Adafactor's flags) are JSON

    again, opt2, sched2 = fresh()
    assert ck.load_checkpoint(folder, again, opt2, sched2)[0] == 3
    want, got = opt.state_dict(), opt2.state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert want["state"].keys() == got["state"].keys() and want["state"]
    for idx, slots in want["state"].items():
        assert slots.keys() == got["state"][idx].keys()
        for key, value in slots.items():
            other = got["state"][idx][key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype and torch.equal(value, other), (name, idx, key)
            else:
                assert value == other, (name, idx, key)
    for s in range(3, 5):  # the resumed optimizer continues bit for bit
        step(modules, opt, s)
        step(again, opt2, s)
    for part in modules:
        for p, q in zip(modules[part].parameters(), again[part].parameters()):
            assert torch.equal(p, q), name


@pytest.mark.parametrize("name", NEW)
def test_optimizer_trains_and_resumes_to_the_same_weights(name, make_cfg, tmp_path):
    common = ("train.steps=4", "train.checkpoint_every=2", f'train.optimizer="{name}"', "lora.dropout=0.1",
              f"train.lr_unet={LR[name]}", f"train.lr_text_encoder={LR[name]}")
    straight = load_file(loop.train(make_cfg(*common), tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    resumed = load_file(loop.train(make_cfg(*common, f'train.resume="{checkpoint}"'), tmp_path / "resumed"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    at_two = load_file(checkpoint / "lora.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    assert at_two[key].abs().max() > 0 and not torch.equal(at_two[key], straight[key.replace(".default", "")])


def test_adamw8bit_is_refused_without_cuda_before_loading(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="adamw8bit needs a CUDA GPU"):
        loop.train(make_cfg('train.optimizer="adamw8bit"'), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_optimizer_settings_that_cannot_work_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="lr_text_encoder"):
        make_cfg('train.optimizer="prodigy"', "train.lr_unet=1.0", "train.lr_text_encoder=0.5")
    with pytest.raises(ConfigError, match="loraplus"):
        make_cfg('train.optimizer="prodigy"', 'lora.variant="loraplus"', "train.lr_unet=1.0",
                 "train.lr_text_encoder=1.0")
    with pytest.raises(ConfigError, match="lorafa"):
        make_cfg('train.optimizer="lion"', 'lora.variant="lorafa"')
    with pytest.raises(ConfigError, match="optimizer"):
        make_cfg('train.optimizer="sgd"')
    make_cfg('train.optimizer="prodigy"', "train.lr_unet=1.0", "lora.train_text_encoder=false")  # one part: fine


@pytest.mark.gpu
def test_adamw8bit_trains_and_resumes_on_cuda(make_cfg, tmp_path):
    """bitsandbytes' 8-bit AdamW on a GPU (uint8 states and their quantisation maps go through the pickle-free
    checkpoint); skipped without CUDA, and without bitsandbytes (the optional [cuda] extra)."""
    pytest.importorskip("bitsandbytes")
    common = ("train.steps=4", "train.checkpoint_every=2", 'train.optimizer="adamw8bit"', "lora.dropout=0.0",
              'train.fast="off"', 'train.mixed_precision="no"')
    straight = load_file(loop.train(make_cfg(*common), tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    assert any(t.dtype == torch.uint8 for t in load_file(checkpoint / "optimizer.safetensors").values())
    resumed = load_file(loop.train(make_cfg(*common, f'train.resume="{checkpoint}"'), tmp_path / "resumed"))
    assert resumed.keys() == straight.keys()
    for key in straight:  # CUDA kernels: bit-exact is not promised, the same trajectory is
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)
