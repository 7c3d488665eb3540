"""train.log_with = "tensorboard": accelerate's TensorBoard tracker in the run folder, the same numbers as events.jsonl."""

import pytest

import trainer.training.loop as loop
from trainer.events import read_events

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_tensorboard_logs_what_the_event_file_holds(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    loop.train(make_cfg("train.steps=3", 'train.log_with="tensorboard"', "data.validation_split=0.25",
                        "train.validation_every=2"), run)
    logs = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert logs, "TensorBoard event files inside the run folder"
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    events, _ = read_events(run / "events.jsonl")
    for tag, kind, field in (("train/loss", "step", "loss"), ("train/lr", "step", "lr"),
                             ("validation/loss", "validation", "loss")):
        want = [(e["step"], e[field]) for e in events if e["type"] == kind]
        got = [(s.step, s.value) for s in board.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want] and want, tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as float32

    plain = tmp_path / "plain"
    loop.train(make_cfg("train.steps=1"), plain)
    assert not (plain / "tensorboard").exists()  # off by default
