"""The style suite's looks and statistics (trainer/report/demo_styles.py) and the report's verdict (trainer/report/verdict.py)
on drawn images, no model: the verdict must follow the pixels, not the colours of the content."""

import random

import numpy as np
import pytest

from trainer.report import demo_data

from trainer.report import demo_styles
from trainer.report.verdict import style_verdict


def _drawn(n: int, seed: int, look=None):
    rng = random.Random(seed)
    out = []
    for content in [demo_data.random_content(rng) for _ in range(n)]:
        image, mask = demo_data.draw_with_mask(*content, size=32, rng=rng)
        out.append(demo_styles.apply(image, mask, list(look)) if look else image)
    return out


@pytest.mark.parametrize("name", list(demo_styles.SUITE))
def test_each_suite_statistic_sees_its_style(name):
    style = demo_styles.SUITE[name]
    per_image = [demo_styles.statistic(name, [im]) for im in _drawn(32, 1)]
    plain = float(np.mean(per_image))
    styled = demo_styles.statistic(name, _drawn(32, 1, style.look))
    others = [demo_styles.statistic(name, _drawn(16, 1, s.look)) for s in demo_styles.SUITE.values() if s is not style]
    assert styled - plain > 3 * np.std(per_image) / np.sqrt(32), (name, plain, styled)  # 3 standard errors of the mean
    # its own statistic ranks its own style above most others (it measures that style, not "anything changed")
    assert sum(styled > o for o in others) >= len(others) - 2, (name, styled, others)


def test_random_looks_are_seeded_and_keep_the_image_size():
    a = [demo_styles.random_look(random.Random(s)) for s in range(50)]
    assert a == [demo_styles.random_look(random.Random(s)) for s in range(50)]
    assert len({step[0] for look in a for step in look}) >= 12  # the families are broad
    image, mask = demo_data.draw_with_mask("red", "circle", "blue", "left", size=32, rng=random.Random(0))
    for look in a:
        out = demo_styles.apply(image, mask, look)
        assert out.size == (32, 32) and out.mode == "RGB"


@pytest.mark.parametrize("name", list(demo_styles.SUITE))
def test_verdict_learned_when_the_lora_images_carry_the_style(name):
    look = demo_styles.SUITE[name].look
    train, base_ref = _drawn(20, 2, look), _drawn(12, 2)  # same contents: the style is the only difference
    base, lora = _drawn(16, 3), _drawn(16, 3, look)  # held-out contents, same seeds
    v = style_verdict(train, base_ref, base, {"0.5": base, "1.0": lora})
    assert v["verdict"] == "learned" and v["progress"]["1.0"] > 0.7, (name, v)
    assert v["progress"]["0.5"] == 0.0  # identical images: nothing moved
    nothing = style_verdict(train, base_ref, base, {"1.0": base})
    assert nothing["verdict"] == "not learned" and nothing["progress"]["1.0"] == 0.0


def test_a_colour_move_is_not_mistaken_for_a_texture_style():
    train, base_ref = _drawn(20, 2, demo_styles.SUITE["bands"].look), _drawn(12, 2)
    base = _drawn(16, 3)
    toned = _drawn(16, 3, (("tone", {"colour": (0.2, 0.4, 0.9), "amount": 0.6}),))
    v = style_verdict(train, base_ref, base, {"1.0": toned})
    assert v["style_share"]["texture"] > 0.5, v
    assert v["verdict"] == "not learned", v


def test_no_style_in_the_training_images_is_not_learned():
    # training images that look like what the base draws: whatever the LoRA does, there was nothing to learn
    train, base_ref, base = _drawn(20, 4), _drawn(12, 5), _drawn(16, 6)
    sepia = _drawn(16, 6, demo_styles.SUITE["sepia"].look)
    v = style_verdict(train, base_ref, base, {"1.0": sepia})
    assert v["verdict"] == "not learned" and "no style" in v["reason"], v
    assert np.isfinite(v["progress"]["1.0"])
