"""trainer/data/dataset.py: dataset scanning, buckets, pixel loading, captions, batching. CPU, images made on the fly."""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data.dataset import (
    DatasetError,
    Item,
    build_caption,
    caption_is_static,
    epoch_batches,
    scan_dataset,
    tag_frequency,
)
from trainer.data.images import choose_bucket, load_image, make_buckets

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-style"


def save_png(path: Path, size=(80, 80), colour=(200, 50, 50), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def noise_bytes(fmt: str, size=(96, 96)) -> bytes:
    # Noise does not compress, so the pixel data is long enough to cut in half.
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- buckets


def test_make_buckets_properties():
    res, step = 512, 64
    buckets = make_buckets(res, step, 256, 1024)
    assert buckets == sorted(set(buckets))
    assert (res, res) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= res * res
        # "max area": one more step of height would break a bound
        assert w * (h + step) > res * res or h + step > 1024
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)
    # a wide max_side would allow 2048x128; min_side must still hold
    assert all(min(b) >= 256 and max(b) <= 2048 for b in make_buckets(res, step, 256, 2048))
    assert len({w for w, _ in buckets}) == len(buckets)  # one bucket per width


def test_make_buckets_square_always_present():
    # square is added even when the grid would not otherwise produce it
    assert (100, 100) in make_buckets(100, 20, 20, 200)
    assert all(w % 20 == 0 and h % 20 == 0 for w, h in make_buckets(100, 20, 30, 200))


def test_choose_bucket_matches_orientation():
    cfg = DataConfig(resolution=512, bucket_step=64, min_bucket=256, max_bucket=1024)
    bw, bh = choose_bucket((1600, 900), cfg)
    assert bw > bh and abs(math.log(bw / bh) - math.log(1600 / 900)) < 0.15
    bw, bh = choose_bucket((900, 1600), cfg)
    assert bh > bw
    assert choose_bucket((2000, 2000), cfg) == (512, 512)


def test_choose_bucket_never_upscales():
    cfg = DataConfig(resolution=512, bucket_step=16, min_bucket=256, max_bucket=1024, min_image_size=16)
    assert choose_bucket((100, 70), cfg) == (96, 64)
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(16, 1400), rng.randint(16, 1400)
        bw, bh = choose_bucket((w, h), cfg)
        assert bw <= w and bh <= h, ((w, h), (bw, bh))
        assert bw % 16 == 0 and bh % 16 == 0 and bw >= 16 and bh >= 16
        assert bw <= 1024 and bh <= 1024


def test_choose_bucket_upscale_and_square():
    cfg = DataConfig(resolution=512, bucket_step=64, min_bucket=256, max_bucket=1024, upscale=True)
    bw, bh = choose_bucket((100, 70), cfg)
    assert bw * bh > 100 * 70 and bw > bh  # full-size landscape bucket
    assert choose_bucket((1600, 900), DataConfig(resolution=512, bucket=False)) == (512, 512)
    assert choose_bucket((30, 20), DataConfig(resolution=512, bucket=False)) == (512, 512)


# ----------------------------------------------------------------------------- scanning


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    save_png(root / "good.png", (120, 80))
    (root / "good.txt").write_text("a cat, sitting\n", encoding="utf-8")

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    img = Image.new("RGB", (120, 80), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 60, 80))  # left half red as stored
    img.save(root / "rotated.jpg", exif=exif, quality=95)

    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # fully transparent black...
    rgba.paste((0, 128, 0, 255), (20, 20, 60, 60))  # ...around an opaque green square
    rgba.save(root / "alpha.png")
    (root / "alpha.txt").write_bytes("\ufeffbom caption\r\nsecond line\r\n".encode("utf-8"))

    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a jpeg")
    (root / "truncated.png").write_bytes(noise_bytes("PNG")[:3000])
    (root / "truncated.jpg").write_bytes(noise_bytes("JPEG")[:2000])  # header intact: only a full decode sees it
    save_png(root / "small.png", (12, 40))
    save_png(root / "badcap.png")
    (root / "badcap.txt").write_bytes(b"caf\xe9 \xff")
    (root / "orphan.txt").write_text("nobody's caption")
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden litter is skipped silently
    (root / "._good.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.png").write_bytes(b"")

    save_png(root / "5_concept" / "a.PNG", (64, 96))
    (root / "5_concept" / "a.txt").write_text("tree, green\nleaves", encoding="utf-8")
    save_png(root / "5_concept" / "nested" / "b.webp", (96, 64))
    return root


def test_scan_dataset_reports_each_problem(messy: Path):
    cfg = DataConfig(path=str(messy), resolution=64, bucket_step=16, min_bucket=32, max_bucket=128,
                     default_caption="default words", repeats=2)
    items, problems = scan_dataset(cfg)

    by_name = {p.path.relative_to(messy).as_posix(): p.reason for p in problems}
    assert set(by_name) == {"zero.png", "text.jpg", "truncated.png", "truncated.jpg", "small.png", "badcap.txt",
                            "orphan.txt"}
    assert "empty file" in by_name["zero.png"]
    assert by_name["text.jpg"].startswith("cannot decode image")
    for name in ("truncated.png", "truncated.jpg"):
        assert by_name[name].startswith("cannot decode image") and "truncated" in by_name[name]
    assert by_name["small.png"] == "too small (12x40 px, minimum 64)"
    assert "not UTF-8" in by_name["badcap.txt"] and "ignored" in by_name["badcap.txt"]
    assert "no matching image" in by_name["orphan.txt"]
    assert all(str(p).startswith(str(p.path)) for p in problems)

    got = {i.path.relative_to(messy).as_posix(): i for i in items}
    assert list(got) == ["5_concept/a.PNG", "5_concept/nested/b.webp", "alpha.png", "badcap.png",
                         "good.png", "rotated.jpg"]  # sorted, deterministic
    assert got["good.png"].caption == "a cat, sitting" and got["good.png"].size == (120, 80)
    assert got["rotated.jpg"].size == (80, 120)  # EXIF orientation 6 swaps the sides
    assert got["rotated.jpg"].bucket[1] > got["rotated.jpg"].bucket[0]
    assert got["alpha.png"].caption == "bom caption, second line"  # BOM gone, lines joined
    assert got["badcap.png"].caption == "default words"  # kept, with the default caption
    assert got["5_concept/a.PNG"].caption == "tree, green, leaves"
    assert (got["5_concept/a.PNG"].repeats, got["5_concept/a.PNG"].folder) == (5, "5_concept")
    assert (got["5_concept/nested/b.webp"].repeats, got["5_concept/nested/b.webp"].folder) == (5, "5_concept/nested")
    assert got["5_concept/nested/b.webp"].caption == "default words"
    assert (got["good.png"].repeats, got["good.png"].folder) == (2, "")
    for item in items:
        assert item.bucket[0] <= item.size[0] and item.bucket[1] <= item.size[1]

    freq = tag_frequency(items)
    assert freq["5_concept"] == {"tree": 1, "green": 1, "leaves": 1}
    assert freq[""]["a cat"] == 1 and freq[""]["default words"] == 2  # badcap.png, rotated.jpg


def test_scan_dataset_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="not set"):
        scan_dataset(DataConfig(path=""))
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        scan_dataset(DataConfig(path=str(tmp_path / "nowhere")))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(DataConfig(path=str(tmp_path / "file.png")))

    only_text = tmp_path / "captions_only"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images.*captions_only"):
        scan_dataset(DataConfig(path=str(only_text)))

    broken = tmp_path / "all_broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.jpg").write_text("nope")
    save_png(broken / "c.png", (10, 10))
    with pytest.raises(DatasetError, match="all_broken") as err:
        scan_dataset(DataConfig(path=str(broken)))
    msg = str(err.value)
    assert "none of the 3 images" in msg and "a.png: empty file" in msg and "c.png: too small" in msg


def test_scan_dataset_decompression_bomb(tmp_path: Path, monkeypatch):
    save_png(tmp_path / "big.png", (200, 200))
    save_png(tmp_path / "ok.png", (64, 64))
    for limit in (30_000, 10_000):  # 40000 px: warning zone (> limit), error zone (> 2 * limit)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        items, problems = scan_dataset(DataConfig(path=str(tmp_path)))
        assert [i.path.name for i in items] == ["ok.png"]
        assert [p.path.name for p in problems] == ["big.png"] and "too large" in problems[0].reason


# ----------------------------------------------------------------------------- pixels


def test_load_image_shape_range_flip(tmp_path: Path):
    arr = np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    for bucket in [(96, 64), (64, 64), (48, 96), (128, 96)]:
        x = load_image(tmp_path / "x.png", bucket)
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, bucket[1], bucket[0])
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5
        assert torch.equal(load_image(tmp_path / "x.png", bucket, flip=True), x.flip(-1))
    # same size: no resampling, exact pixel values survive
    x = load_image(tmp_path / "x.png", (100, 70))
    assert torch.allclose(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)


def test_load_image_alpha_and_exif(messy: Path):
    x = load_image(messy / "alpha.png", (64, 64))
    assert torch.allclose(x[:, 0, 0], torch.ones(3))  # transparent corner -> white, not black
    assert x[1, 32, 32] > 0 and x[0, 32, 32] < -0.9  # opaque centre stays green

    y = load_image(messy / "rotated.jpg", (80, 120))
    assert y.shape == (3, 120, 80)
    # Stored left half red; after a 90° clockwise turn the red half is on top.
    assert y[0, 10, 40] > 0.8 and y[2, 10, 40] < -0.8
    assert y[2, 110, 40] > 0.8 and y[0, 110, 40] < -0.8


def test_load_image_modes(tmp_path: Path):
    grey16 = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))
    grey16.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = load_image(tmp_path / "g16.png", (64, 64))
    assert torch.allclose(x, torch.zeros_like(x), atol=0.02)  # mid grey, not clipped to white

    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    x = load_image(tmp_path / "cmyk.jpg", (64, 64))
    assert x[0].mean() > 0.8 and x[1].mean() < -0.8  # red

    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (16, 16, 48, 48))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    x = load_image(tmp_path / "pal.png", (64, 64))
    assert torch.allclose(x[:, 0, 0], torch.ones(3)) and x[0, 32, 32] > 0.9 and x[1, 32, 32] < -0.9

    save_png(tmp_path / "la.png", (64, 64), (0, 0), mode="LA")
    assert torch.allclose(load_image(tmp_path / "la.png", (32, 32)), torch.ones(3, 32, 32))


# ----------------------------------------------------------------------------- captions


def test_build_caption_trigger_and_keep_tokens():
    cfg = DataConfig(trigger="zkstyle")
    assert build_caption("a cat,  sitting ,, on a mat", cfg, random.Random(0)) == "zkstyle, a cat, sitting, on a mat"
    assert build_caption("zkstyle, a cat", cfg, random.Random(0)) == "zkstyle, a cat"  # not doubled
    assert build_caption("", cfg, random.Random(0)) == "zkstyle"
    assert build_caption("a, b", DataConfig(), random.Random(0)) == "a, b"

    cfg = DataConfig(trigger="zkstyle", shuffle_captions=True, keep_tokens=2)
    tags = [f"t{i}" for i in range(8)]
    rng, seen = random.Random(0), set()
    for _ in range(50):
        out = build_caption(", ".join(tags), cfg, rng).split(", ")
        assert out[:3] == ["zkstyle", "t0", "t1"] and sorted(out[3:]) == sorted(tags[2:])
        seen.add(tuple(out))
    assert len(seen) > 10  # it really shuffles


def test_build_caption_dropout_and_determinism():
    assert build_caption("a, b", DataConfig(trigger="z", caption_dropout=1.0), random.Random(0)) == ""
    cfg = DataConfig(trigger="z", shuffle_captions=True, keep_tokens=0, caption_dropout=0.3)
    raw = "a, b, c, d, e, f"
    run = lambda seed: [build_caption(raw, cfg, r) for r in [random.Random(seed)] for _ in range(40)]  # noqa: E731
    assert run(7) == run(7) and run(7) != run(8)
    assert 0 < run(7).count("") < 40
    # the rng stream advances the same way whatever the settings: the next draw is identical afterwards
    a, b = random.Random(3), random.Random(3)
    build_caption("x, y, z", DataConfig(caption_dropout=1.0), a)
    build_caption("", DataConfig(shuffle_captions=True), b)
    assert a.random() == b.random()


def test_caption_is_static():
    assert caption_is_static(DataConfig(trigger="z"))
    assert not caption_is_static(DataConfig(shuffle_captions=True))
    assert not caption_is_static(DataConfig(caption_dropout=0.1))


# ----------------------------------------------------------------------------- batching


def fake_items() -> list[Item]:
    buckets = [(64, 64), (96, 64), (64, 96)]
    return [Item(Path(f"{i}.png"), "", (100, 100), buckets[i % 3], 1 + i % 4, "") for i in range(23)]


def test_epoch_batches():
    items = fake_items()
    batches = epoch_batches(items, 4, seed=1, epoch=0)
    counts = Counter(i for b in batches for i in b)
    assert counts == {i: item.repeats for i, item in enumerate(items)}
    for b in batches:
        assert 1 <= len(b) <= 4 and len({items[i].bucket for i in b}) == 1
    assert sum(len(b) < 4 for b in batches) <= 3  # only each bucket's last batch may be short
    assert any(b != sorted(b) for b in batches)  # shuffled within a bucket too
    order = [items[b[0]].bucket for b in batches]
    assert sum(x != y for x, y in zip(order, order[1:])) > 2  # buckets interleave, not one after another
    assert batches == epoch_batches(items, 4, seed=1, epoch=0)
    assert batches != epoch_batches(items, 4, seed=1, epoch=1)
    assert batches != epoch_batches(items, 4, seed=2, epoch=0)
    assert len(epoch_batches(items, 1, 0, 0)) == sum(i.repeats for i in items)
    with pytest.raises(ValueError):
        epoch_batches(items, 0, 0, 0)


# ----------------------------------------------------------------------------- shipped example


def test_tiny_style_example_loads_cleanly():
    cfg = DataConfig(path=str(EXAMPLE), resolution=64, bucket_step=16, min_bucket=32, max_bucket=128,
                     min_image_size=16)
    items, problems = scan_dataset(cfg)
    assert problems == [] and len(items) == 12
    assert all(item.caption.startswith("a ") for item in items)
    assert len({item.bucket for item in items}) > 1  # mixed aspect ratios
    for item in items:
        x = load_image(item.path, item.bucket)
        assert x.shape == (3, item.bucket[1], item.bucket[0])
    assert sum(f.stat().st_size for f in EXAMPLE.iterdir()) < 100_000


def test_scan_dataset_symlink_loop(tmp_path: Path):
    save_png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)  # must not hang or duplicate
    items, problems = scan_dataset(DataConfig(path=str(tmp_path)))
    assert [i.path.name for i in items] == ["a.png"] and problems == []
