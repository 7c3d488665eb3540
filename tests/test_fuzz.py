"""Property-based fuzzing (hypothesis) of the parsers that read user input: captions, config overrides and TOML,
the UI's extra-settings box, upload names. Each parser either returns a valid value or raises its own error type
with a message; nothing else escapes."""

from __future__ import annotations

import math
import random
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import form, uploads
from trainer.config import Config, ConfigError, DataConfig, load_config, parse_override
from trainer.data.dataset import _read_caption, build_caption, scan_dataset, split_tags

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TAG = st.text(alphabet=st.characters(blacklist_characters=",\n\r", blacklist_categories=("Cs",)), max_size=12)


@FAST
@given(raw=st.text(max_size=200), trigger=TAG, shuffle=st.booleans(), keep=st.integers(0, 5),
       dropout=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**32))
def test_build_caption_properties(raw, trigger, shuffle, keep, dropout, seed):
    cfg = DataConfig(trigger=trigger, shuffle_captions=shuffle, keep_tokens=keep, caption_dropout=dropout)
    out = build_caption(raw, cfg, random.Random(seed))
    assert out == build_caption(raw, cfg, random.Random(seed))  # deterministic: resume replays it exactly
    if out == "":
        assert dropout > 0 or (not trigger.strip() and not split_tags(raw))
        return
    tags = split_tags(out)
    t = trigger.strip()
    original = [x for x in split_tags(raw) if x != t]
    if t:
        assert tags[0] == t and tags.count(t) == 1  # the trigger first, exactly once
        tags = tags[1:]
    assert sorted(tags) == sorted(original)  # shuffling never loses, adds or changes a tag
    if not shuffle:
        assert tags == original
    else:
        assert tags[:keep] == original[:keep]  # keep_tokens stay in front


@FAST
@given(data=st.binary(max_size=300))
def test_read_caption_any_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cap") / "x.txt"
    path.write_bytes(data)
    try:
        text = _read_caption(path)
    except UnicodeDecodeError as err:
        assert str(err)
        return
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    assert text == text.strip() or not text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(lambda t: t.encode("utf-8")),
                      st.text(max_size=50).map(lambda t: t.encode("utf-16"))))
def test_scan_dataset_never_crashes_on_a_caption(tmp_path_factory, data):
    from PIL import Image

    root = tmp_path_factory.mktemp("ds")
    Image.new("RGB", (80, 80), (10, 20, 30)).save(root / "a.png")
    (root / "a.txt").write_bytes(data)
    items, problems = scan_dataset(DataConfig(path=str(root), min_image_size=16))
    assert len(items) == 1  # the image always trains
    if problems:
        assert [p.path.name for p in problems] == ["a.txt"] and "caption" in problems[0].reason
        assert items[0].caption == ""
    else:
        assert "\n" not in items[0].caption


KEYS = ["train.steps", "train.lr_unet", "data.trigger", "data.resolution", "lora.rank", "lora.variant", "model.path",
        "sample.prompts", "train", "nosuch.key", "train.steps.deeper", "", "data"]


@FAST
@given(key=st.sampled_from(KEYS) | st.text(max_size=20), value=st.text(max_size=40))
def test_overrides_give_a_config_or_a_config_error(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError as err:
        assert str(err)
        return
    assert isinstance(cfg, Config)
    parse_override(f"{key}={value}")


@FAST
@given(text=st.text(max_size=300) | st.sampled_from(["[train]\nsteps = -1", "[train\n", "train = 3", "[[data]]\nx=1",
                                                        "[data]\npath = 3", "\ufeff[train]\nsteps = 5"]))
def test_toml_files_give_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert str(path) in str(err)
        return
    assert isinstance(cfg, Config)


@settings(max_examples=100, deadline=None)
@given(extra=st.text(max_size=200) | st.lists(st.sampled_from(["train.steps=3", "train.steps=", "=1", "lora.rank=x",
                                                                "# c", "data.trigger=\"a\"", "nosuch=1", "[x]"]),
                                                max_size=5).map("\n".join))
def test_ui_extra_settings_box(extra):
    values = form.preset_values("tiny-test")
    try:
        cfg = form.values_to_config("tiny-test", values, extra)
    except ConfigError as err:
        assert str(err)
        return
    assert isinstance(cfg, Config)


SAFE = set(string.ascii_letters + string.digits + "._-")


@FAST
@given(name=st.text(max_size=60))
def test_upload_names_are_always_safe(name):
    clean = uploads.sanitize_name(name)
    assert clean and set(clean) <= SAFE and not clean.startswith(".") and "/" not in clean
    try:
        rel = uploads.safe_relpath(name)
    except uploads.UploadError as err:
        assert str(err)
        return
    assert not rel.is_absolute() and ".." not in rel.parts and all(set(p) <= SAFE for p in rel.parts)
    assert (Path("/root/ds") / rel).resolve().is_relative_to("/root/ds")


NUMBER_FIELDS = [f"{section}.{name}" for section, sf in Config.model_fields.items()
                 for name, f in sf.annotation.model_fields.items() if f.annotation in (int, float, int | None)]


@FAST
@given(key=st.sampled_from(NUMBER_FIELDS),
       value=st.floats() | st.integers(-2**63, 2**63 - 1) | st.sampled_from([float("inf"), float("-inf"), float("nan"),
                                                                             10**12, 99999999999, 100000]))
def test_numbers_are_finite_and_bounded_or_refused_by_name(key, value):
    """Every numeric setting either loads as a finite, bounded value or is refused with a message naming it, before
    anything loads (inf/nan/10^12 once passed and ended in a traceback or a full disk)."""
    text = repr(value) if not isinstance(value, float) or value == value and abs(value) != float("inf") else \
        {"inf": "inf", "-inf": "-inf", "nan": "nan"}[repr(value)]
    try:
        cfg = load_config(ROOT_PRESET, [f"{key}={text}"])
    except ConfigError as err:
        assert key.split(".")[1] in str(err) or "sample and report image size" in str(err), str(err)
        assert "\n" not in str(err)
        return
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got is None or (math.isfinite(got) and abs(got) <= (1e6 if isinstance(got, float) else 2**63))
    if name in ("steps", "epochs", "repeats", "resolution", "rank"):
        assert got <= 1_000_000


ROOT_PRESET = Path(__file__).resolve().parent.parent / "presets" / "tiny-test.toml"
