"""Several concepts in one dataset (concept.toml), a regularisation folder with its own loss weight, and the
dataset summary shown before training. CPU, images made on the fly."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.concepts import Concept, concept_for, write_concept
from trainer.config import Config, DataConfig
from trainer.data.dataset import DatasetError, build_caption, epoch_batches, scan_dataset, tag_frequency
from trainer.data.summary import format_summary, summarize


def png(path: Path, size=(96, 96), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


@pytest.fixture
def two_concepts(tmp_path) -> Path:
    root = tmp_path / "data"
    png(root / "plain.png", caption="a house")
    png(root / "3_castles" / "c1.png", caption="a tower")
    png(root / "3_castles" / "c2.png", (160, 96), caption="")
    (root / "3_castles" / "concept.toml").write_text('trigger = "zkcastle"\ncaption_prefix = "a castle"\n')
    png(root / "boats" / "b1.png", caption="a boat, water")
    png(root / "boats" / "night" / "n1.png")  # no caption file
    (root / "boats" / "concept.toml").write_text('trigger = "zkboat"\nrepeats = 5\n')
    (root / "boats" / "night" / "concept.toml").write_text('caption_prefix = "at night"\n')
    return root


def by_name(items):
    return {i.path.name: i for i in items}


def test_concept_files_set_trigger_prefix_and_repeats(two_concepts):
    cfg = DataConfig(path=str(two_concepts), trigger="zkstyle", repeats=2)
    items, problems = scan_dataset(cfg)
    got = by_name(items)
    assert problems == []
    # no concept: data.trigger and data.repeats
    assert got["plain.png"].trigger is None and got["plain.png"].repeats == 2
    plain = got["plain.png"]
    assert build_caption(plain.caption, cfg, random.Random(0), plain.trigger) == "zkstyle, a house"
    # the concept's trigger replaces data.trigger; its prefix comes after the trigger; kohya's N_ still counts
    c1 = got["c1.png"]
    assert (c1.trigger, c1.repeats) == ("zkcastle", 3)
    assert build_caption(c1.caption, cfg, random.Random(0), c1.trigger) == "zkcastle, a castle, a tower"
    assert got["c2.png"].caption == "a castle" and got["c2.png"].caption_state == "empty"
    # concept.toml repeats win over the folder default; a nested concept.toml overrides only what it sets
    assert got["b1.png"].repeats == 5 and got["b1.png"].caption == "a boat, water"
    n1 = got["n1.png"]
    assert (n1.trigger, n1.repeats, n1.caption, n1.caption_state) == ("zkboat", 5, "at night", "missing")
    # each image appears `repeats` times per epoch
    counts = [i for batch in epoch_batches(items, 1, 0, 0) for i in batch]
    assert sorted(counts.count(k) for k in range(len(items))) == sorted(i.repeats for i in items)
    # tag frequency stays per folder (kohya's ss_tag_frequency)
    assert tag_frequency(items)["3_castles"] == {"a castle": 2, "a tower": 1}
    assert set(tag_frequency(items)) == {"", "3_castles", "boats", "boats/night"}


def test_empty_trigger_in_concept_means_no_trigger(tmp_path):
    root = tmp_path / "d"
    png(root / "sub" / "a.png", caption="a cat")
    (root / "sub" / "concept.toml").write_text('trigger = ""\n')
    cfg = DataConfig(path=str(root), trigger="zkstyle")
    (item,), _ = scan_dataset(cfg)
    assert build_caption(item.caption, cfg, random.Random(0), item.trigger) == "a cat"


def test_prefix_already_in_caption_is_not_doubled(tmp_path):
    root = tmp_path / "d"
    png(root / "a.png", caption="a castle, a tower")
    write_concept(root, Concept(caption_prefix="a castle"))
    (item,), _ = scan_dataset(DataConfig(path=str(root)))
    assert item.caption == "a castle, a tower"


@pytest.mark.parametrize("text, needle", [
    ("trigger = 'x'\nrepeat = 3\n", "repeat"),  # a typo is an error, not silently ignored
    ("repeats = 0\n", "repeats"),
    ("trigger = [1]\n", "trigger"),
    ("trigger = \n", "not a readable TOML"),
])
def test_bad_concept_file_names_the_file(tmp_path, text, needle):
    root = tmp_path / "d"
    png(root / "sub" / "a.png")
    (root / "sub" / "concept.toml").write_text(text)
    with pytest.raises(DatasetError) as err:
        scan_dataset(DataConfig(path=str(root)))
    message = str(err.value)
    assert str(root / "sub" / "concept.toml") in message and needle in message and "\n" not in message


def test_concept_for_merges_nearest_first():
    concepts = {Path("."): Concept(trigger="top", repeats=2), Path("a"): Concept(caption_prefix="p"),
                Path("a/b"): Concept(trigger="deep")}
    assert concept_for(Path("a/b/c"), concepts) == Concept(trigger="deep", caption_prefix="p", repeats=2)
    assert concept_for(Path("x"), concepts) == Concept(trigger="top", repeats=2)


def test_write_concept_round_trip_and_removal(tmp_path):
    path = write_concept(tmp_path, Concept(trigger="zk", repeats=4))
    assert path.read_text() == 'trigger = "zk"\nrepeats = 4\n'
    assert write_concept(tmp_path, Concept()) is None and not path.exists()


def test_regularisation_folder(tmp_path, two_concepts):
    reg = tmp_path / "reg" / "1_castle"
    png(reg / "r1.png", caption="a castle")
    png(reg / "r2.png", caption="a castle, hill")
    cfg = DataConfig(path=str(two_concepts), trigger="zkstyle", reg_path=str(tmp_path / "reg"), reg_weight=0.25)
    items, _ = scan_dataset(cfg)
    regs = [i for i in items if i.is_reg]
    assert sorted(i.path.name for i in regs) == ["r1.png", "r2.png"]
    assert all(i.loss_weight == 0.25 and i.repeats == 1 for i in regs)
    assert all(i.loss_weight == 1.0 for i in items if not i.is_reg)
    # reg images never get the style trigger
    assert build_caption(regs[0].caption, cfg, random.Random(0), regs[0].trigger) == "a castle"
    assert tag_frequency(items)["reg/1_castle"] == {"a castle": 2, "hill": 1}


def test_regularisation_folder_errors(tmp_path, two_concepts):
    with pytest.raises(DatasetError, match="data.reg_path: folder .* does not exist"):
        scan_dataset(DataConfig(path=str(two_concepts), reg_path=str(tmp_path / "nope")))
    with pytest.raises(DatasetError, match="must not contain one another"):
        scan_dataset(DataConfig(path=str(two_concepts), reg_path=str(two_concepts / "boats")))
    with pytest.raises(DatasetError, match="must not contain one another"):
        scan_dataset(DataConfig(path=str(two_concepts / "boats"), reg_path=str(two_concepts)))


def test_summary_numbers(two_concepts, tmp_path):
    png(two_concepts / "big.png", (300, 200), caption="a wide field")
    (two_concepts / "broken.png").write_bytes(b"not an image")
    reg = tmp_path / "reg"
    png(reg / "r.png", caption="a castle")
    cfg = Config(data=DataConfig(path=str(two_concepts), trigger="zkstyle", repeats=1, resolution=64,
                                 bucket_step=32, min_bucket=32, max_bucket=128, reg_path=str(reg)))
    cfg.train.batch_size, cfg.train.grad_accum = 2, 2
    items, problems = scan_dataset(cfg.data)
    s = summarize(items, problems, cfg)
    assert (s["images"], s["reg_images"]) == (6, 1)
    assert s["concepts"]["3_castles"] == {"images": 2, "seen_per_epoch": 6, "reg": False, "trigger": "zkcastle"}
    assert s["concepts"]["boats"]["seen_per_epoch"] == 5 and s["concepts"][""]["trigger"] == "zkstyle"
    assert s["concepts"]["reg"]["reg"] is True
    assert sum(s["buckets"].values()) == len(items)
    assert s["buckets"] == {f"{w}x{h}": n for (w, h), n in Counter(i.bucket for i in items).items()}
    assert list(s["buckets"].values()) == sorted(s["buckets"].values(), reverse=True)  # most used first
    assert s["largest"]["path"].endswith("big.png") and s["largest"]["size"] == [300, 200]
    assert s["smallest"]["size"] == [96, 96]
    assert [Path(p).name for p in s["captions_missing"]] == ["n1.png"]
    assert [Path(p).name for p in s["captions_empty"]] == ["c2.png"]
    assert [Path(p).name for p in s["skipped"]] == ["broken.png"]
    assert s["batches_per_epoch"] == len(epoch_batches(items, 2, cfg.train.seed, 0))
    assert s["steps_per_epoch"] == -(-s["batches_per_epoch"] // 2)
    text = format_summary(s, epochs=3)
    assert "Dataset: 6 images + 1 regularisation images" in text
    assert "3_castles: 2 images, seen 6x per epoch (with repeats), trigger 'zkcastle'" in text
    assert "no caption file: 1" in text and "empty caption: 1" in text and "skipped: 1 files" in text
    assert f"3 epochs = about {3 * s['steps_per_epoch']} steps" in text


def test_reg_weight_scales_the_loss_of_regularisation_images(make_cfg, tmp_path, capsys):
    """One style image and one reg image, batch 1: at a step that draws the reg image, the loss is the
    unweighted loss times data.reg_weight (same seed, same start weights, same noise)."""
    import shutil

    from tests.conftest import TINY_STYLE
    from trainer.events import read_events
    from trainer.training.loop import train

    style, reg = tmp_path / "style", tmp_path / "reg"
    first = sorted(TINY_STYLE.glob("*.png"))[0]
    for folder in (style, reg):
        folder.mkdir()
        shutil.copy(first, folder / first.name)
    probe = DataConfig(path=str(style), reg_path=str(reg), min_image_size=16, resolution=64, bucket_step=16,
                       min_bucket=32, max_bucket=128)
    items, _ = scan_dataset(probe)
    assert [i.is_reg for i in items] == [False, True]
    seed = next(s for s in range(100) if epoch_batches(items, 1, s, 0)[0] == [1])  # step 1 draws the reg image

    losses = {}
    for weight in (1.0, 0.25):
        cfg = make_cfg(f'data.path="{style}"', f'data.reg_path="{reg}"', f"data.reg_weight={weight}",
                       "train.steps=1", "train.batch_size=1", f"train.seed={seed}", "data.caption_dropout=0.0",
                       "report.enabled=false")
        run_dir = tmp_path / f"run-{weight}"
        train(cfg, run_dir)
        events, _ = read_events(run_dir / "events.jsonl")
        losses[weight] = next(e["loss"] for e in events if e["type"] == "step")
        dataset = next(e for e in events if e["type"] == "dataset")
        assert (dataset["images"], dataset["reg_images"]) == (1, 1)
    assert losses[1.0] > 0
    assert losses[0.25] == pytest.approx(0.25 * losses[1.0], rel=1e-4)
    assert "Dataset: 1 images + 1 regularisation images" in capsys.readouterr().out
