"""Hardening, round 3 (issue 30): the dataset tools never touch an image, masks are checked up front, edits never
race. Each test reproduces a reported case as an instance of its rule."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from PIL import Image

from app import dataset_tools as dt
from app import uploads
from trainer.data import caption_edit as ce
from trainer.data.caption import caption_folder
from trainer.cli import main

TAGS = "1girl, solo, smile"


def tags(images: list) -> list[str]:
    return [TAGS] * len(images)


def folder_with_twins(root: Path) -> Path:
    """The reported folder: a.png and a.jpg (an image each), one caption a.txt."""
    root.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(root / "a.png")
    Image.new("RGB", (32, 32), (0, 0, 200)).save(root / "a.jpg")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(root / "b.png")
    (root / "a.txt").write_text("my own caption\n")
    return root


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".caption-undo" not in p.parts}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- critical: images are never captions


@pytest.mark.parametrize("ext, says", [
    (".jpg", "--caption-extension '.jpg' is an image type, so captions would overwrite images"),
    ("png", "--caption-extension '.png' is an image type"),
    (".tiff", "is an image type"),  # any type an image loader claims, not only the trainer's list
    ("./etc/passwd", "--caption-extension './etc/passwd' is not a file extension"),
    (".toml", "is not a caption file type"),  # concept.toml is beside the images
])
def test_captions_are_only_written_to_a_caption_extension(ext, says, tmp_path, capsys):
    root = folder_with_twins(tmp_path / "d")
    before = files(root)
    code = main(["caption", str(root), "--model", str(tmp_path / "tagger.onnx"), "--overwrite",
                 "--caption-extension", ext])
    assert code == 2 and says in one_line(capsys.readouterr().err)
    assert main(["caption", str(root), "--prefix", "zk", "--caption-extension", ext]) == 2
    assert files(root) == before
    with pytest.raises(ce.EditError, match="extension"):
        caption_folder(root, tags, ce.start_undo("x"), overwrite=True, ext=ext)
    assert files(root) == before


def test_an_existing_file_is_replaced_only_when_it_is_a_readable_caption(tmp_path):
    root = folder_with_twins(tmp_path / "d")
    (root / "a.caption").write_bytes((root / "a.jpg").read_bytes())  # binary, under a caption extension
    (root / "b.caption").write_bytes(b"caf\xe9, latin-1\n")  # text we cannot read as UTF-8: never guessed over
    before = files(root)
    result = caption_folder(root, tags, ce.start_undo("x"), overwrite=True, ext=".caption")
    assert sorted(result["bad"]) == [
        "a.jpg: caption a.caption exists and is not a caption we can read as text; not replaced",
        "a.png: caption a.caption exists and is not a caption we can read as text; not replaced",
        "b.png: caption b.caption exists and is not a caption we can read as text; not replaced"]
    assert files(root) == before and result["written"] == []
    (root / "a.caption").write_text("old words\n")
    result = caption_folder(root, tags, ce.start_undo("y"), overwrite=True, ext=".caption")
    assert (root / "a.caption").read_text() == TAGS + "\n" and "a.png" in result["written"]


def test_undo_keeps_a_history_one_journal_per_operation(tmp_path, capsys):
    root = folder_with_twins(tmp_path / "d")
    first = files(root)
    caption_undo = ce.start_undo("caption with tagger")
    caption_folder(root, tags, caption_undo, overwrite=True)
    ce.finish_undo(root, caption_undo)
    after_caption = files(root)
    assert main(["caption", str(root), "--prefix", "zk"]) == 0  # the next command no longer erases the history
    assert main(["caption", str(root), "--suffix", "end"]) == 0
    assert len(list((root / ".caption-undo").glob("*.json"))) == 3
    capsys.readouterr()
    assert main(["caption", str(root), "--undo"]) == 0
    assert main(["caption", str(root), "--undo"]) == 0
    assert files(root) == after_caption
    assert main(["caption", str(root), "--undo"]) == 0
    assert files(root) == first  # the original caption of a.txt is back, b.txt (created) is gone
    out = capsys.readouterr().out
    assert "'suffix end' undone: 2 caption files restored" in out and "'prefix zk' undone" in out
    assert "'caption with tagger' undone: 2 caption files restored" in out
    assert main(["caption", str(root), "--undo"]) == 2 and "nothing to undo" in capsys.readouterr().err
    assert main(["caption", str(root), "--prefix", "zk"]) == 0
    assert main(["caption", str(root), "--clear-undo"]) == 0 and "history cleared (1 steps)" in capsys.readouterr().out
    assert main(["caption", str(root), "--undo"]) == 2


# ----------------------------------------------------------------------------- major 1: edits never race


def run_with_dataset(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    folder_with_twins(run / "dataset")
    return run


def test_a_second_caption_operation_is_refused_while_one_runs(tmp_path, capsys):
    run = run_with_dataset(tmp_path)
    root = run / "dataset"
    before = files(root)
    with ce.caption_lock(root, "caption with tagger"):
        assert main(["caption", str(root), "--prefix", "zk"]) == 2
        assert "captions are being changed by 'caption with tagger'" in one_line(capsys.readouterr().err)
        assert main(["caption", str(root), "--undo"]) == 2
        assert "wait until it finishes" in capsys.readouterr().err
        assert "captions are being changed by 'caption with tagger'" in dt.bulk_edit(run, suffix="end")[0]
        assert "captions are being changed" in dt.undo(run)
        assert "captions are being changed" in uploads.save_captions(run, {"b.png": "typed in the grid"})[0]
        done = []
        thread = threading.Thread(target=lambda: done.append(dt.bulk_edit(run, prefix="zk")))
        thread.start()  # another thread of the server: refused too, not interleaved
        thread.join(10)
        assert "captions are being changed" in done[0][0]
    assert files(root) == before
    assert dt.bulk_edit(run, prefix="zk") == ["prefix zk: 2 captions changed"]  # the lock is released after


def test_undo_restores_exactly_what_the_last_operation_changed_and_says_so(tmp_path):
    run = run_with_dataset(tmp_path)
    root = run / "dataset"
    assert dt.bulk_edit(run, prefix="zk") == ["prefix zk: 2 captions changed"]
    assert dt.bulk_edit(run, suffix="end", only=["b.png"]) == ["suffix end: 1 captions changed"]
    (root / "a.txt").write_text("edited by hand after the prefix\n")
    assert dt.undo(run) == "'suffix end' undone: 1 caption files restored"
    assert (root / "b.txt").read_text() == "zk\n"
    assert dt.undo(run) == ("'prefix zk' undone: 1 caption files restored; 1 changed again since and left as they "
                            "are: a.txt")
    assert (root / "a.txt").read_text() == "edited by hand after the prefix\n" and not (root / "b.txt").exists()
    assert uploads.save_captions(run, {"b.png": "typed in the grid", "a.png": "edited by hand after the prefix"}) == []
    assert dt.undo(run) == "'save captions' undone: 1 caption files restored" and not (root / "b.txt").exists()


# ----------------------------------------------------------------------------- major 5: special files


def test_a_fifo_named_like_an_image_is_skipped_not_opened(tmp_path):
    root = folder_with_twins(tmp_path / "d")
    os.mkfifo(root / "pipe.png")
    results = []
    thread = threading.Thread(target=lambda: results.append(caption_folder(root, tags, ce.start_undo("x"))),
                              daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # the old code blocks in open(): let it go before failing
        fd = os.open(root / "pipe.png", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
    assert results and "pipe.png: not a regular file (a pipe, socket or device)" in results[0]["bad"]
    assert results[0]["written"] == ["b.png"] and sorted(results[0]["kept"]) == ["a.jpg", "a.png"]
    assert stat.S_ISFIFO(os.lstat(root / "pipe.png").st_mode)  # left as it was
    assert "pipe.png" not in [p.name for p in ce.list_images(root)]  # bulk edits and tag tables skip it too


# ----------------------------------------------------------------------------- minor: size limit, umask


def test_bulk_edits_refuse_captions_over_the_read_limit(tmp_path):
    root = folder_with_twins(tmp_path / "d")
    before = files(root)
    changed, problems = ce.bulk_edit(root, lambda c: ce.add_suffix(c, "x" * 70_000), ce.start_undo("big"))
    assert changed == [] and problems and all("larger than 64 KiB" in p for p in problems)
    assert files(root) == before


def test_caption_files_respect_the_umask(tmp_path):
    root = folder_with_twins(tmp_path / "d")
    old = os.umask(0o022)
    try:
        ce.bulk_edit(root, lambda c: ce.add_prefix(c, "zk"), ce.start_undo("p"), create_missing=True)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.glob("*.txt")}
        ce.undo_last(root)
        restored = stat.S_IMODE((root / "a.txt").stat().st_mode)
    finally:
        os.umask(old)
    assert modes == {"a.txt": 0o644, "b.txt": 0o644} and restored == 0o644


# ----------------------------------------------------------------------------- majors 2 and 3: masks checked up front

CORPUS = Path(__file__).parent / "bad_inputs"
PRESET = Path(__file__).parent.parent / "presets" / "tiny-test.toml"


def mask_cases() -> list[dict]:
    import json

    return [c for c in json.loads((CORPUS / "manifest.json").read_text()) if c["where"] == "masks"]


@pytest.mark.parametrize("case", mask_cases(), ids=lambda c: c["name"])
def test_masks_are_checked_when_the_dataset_is_scanned(case):
    from trainer.config import DataConfig
    from trainer.data.dataset import DatasetError, scan_dataset

    folder = CORPUS / "masks" / Path(case["about"]).parent
    mask = CORPUS / "masks" / case["about"]
    if case["expect"] == "refuse":
        with pytest.raises(DatasetError) as err:
            scan_dataset(DataConfig(path=str(folder), masked_loss=True))
        first = str(err.value).splitlines()[0]
        assert case["says"] in first and str(mask) in first and "data.masked_loss" in first
    else:  # an empty mask: its image is skipped with a problem that names the mask; the other image trains
        items, problems = scan_dataset(DataConfig(path=str(folder), masked_loss=True))
        assert [i.path.name for i in items] == ["other.png"] and items[0].mask_share == 1.0
        assert [(p.path, p.skipped) for p in problems if case["says"] in p.reason] == [(mask, True)]
    items, _ = scan_dataset(DataConfig(path=str(folder)))  # without masked loss the masks are not read at all
    assert sorted(i.path.name for i in items) == ["img.png", "other.png"]


def test_an_empty_mask_beside_unmasked_images_skips_only_its_image(tmp_path):
    """Images without a mask train whole: one empty mask among them skips its image, it does not refuse the run."""
    from PIL import Image

    from trainer.config import DataConfig
    from trainer.data.dataset import scan_dataset

    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), "red").save(tmp_path / f"{name}.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "a.png")  # fully transparent: its alpha is its mask
    items, problems = scan_dataset(DataConfig(path=str(tmp_path), masked_loss=True))
    assert sorted(i.path.name for i in items) == ["b.png", "c.png"] and all(i.mask_share is None for i in items)
    assert [p.path.name for p in problems if p.skipped] == ["a.png"]


@pytest.mark.parametrize("case", [c for c in mask_cases() if c["expect"] == "refuse"], ids=lambda c: c["name"])
def test_a_run_with_a_bad_mask_is_refused_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    import trainer.training.loop as loop

    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    folder = CORPUS / "masks" / Path(case["about"]).parent
    code = main(["train", str(PRESET), "--set", f'data.path="{folder}"', "--set", "data.masked_loss=true",
                 "--set", f'output.dir="{tmp_path / "out"}"'])
    err = capsys.readouterr().err
    assert code == 2 and case["says"] in err and case["about"].split("/")[-1] in err and "Traceback" not in err


def test_the_dataset_summary_shows_the_masked_share(tmp_path):
    from trainer.config import load_config
    from trainer.data.dataset import scan_dataset
    from trainer.data.summary import format_summary, summarize

    for name, fill in (("half", (0, 0, 48, 96)), ("whole", None), ("plain", None)):
        Image.new("RGB", (96, 96), (90, 20, 20)).save(tmp_path / f"{name}.png")
        if name != "plain":
            mask = Image.new("L", (96, 96), 255)
            if fill:
                mask.paste(0, fill)
            mask.save(tmp_path / f"{name}.mask.png")
    cfg = load_config(PRESET, [f'data.path="{tmp_path}"', "data.masked_loss=true", "data.resolution=64"])
    items, problems = scan_dataset(cfg.data)
    text = format_summary(summarize(items, problems, cfg))
    assert "- masked loss: 2 of 3 images have a mask, keeping 75% of their area on average; the others train whole" \
        in text


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
