"""Captioning with a local model (`python -m trainer caption`): tiny random captioners built in-process
(tests/tiny_captioners.py) check the plumbing: files written atomically, existing captions kept, bad images named
and skipped, pickles refused, style words stripped, undo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.tiny_captioners import WORDS, build_tiny_blip, build_tiny_tagger, build_tiny_vision_encoder_decoder
from trainer.data import caption_edit as ce
from trainer.data.caption import CaptionError, caption_folder, guess_mode, load_captioner, read_tag_names

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "trainer", "caption", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return build_tiny_tagger(tmp_path_factory.mktemp("models") / "tiny-tagger")


def make_folder(root: Path) -> Path:
    """a.png (red), sub/b.jpg (blue), c.png (RGBA) without captions; kept.png with a caption; broken.png."""
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (255, 0, 0)).save(root / "a.png")
    Image.new("RGB", (40, 64), (0, 0, 255)).save(root / "sub" / "b.jpg")
    Image.new("RGBA", (50, 50), (0, 0, 255, 0)).save(root / "c.png")
    Image.new("RGB", (50, 50), (0, 255, 0)).save(root / "kept.png")
    (root / "kept.txt").write_text("my own caption\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def captions(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_cli_captions_a_folder_with_a_tiny_blip(blip, tmp_path):
    root = make_folder(tmp_path / "data")
    first = captions(root)
    out = cli(root, "--model", blip, "--max-new-tokens", "4", "--batch-size", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    got = captions(root)
    assert sorted(got) == ["a.txt", "c.txt", "kept.txt", "sub/b.txt"]  # nothing for the broken image
    assert got["kept.txt"] == "my own caption\n"  # never overwritten unless asked
    for name in ("a.txt", "c.txt", "sub/b.txt"):
        words = got[name].strip().split()
        assert got[name].endswith("\n") and len(words) == 4 and set(words) <= set(WORDS), got[name]
    assert "broken.png: bad: cannot decode image" in out.stdout  # named and skipped
    assert "kept.png: kept" in out.stdout and "[5/5]" in out.stdout  # progress per image
    assert "3 written, 1 kept (existing), 1 skipped" in out.stdout
    assert not list(root.rglob(".*.tmp"))  # atomic writes leave no temp files

    # --overwrite replaces existing captions; --undo puts back exactly what was there before that command
    before = captions(root)
    again = cli(root, "--model", blip, "--max-new-tokens", "2", "--overwrite", "--json-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert [e["status"] for e in events if "status" in e].count("written") == 4
    assert all(len(t.split()) == 2 for t in captions(root).values())
    undone = cli(root, "--undo")
    assert undone.returncode == 0, undone.stderr
    assert captions(root) == before
    assert cli(root, "--undo").returncode == 0 and captions(root) == first  # a history: the command before it
    assert cli(root, "--undo").returncode == 2  # nothing left to undo


def test_vision_encoder_decoder_layout(tmp_path):
    """The ViT-GPT2 layout: an image processor and a tokenizer instead of one processor."""
    model = build_tiny_vision_encoder_decoder(tmp_path / "ved")
    captioner, mode = load_captioner(str(model), device="cpu", max_new_tokens=3)
    texts = captioner([Image.new("RGB", (40, 30), (200, 10, 10))])
    assert mode == "sentence" and len(texts) == 1 and len(texts[0].split()) == 3
    assert set(texts[0].split()) <= set(WORDS)


def test_pickled_weights_are_refused(tmp_path, blip):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((blip / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"pickle data")
    with pytest.raises(CaptionError, match=r"no \.safetensors weights.*pytorch_model\.bin.*refused"):
        load_captioner(str(folder), "sentence", device="cpu")
    with pytest.raises(CaptionError, match="pickle files can run code"):
        load_captioner(str(folder / "pytorch_model.bin"), "sentence", device="cpu")
    with pytest.raises(CaptionError, match="must be an .onnx file"):
        load_captioner(str(folder / "pytorch_model.bin"), "tags")
    # a hub id goes through the same loader; offline it fails in one line naming the model
    out = cli(tmp_path, "--model", "no-such-org/no-such-captioner")
    assert out.returncode == 2 and "no-such-org/no-such-captioner" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_tagger_writes_booru_tags(tagger, tmp_path):
    root = make_folder(tmp_path / "data")
    assert guess_mode(str(tagger)) == "tags" and guess_mode("SmilingWolf/wd-swinv2-tagger-v3") == "tags"
    out = cli(root, "--model", tagger, "--strip", "watercolor")  # tags mode: no torch model involved
    assert out.returncode == 0, out.stderr[-3000:]
    got = captions(root)
    # character tags above their threshold first, then general tags by confidence; ratings never;
    # underscores become spaces except in kaomoji; the stripped style word takes its whole tag with it
    assert got["a.txt"] == "kagamine rin, red theme, ^_^\n"
    assert got["sub/b.txt"] == "kagamine rin, blue theme, ^_^\n"
    # fully transparent blue pixels are composited on white (black would give neither colour tag)
    assert got["c.txt"] == "kagamine rin, red theme, blue theme, ^_^\n"
    assert got["kept.txt"] == "my own caption\n"


def test_tagger_with_fixed_batch_of_one(tmp_path):
    model = build_tiny_tagger(tmp_path / "t1", batch=1)
    captioner, _ = load_captioner(str(model), "tags", threshold=0.9)
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    assert captioner([red, blue]) == ["kagamine rin, red theme", "kagamine rin, blue theme"]


def test_tagger_file_errors(tmp_path, tagger):
    broken = tmp_path / "no-csv"
    broken.mkdir()
    (broken / "model.onnx").write_bytes((tagger / "model.onnx").read_bytes())
    with pytest.raises(CaptionError, match="selected_tags.csv .* is missing"):
        load_captioner(str(broken), "tags")
    (broken / "selected_tags.csv").write_text("tag_id,name,category,count\n0,only_one,0,1\n")
    captioner, _ = load_captioner(str(broken), "tags")
    with pytest.raises(CaptionError, match="7 outputs but 1 tags"):
        captioner([Image.new("RGB", (32, 32))])
    (broken / "selected_tags.csv").write_text("id,tag\n0,x\n")
    with pytest.raises(CaptionError, match="needs 'name' and 'category' columns"):
        read_tag_names(broken / "selected_tags.csv")
    (broken / "selected_tags.csv").write_text((tagger / "selected_tags.csv").read_text())
    (broken / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(CaptionError, match="not a loadable ONNX model"):
        load_captioner(str(broken), "tags")


def test_one_failing_image_does_not_stop_the_batch(tmp_path):
    root = make_folder(tmp_path / "data")

    def captioner(images):
        if any(img.size == (40, 64) for img in images):
            raise RuntimeError("odd shape")
        return ["a watercolor painting of a house"] * len(images)

    seen = []
    undo = ce.start_undo("test")
    result = caption_folder(root, captioner, undo, strip=["watercolor", "painting"], batch_size=8,
                            progress=seen.append)
    assert result["written"] == ["a.png", "c.png"]
    bad = sorted(result["bad"])
    assert bad[0].startswith("broken.png: cannot decode image: ")
    assert bad[1] == "sub/b.jpg: model failed on it: odd shape"
    assert captions(root)["a.txt"] == "a house\n"  # 'a watercolor painting of a house' without the style words
    assert [e["done"] for e in seen] == [1, 2, 3, 4, 5] and all(e["total"] == 5 for e in seen)

    def always_fails(images):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # the model's fault, not the images': stop
        caption_folder(root, always_fails, ce.start_undo("x"), overwrite=True)


def test_empty_captions_are_not_written(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "a.png")
    result = caption_folder(root, lambda images: [""] * len(images), ce.start_undo("x"))
    assert result["bad"] == ["a.png: the model returned an empty caption"] and not captions(root)
    result = caption_folder(root, lambda images: ["painting"] * len(images), ce.start_undo("x"), strip=["painting"])
    assert result["bad"] == ["a.png: nothing left after --strip"] and not captions(root)


def test_hub_code_is_never_run(tmp_path):
    """A model folder that ships its own Python (trust_remote_code) is refused and its code never runs."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                                  "from transformers import PretrainedConfig\n"
                                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "evil",
                                                    "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CaptionError, match="trust_remote_code.*refused"):
        load_captioner(str(folder), "sentence", device="cpu")
    assert not marker.exists()
