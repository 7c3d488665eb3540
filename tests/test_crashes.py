"""Crash safety: out-of-memory and kill -9 of real trainer processes; resume must lose nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from app import jobs
from tests.conftest import TINY_STYLE, free_port, wait_for


# ----------------------------------------------------------------------------- processes: OOM and kill -9


def _queue_run(tmp_path, cfg, reap, name: str) -> Path:
    run, problems = jobs.create_run(tmp_path / "outputs", cfg, sorted(TINY_STYLE.glob("*")), name=name)
    assert problems == []
    reap.append(run)
    assert jobs.advance(tmp_path / "outputs") == run
    return run


def test_oom_is_a_failed_state_with_a_hint(make_cfg, tmp_path, reap, monkeypatch):
    monkeypatch.setenv("STYLE_LORA_TEST_OOM_AT_STEP", "2")
    run = _queue_run(tmp_path, make_cfg("train.steps=50"), reap, "oom")
    st = wait_for(lambda: (s := jobs.status(run)).state in jobs.TERMINAL and s, 240, what="terminal state")
    assert st.state == "failed", st.reason
    assert st.reason.startswith("out of memory: CUDA out of memory")
    assert "Hint:" in st.reason and "train.batch_size" in st.reason and "gradient_checkpointing" in st.reason
    proc = jobs._CHILDREN[jobs.read_job(run)["pid"]]
    assert proc.wait(60) != 0  # exits (no hang), non-zero
    from app.ui import panel_markdown

    assert "**Failed**: out of memory" in panel_markdown(jobs.status(run))


def _same_weights(a: Path, b: Path) -> None:
    """The final adapters of run folders a (output name tiny-test) and b (a UI run: named like its folder)."""
    import torch
    from safetensors.torch import load_file

    for suffix in (".safetensors", ".diffusers.safetensors"):
        x, y = load_file(a / f"tiny-test{suffix}"), load_file(b / f"{b.name}{suffix}")
        assert x.keys() == y.keys() and x, suffix
        for key in x:
            assert torch.allclose(x[key], y[key], atol=1e-6, rtol=0), (suffix, key)


def _checkpoints_intact(run: Path) -> list[int]:
    """Every checkpoint folder loads completely and says the step its name says."""
    from safetensors.torch import load_file

    from trainer.training.checkpoint import STATE_FILE, list_checkpoints

    steps = []
    for folder in list_checkpoints(run):
        state = json.loads((folder / STATE_FILE).read_text())
        assert state["step"] == int(folder.name.split("-")[1])
        for f in ("lora.safetensors", "optimizer.safetensors", "rng.safetensors"):
            assert load_file(folder / f) or f == "extra.safetensors", (folder, f)
        steps.append(state["step"])
    return steps


KILL_COMMON = ("train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2", "lora.dropout=0.1")


def _kill(run: Path) -> None:
    pid = jobs.read_job(run)["pid"]
    os.kill(pid, signal.SIGKILL)
    jobs._CHILDREN[pid].wait(30)


def test_kill_9_then_resume_ends_at_the_same_weights(make_cfg, tmp_path, reap):
    import trainer.training.loop as loop

    loop.train(make_cfg(*KILL_COMMON), tmp_path / "straight")
    run = _queue_run(tmp_path, make_cfg(*KILL_COMMON), reap, "killed")
    wait_for(lambda: jobs.status(run).step >= 2, 240, 0.02, "step 2")
    _kill(run)
    st = wait_for(lambda: (s := jobs.status(run)).state == "failed" and s, 30, what="failed")
    assert "killed by signal 9" in st.reason and "training:" in st.reason  # the end of the log
    kept = _checkpoints_intact(run)
    assert kept and max(kept) >= 1
    assert "queued to resume" in jobs.resume(run)
    assert jobs.advance(tmp_path / "outputs") == run
    st = wait_for(lambda: (s := jobs.status(run)).state in jobs.TERMINAL and s, 240, what="resumed run ends")
    assert st.state == "done" and st.step == 5, st.reason
    resumed = [e for e in st.events if e["type"] == "resumed"]
    assert resumed and resumed[-1]["step"] == max(kept)
    _same_weights(tmp_path / "straight", run)


@pytest.mark.slow
def test_kill_9_at_random_points_loses_nothing(make_cfg, tmp_path, reap):
    """Kill the worker at random moments (while loading, stepping or writing a checkpoint) until it finishes,
    resuming after each kill, with the web UI up the whole time; the end result equals an uninterrupted run."""
    from gradio_client import Client

    import trainer.training.loop as loop
    from app.ui import build_app

    started = time.time()
    loop.train(make_cfg(*KILL_COMMON), tmp_path / "straight")
    # A kill lands inside a run: the child also imports and loads, so it takes longer than this in-process run.
    run_seconds = time.time() - started
    outputs = tmp_path / "outputs"
    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, allowed_paths=[str(outputs)], quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        seed = int(os.environ.get("KILL_SEED", time.time()))
        rng = random.Random(seed)
        print("KILL_SEED", seed)
        run = _queue_run(tmp_path, make_cfg(*KILL_COMMON), reap, "random-kills")
        log = []
        for attempt in range(8):
            # a random moment: anywhere from model loading to the last steps
            target = rng.choice(["time", "step", "step"]) if log else "step"  # the first kill always lands
            if target == "time":
                time.sleep(rng.uniform(0.5, max(1.0, run_seconds)))
            else:
                k = rng.randint(1, 4) if log else rng.randint(1, 2)
                wait_for(lambda: jobs.status(run).step >= k or jobs.status(run).state in jobs.TERMINAL, 240, 0.01)
                time.sleep(rng.uniform(0, 0.5 if log else 0.1))
            if jobs.status(run).state in jobs.TERMINAL:
                break
            _kill(run)
            status = client.predict(run.name, api_name="/status")  # the UI is up and reports the failure
            if status["state"] == "done" and log:  # it finished between the look and the signal: nothing to kill
                break
            assert status["state"] == "failed" and "killed by signal 9" in status["reason"], status
            kept = _checkpoints_intact(run)
            since = jobs.read_job(run)["launched_at"]
            reached = [e["step"] for e in jobs.status(run).events if e["type"] == "step" and e["time"] >= since]
            log.append({"attempt": attempt, "kill": target, "steps_this_attempt": reached, "checkpoints_left": kept})
            jobs.resume(run)
            assert jobs.advance(outputs) == run
        st = wait_for(lambda: (s := jobs.status(run)).state in jobs.TERMINAL and s, 300, what="run ends")
        assert st.state == "done" and st.step == 5, st.reason
        _same_weights(tmp_path / "straight", run)
        print("kill log:", json.dumps(log))
        assert log, "no kill landed"
    finally:
        demo.close()
