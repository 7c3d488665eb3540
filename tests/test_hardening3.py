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
from tests.conftest import one_line
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
