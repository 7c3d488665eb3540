"""Shared fixtures: a tiny random SD1.5-layout pipeline built once per session and saved to disk, so tests
load it by path exactly as a user's model would be loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TINY_STYLE = ROOT / "examples" / "tiny-style"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from trainer.families.tiny import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("base") / "tiny-sd15")


@pytest.fixture
def make_cfg(tiny_base, tmp_path):
    """Config factory: the tiny-test preset pointed at the session's tiny base and a temp output folder."""
    from trainer.config import load_config

    def make(*overrides: str):
        base = [
            f'model.path="{tiny_base}"',
            f'data.path="{TINY_STYLE}"',
            f'output.dir="{tmp_path / "outputs"}"',
            "train.steps=4",
            "train.checkpoint_every=0",
            "train.save_every=0",
            "sample.every=0",
            "sample.prompts=[]",
        ]
        return load_config(ROOT / "presets" / "tiny-test.toml", [*base, *overrides])

    return make


@pytest.fixture
def train_capturing(monkeypatch):
    """train(cfg, run_dir) -> (the Base object the loop trained, final adapter path), to inspect live weights."""
    import trainer.training.loop as loop

    def run(cfg, run_dir):
        captured = {}
        real = loop.load_base

        def spy(*args, **kwargs):
            captured["base"] = real(*args, **kwargs)
            return captured["base"]

        monkeypatch.setattr(loop, "load_base", spy)
        try:
            final = loop.train(cfg, run_dir)
        finally:
            monkeypatch.setattr(loop, "load_base", real)
        return captured["base"], final

    return run


@pytest.fixture
def reap():
    """Runs started by a test; any trainer still alive at the end is killed (no orphans after a failure)."""
    import signal

    from app import jobs

    started: list[Path] = []
    yield started
    for run in started:
        pid = jobs.read_job(run).get("pid")
        if pid and jobs.pid_alive(pid, run):
            os.kill(pid, signal.SIGKILL)


RUN_STALL_S, RUN_CEILING_S = 900.0, 3600.0  # no new event for 15 min: stuck; an hour in all: give up


def wait_for_run_end(run_dir: Path, stall_s: float = RUN_STALL_S, ceiling_s: float = RUN_CEILING_S,
                     ends: tuple[str, ...] = ("done", "failed", "stopped", "cancelled")):
    """The run's status (app/jobs.py) once it has ended, following RUN/events.jsonl rather than guessing how long
    a run takes: every new event (a step, a checkpoint, the report) proves progress and restarts the `stall_s`
    clock, so a busy machine only makes the wait longer. Fails naming the last event when the run makes no
    progress for `stall_s`, or after `ceiling_s` in all."""
    import time

    from app import jobs

    start = last_change = time.time()
    seen = -1
    while True:
        st = jobs.status(run_dir)
        if st.state in ends:
            return st
        now = time.time()
        if len(st.events) != seen:
            seen, last_change = len(st.events), now
        last = st.events[-1]["type"] if st.events else "none yet"
        if now - last_change > stall_s or now - start > ceiling_s:
            raise AssertionError(f"{run_dir.name}: state {st.state} after {now - start:.0f}s, no new event for "
                                 f"{now - last_change:.0f}s (last: {last})\n{jobs.log_tail(run_dir)}")
        time.sleep(0.5)


def wait_for(predicate, timeout: float = 180, every: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A TCP port on localhost nobody listens on right now (for in-process Gradio servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """The tiny models in one thread: with several threads on a busy machine OpenMP start-up and spin-waits cost
    seconds per UNet call (measured ~2.5 s vs 40 ms). Test modules opt in with pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line(err: str) -> str:
    """The one line a command wrote to stderr for a refused input (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def finished_demo_run(outputs: Path, name: str = "demo-style", *, steps: int = 2, save_every: int = 0,
                      batch_size: int = 2) -> Path:
    """A finished rank-4 run of presets/demo-style.toml on the demo base, as the UI lists it: the CLI trains it (no
    samples, no report, no checkpoints) and job.json says it ran and ended."""
    import json
    import subprocess
    import sys

    run_dir = outputs / name
    sets = [f"train.steps={steps}", f"train.save_every={save_every}", "train.checkpoint_every=0",
            f"train.batch_size={batch_size}", "sample.every=0", "sample.prompts=[]", "report.enabled=false",
            "lora.rank=4", "lora.conv_rank=0", f'output.dir="{outputs}"']
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", str(ROOT / "presets" / "demo-style.toml"),
                           "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir / "job.json").write_text(json.dumps({"pid": 2**22 + 12345, "launched_at": 0, "returncode": 0}))
    return run_dir
