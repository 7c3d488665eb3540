"""Hardening, round 3 (issue 30), files, settings and messages: every LoRA module's shapes checked wherever a file
is read, held-out validation folders, Prodigy's learning rates, captioner load errors and the messages that must say
what to do. (tests/test_hardening3.py holds the dataset tools and masks.) Each test reproduces a reported case as an
instance of its rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer.cli import main
from tests.conftest import ROOT, one_line

PRESET = ROOT / "presets" / "tiny-test.toml"


# ----------------------------------------------------------------------------- major 4: every module's shapes

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def kohya_file(path: Path, down: tuple, up: tuple) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({f"{KEY}.lora_down.weight": np.full(down, 0.01, dtype=np.float32),
               f"{KEY}.lora_up.weight": np.full(up, 0.01, dtype=np.float32),
               f"{KEY}.alpha": np.array(4.0, dtype=np.float32)}, str(path))
    return path


def test_convert_refuses_a_module_whose_ranks_disagree(tmp_path, capsys):
    src = kohya_file(tmp_path / "broken.safetensors", (7, 35), (32, 4))
    for to in ("diffusers", "kohya"):
        code = main(["convert", str(src), str(tmp_path / f"out-{to}.safetensors"), "--to", to])
        line = one_line(capsys.readouterr().err)
        assert code == 2 and f"module {KEY}: down [7, 35] has rank 7 but up [32, 4] has rank 4" in line
        assert not (tmp_path / f"out-{to}.safetensors").exists()


def test_convert_with_a_model_refuses_a_module_that_does_not_fit_the_base(tiny_base, tmp_path):
    from diffusers import UNet2DConditionModel

    from trainer.lora_files.convert import convert_file

    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    weight = tuple(unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight.shape)
    src = kohya_file(tmp_path / "other-base.safetensors", (4, weight[1] + 3), (weight[0], 4))  # consistent, wrong base
    convert_file(src, tmp_path / "unchecked.safetensors", "diffusers")  # without a model only the ranks can be checked
    with pytest.raises(ValueError, match=r"module unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q: "
                                         r"down \[4, \d+\] / up \[\d+, 4\] do not fit the base model's weight"):
        convert_file(src, tmp_path / "out.safetensors", "diffusers", model={"unet": unet})
    assert not (tmp_path / "out.safetensors").exists()
    good = kohya_file(tmp_path / "good.safetensors", (4, weight[1]), (weight[0], 4))
    assert convert_file(good, tmp_path / "good-out.safetensors", "diffusers", model={"unet": unet}).is_file()


@pytest.mark.parametrize("tensors, says", [
    ({f"{KEY}.lora_down.weight": ("int64", (4, 320)), f"{KEY}.lora_up.weight": ("float32", (320, 4))},
     f"tensor {KEY}.lora_down.weight holds int64 values"),
    ({f"{KEY}.lora_down.weight": ("float32", (0, 320)), f"{KEY}.lora_up.weight": ("float32", (320, 0))},
     "have rank 0 (empty tensors)"),
    ({f"{KEY}.lora_down.weight": ("float32", (4, 320)), f"{KEY}.lora_up.weight": ("float32", (320, 4)),
      f"{KEY}.dora_scale": ("float32", (5, 1))}, "dora_scale (5, 1) is decomposed on the input axis"),
], ids=["integer-weights", "rank-0", "dora-scale-input-axis"])
def test_convert_names_the_file_and_the_problem(tensors, says, tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "odd.safetensors"
    save_file({k: np.ones(shape, dtype=dtype) for k, (dtype, shape) in tensors.items()}, str(src))
    code = main(["convert", str(src), str(tmp_path / "out.safetensors"), "--to", "diffusers"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and str(src) in line and says in line and "Traceback" not in line
    assert not (tmp_path / "out.safetensors").exists()


def test_a_broken_adapter_upload_is_refused_from_its_header_before_any_worker(tmp_path, monkeypatch):
    from app import preview_client
    from trainer.lora_files.convert import read_adapter_file

    src = kohya_file(tmp_path / "broken.safetensors", (7, 35), (32, 4))
    monkeypatch.setattr(preview_client, "get_worker", lambda *a, **k: pytest.fail("a worker was asked to load it"))
    with pytest.raises(preview_client.PreviewError, match=f"broken.safetensors: module {KEY}: down .* has rank 7"):
        preview_client.upload(tmp_path / "outputs", src, "builtin:demo-sd")
    assert not list((tmp_path / "outputs").rglob("*.safetensors"))
    with pytest.raises(ValueError, match=f"module {KEY}: down .* has rank 7"):  # the worker's own reader, and convert
        read_adapter_file(src)


# ----------------------------------------------------------------------------- minor: data.validation_path


@pytest.mark.parametrize("where, says", [
    ("missing", "data.validation_path: folder '{path}' does not exist"),
    ("same", "data.validation_path: '{path}' and data.path '{data}' must not contain one another"),
    ("inside", "data.validation_path: '{path}' and data.path '{data}' must not contain one another"),
])
def test_validation_path_errors_name_it_and_it_must_be_held_out(where, says, tmp_path, capsys, monkeypatch):
    import shutil

    import trainer.training.loop as loop
    from tests.conftest import TINY_STYLE

    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    data = tmp_path / "data"
    shutil.copytree(TINY_STYLE, data)
    path = {"missing": tmp_path / "nowhere", "same": data, "inside": data / "held"}[where]
    if where == "inside":
        path.mkdir()
        shutil.copy(next(data.glob("*.png")), path / "held.png")
    code = main(["train", str(PRESET), "--set", f'data.path="{data}"', "--set", f'data.validation_path="{path}"',
                 "--set", f'output.dir="{tmp_path / "out"}"'])
    err = capsys.readouterr().err
    assert code == 2 and says.format(path=path, data=data) in err, err


# ----------------------------------------------------------------------------- minor: Prodigy with a shipped preset


@pytest.mark.parametrize("preset", sorted((PRESET.parent).glob("*.toml")), ids=lambda p: p.stem)
def test_choosing_prodigy_sets_its_learning_rates_unless_the_user_set_them(preset):
    from trainer.config import ConfigError, load_config

    for how in ("override", "ui"):
        cfg = (load_config(preset, ["train.optimizer=prodigy"]) if how == "override"
               else load_config(preset, extra={"train": {"optimizer": "prodigy"}}))
        assert (cfg.train.optimizer, cfg.train.lr_unet, cfg.train.lr_text_encoder) == ("prodigy", 1.0, 1.0)
    cfg = load_config(preset, ["train.optimizer=prodigy", "train.lr_unet=0.5", "train.lr_text_encoder=0.5"])
    assert (cfg.train.lr_unet, cfg.train.lr_text_encoder) == (0.5, 0.5)  # set by the user: kept
    with pytest.raises(ConfigError, match="prodigy needs one learning rate"):  # an explicit conflict: still refused
        load_config(preset, ["train.optimizer=prodigy", "lora.train_unet=true", "lora.train_text_encoder=true",
                             "train.lr_unet=1.0", "train.lr_text_encoder=0.5"])


# ----------------------------------------------------------------------------- minor: captioner load errors


@pytest.fixture(scope="module")
def tiny_captioners(tmp_path_factory) -> dict[str, Path]:
    from tests.tiny_captioners import build_tiny_blip, build_tiny_vision_encoder_decoder

    root = tmp_path_factory.mktemp("captioners")
    return {"blip": build_tiny_blip(root / "blip"), "ved": build_tiny_vision_encoder_decoder(root / "ved")}


def broken_captioner(case: str, good: dict[str, Path], root: Path) -> Path:
    """The reported captioners: a copy of a tiny good one with one thing broken."""
    import json
    import shutil

    from tests.tiny_captioners import build_tiny_tagger

    if case == "huge-tagger":
        return build_tiny_tagger(root / "tagger", size=20000, batch=1) / "model.onnx"
    model = root / "a" / "b" / case  # '../../etc/passwd' from here is root/a/etc/passwd, which exists
    shutil.copytree(good["ved" if case == "ved-no-tokenizer" else "blip"], model)
    if case == "header-too-small":
        (model / "model.safetensors").write_bytes(b"\x01\x00")
    elif case == "shard-escapes":
        (root / "a" / "etc").mkdir()
        (root / "a" / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"text_decoder.cls.predictions.bias": "../../etc/passwd"}}))
    else:  # no tokenizer: transformers then builds one that knows only its special tokens, so captions are empty
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (model / name).unlink(missing_ok=True)
    return model


@pytest.mark.parametrize("case, says", [
    ("header-too-small", "b/header-too-small/model.safetensors: not a readable .safetensors file (too short for one); "
                         "the weights file is broken, download it again"),
    ("shard-escapes", "shard-escapes/model.safetensors.index.json: shard '../../etc/passwd' is not a .safetensors "
                      "file name in the model's folder"),
    ("huge-tagger", "tagger/model.onnx: input size 20000x20000 px is not a square of at most 2048 px"),
    ("blip-no-tokenizer", "blip-no-tokenizer: no tokenizer (tokenizer.json, or vocab files"),
    ("ved-no-tokenizer", "ved-no-tokenizer: no tokenizer (tokenizer.json, or vocab files"),
])
def test_captioner_load_errors_name_the_file_and_the_problem(case, says, tiny_captioners, tmp_path, capsys):
    model = broken_captioner(case, tiny_captioners, tmp_path / "models")
    data = tmp_path / "data"
    data.mkdir()
    for n in range(3):
        Image.new("RGB", (32, 32), (40 * n, 0, 0)).save(data / f"{n}.png")
    code = main(["caption", str(data), "--model", str(model), "--device", "cpu"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and says in line, line
    assert line.count("no tokenizer") <= 1 and not list(data.glob("*.txt"))  # refused at load, not once per image


# ----------------------------------------------------------------------------- minor: messages that say what to do


@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line_that_says_what_to_do(make_cfg, tmp_path):
    """A value that must be one number (a step, the best loss) holding several was torch's "only one element
    tensors can be converted to Python scalars"; weights of another shape were "The size of tensor a ...". """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import trainer.training.loop as loop

    common = ("train.checkpoint_every=2", "train.validation_every=1", "data.validation_split=0.25", "train.ema=true")
    loop.train(make_cfg("train.steps=2", *common), tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoints" / "step-000002"
    extra, weights = load_file(checkpoint / "extra.safetensors"), load_file(checkpoint / "lora.safetensors")
    name = sorted(weights)[0]
    cases = {"validation.best_loss": ("extra", {**extra, "validation.best_loss": torch.ones(3)}),
             "ema_state.optimization_step": ("extra", {**extra, "ema_state.optimization_step": torch.ones(2, 2)}),
             name: ("lora", {**weights, name: torch.zeros(weights[name].shape[0] + 1, *weights[name].shape[1:])})}
    says = {"validation.best_loss": "'validation.best_loss' holds 3 values where one number belongs",
            "ema_state.optimization_step": "'ema_state.optimization_step' holds 4 values where one number belongs",
            name: f"{name} has shape"}
    for n, (key, (file, tensors)) in enumerate(cases.items()):
        broken = shutil.copytree(checkpoint, tmp_path / f"broken-{n}")
        save_file(tensors, broken / f"{file}.safetensors")
        with pytest.raises(ValueError) as err:
            loop.train(make_cfg("train.steps=4", *common, f'train.resume="{broken}"'), tmp_path / f"resumed-{n}")
        message = str(err.value)
        assert "\n" not in message and says[key] in message, message
        assert "leave train.resume empty to start over" in message and "only one element" not in message


def test_a_lora_alpha_that_is_not_one_number_is_named_not_torch_s_scalar_error(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "alpha.safetensors"
    save_file({f"{KEY}.lora_down.weight": np.full((4, 32), 0.01, dtype=np.float32),
               f"{KEY}.lora_up.weight": np.full((32, 4), 0.01, dtype=np.float32),
               f"{KEY}.alpha": np.array([4.0, 4.0], dtype=np.float32)}, str(src))
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--to", "diffusers"]) == 2
    assert f"module {KEY}: alpha has shape [2]; it must be one number" in one_line(capsys.readouterr().err)


def test_a_preview_request_without_a_prompt_says_what_to_send(tiny_base, tmp_path):
    from app import preview_client as client

    outputs = tmp_path / "outputs"
    out = str(outputs / ".preview" / "x.png")
    worker = client.Worker(str(tiny_base), outputs)
    try:
        bad = {"generate": ({"out": out}, "generate: the request needs a text 'prompt', e.g. {\"op\": \"generate\""),
               "grid": ({"prompt": "a cat"}, "grid: the request needs a text 'out'"),
               "compare": ({"prompt": "a cat", "out": out, "steps": "many"}, "'steps' is 'many'; give an integer"),
               "load": ({}, 'load: give the adapter file as "path"')}
        for op, (fields, says) in bad.items():
            with pytest.raises(client.PreviewError) as err:
                worker.request(op, **fields)
            assert says in str(err.value) and "TypeError" not in str(err.value) and "\n" not in str(err.value)
        assert worker.alive()
        drawn = worker.request("generate", prompt="", out=out, steps=1, width=32, height=32)  # an empty prompt draws
        assert Path(drawn["image"]).is_file()
    finally:
        worker.close()
