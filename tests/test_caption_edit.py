"""Bulk caption edits (trainer/data/caption_edit.py) and their CLI flags on `python -m trainer caption`. No models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from trainer.data import caption_edit as ce
from trainer.cli import main


def dataset(root: Path) -> Path:
    for rel, caption in {"a.png": "1girl, long_hair, watermark", "b.png": "a watercolor painting of a cat",
                         "sub/c.png": "Long Hair, smile", "d.png": None}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(root / rel)
        if caption is not None:
            (root / rel).with_suffix(".txt").write_text(caption + "\n")
    return root


def texts(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_single_caption_edits():
    assert ce.add_prefix("a cat", "zkstyle") == "zkstyle, a cat"
    assert ce.add_prefix("zkstyle, a cat", "zkstyle") == "zkstyle, a cat"  # idempotent
    assert ce.add_prefix("", "zkstyle,") == "zkstyle"
    assert ce.add_suffix("a cat", "best quality") == "a cat, best quality"
    assert ce.add_suffix("a cat, best quality", "best quality") == "a cat, best quality"
    assert ce.replace_text("a, watermark, b", "watermark", "") == "a, b"
    assert ce.replace_text("a girl", "girl", "woman") == "a woman"
    assert ce.replace_text("a Girl", "girl", "woman") == "a Girl"  # literal and case-sensitive
    assert ce.remove_tag("1girl, long_hair, Long Hair,smile", "long hair") == "1girl, smile"
    assert ce.remove_tag("1girl, smile", "hair") == "1girl, smile"


@pytest.mark.parametrize("caption, words, expected", [
    ("a watercolor painting of a cat", ["watercolor", "painting"], "a cat"),
    ("an oil painting of a dog in a field", ["oil painting"], "a dog in a field"),
    ("a cat, watercolor (medium), traditional_media", ["watercolor", "traditional media"], "a cat"),
    ("Watercolor, a house", ["watercolor"], "a house"),
    ("a watercolors shop", ["watercolor"], "a watercolors shop"),  # whole words only
    ("a cat on a mat", [], "a cat on a mat"),
])
def test_strip_words(caption, words, expected):
    assert ce.strip_words(caption, words) == expected


def test_bulk_edits_selection_and_undo(tmp_path):
    root = dataset(tmp_path / "d")
    undo = ce.start_undo("prefix")
    changed, problems = ce.bulk_edit(root, lambda c: ce.add_prefix(c, "zk"), undo, create_missing=True)
    assert (sorted(changed), problems) == (["a.png", "b.png", "d.png", "sub/c.png"], [])
    assert texts(root)["d.txt"] == "zk\n" and texts(root)["sub/c.txt"] == "zk, Long Hair, smile\n"
    # a second command is a new undo step; only the selected images change
    changed, _ = ce.bulk_edit(root, lambda c: ce.remove_tag(c, "long hair"), ce.start_undo("remove"),
                              only=["a.png", "b.png"])
    assert changed == ["a.png"] and texts(root)["sub/c.txt"] == "zk, Long Hair, smile\n"
    assert ce.undo_last(root)[:2] == ("remove", ["a.txt"])
    assert texts(root)["a.txt"] == "zk, 1girl, long_hair, watermark\n"
    assert ce.undo_last(root)[:2] == ("prefix", ["a.txt", "b.txt", "d.txt", "sub/c.txt"])  # a history, not one level
    assert texts(root) == {"a.txt": "1girl, long_hair, watermark\n", "b.txt": "a watercolor painting of a cat\n",
                           "sub/c.txt": "Long Hair, smile\n"}
    with pytest.raises(ce.EditError, match="nothing to undo"):
        ce.undo_last(root)
    with pytest.raises(ce.EditError, match="not images of this folder: nope.png"):
        ce.bulk_edit(root, str.upper, ce.start_undo("x"), only=["nope.png"])


def test_undo_restores_bytes_and_deletes_created_files(tmp_path):
    root = dataset(tmp_path / "d")
    (root / "a.txt").write_bytes(b"caf\xe9, latin-1\r\n")  # not UTF-8: bulk edits skip it, undo keeps its bytes
    original = {p: p.read_bytes() for p in root.rglob("*.txt")}
    undo = ce.start_undo("caption")
    changed, problems = ce.bulk_edit(root, lambda c: c + " x", undo)
    assert changed == ["b.png", "sub/c.png"] and "a.txt: caption not edited, cannot read it as UTF-8" in problems[0]
    # same command, same step; a caption that is not readable text is never replaced
    assert ce.write_captions(root, {root / "a.txt": "new a", root / "d.txt": "new d"}, undo) == [
        "a.txt: exists and is not a caption we can read as text; not replaced"]
    assert ce.undo_last(root)[:2] == ("caption", ["b.txt", "sub/c.txt", "d.txt"])
    assert {p: p.read_bytes() for p in root.rglob("*.txt")} == original
    assert not (root / "d.txt").exists()


def test_undo_record_cannot_touch_images_or_escape(tmp_path):
    root = dataset(tmp_path / "d")
    (root / ".caption-undo").mkdir()
    for rel in ("../outside.txt", "a.png"):
        (root / ".caption-undo" / "000001.json").write_text(json.dumps({"label": "x", "files": {rel: "pwned"}}))
        with pytest.raises(ce.EditError, match="refuses to touch"):
            ce.undo_last(root)
    assert not (tmp_path / "outside.txt").exists() and Image.open(root / "a.png").size == (32, 32)


def test_tag_table(tmp_path):
    root = dataset(tmp_path / "d")
    (root / "e.png").write_bytes((root / "a.png").read_bytes())
    (root / "e.txt").write_text("smile, smile, 1girl")  # counted once per image
    table = {tag: (n, imgs) for tag, n, imgs in ce.tag_table(root)}
    assert table["smile"] == (2, ["e.png", "sub/c.png"]) and table["1girl"] == (2, ["a.png", "e.png"])
    assert ce.tag_table(root)[0][1] == 2 and ce.tag_table(root)[-1][1] == 1  # most frequent first


def test_cli_bulk_flags_are_one_undo_step(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    original = texts(root)
    code = main(["caption", str(root), "--remove-tag", "watermark", "--replace", "1girl", "1woman",
                 "--strip", "watercolor,painting", "--prefix", "zkstyle", "--suffix", "masterpiece"])
    assert code == 0
    got = texts(root)
    assert got["a.txt"] == "zkstyle, 1woman, long_hair, masterpiece\n"
    assert got["b.txt"] == "zkstyle, a cat, masterpiece\n"
    assert got["d.txt"] == "zkstyle, masterpiece\n"
    out = capsys.readouterr().out
    assert "prefix zkstyle: 4 captions changed" in out and "remove tag watermark: 1 captions changed" in out
    assert main(["caption", str(root), "--list-tags"]) == 0
    assert "     4  zkstyle" in capsys.readouterr().out
    assert main(["caption", str(root), "--undo"]) == 0
    assert texts(root) == original
    assert "4 caption files restored" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--undo", "--prefix", "x"], "--undo and --clear-undo run alone"),
    ([], "nothing to do"),
    (["--prefix", "x", "--only", "missing.png"], "not images of this folder"),
])
def test_cli_refusals_are_one_line(tmp_path, capsys, args, message):
    root = dataset(tmp_path / "d")
    assert main(["caption", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert main(["caption", str(tmp_path / "nope"), "--prefix", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err
