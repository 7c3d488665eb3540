"""The fast path (train.fast: torch.compile of the trained models) gives the same training as the eager path, and
the speed benchmark runs end to end on CPU at tiny size. Speed itself is measured by bench/train_speed.py on a GPU
(docs/benchmarks.md), never by a timed test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def losses(run_dir) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["type"] == "step"]


def test_fast_path_is_auto_on_cuda_only(make_cfg):
    import torch

    from trainer.training.loop import use_fast_path

    assert use_fast_path(make_cfg()) is torch.cuda.is_available()
    assert use_fast_path(make_cfg('train.fast="on"')) is True
    assert use_fast_path(make_cfg('train.fast="on"'), measure_importance=True) is False  # LoRA-drop's hooks
    assert use_fast_path(make_cfg('train.fast="off"')) is False


def events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


FAST_COMMON = ["train.steps=3", "data.bucket=false", "data.flip=false", "lora.train_text_encoder=true",
               "data.caption_dropout=0.0", "lora.dropout=0.0"]


def test_fast_path_trains_like_the_eager_path(make_cfg, tmp_path, train_capturing, monkeypatch):
    """The loop with compiled UNet + text encoder (backend aot_eager: dynamo and autograd graphs without code
    generation, seconds to compile on CPU) passes its own gradient check and reproduces the eager losses and
    adapter. One square bucket: one graph per model."""
    import torch
    from torch._dynamo.utils import counters

    monkeypatch.setenv("STYLE_LORA_COMPILE_BACKEND", "aot_eager")
    eager_base, _ = train_capturing(make_cfg(*FAST_COMMON, 'train.fast="off"'), tmp_path / "eager")
    counters.clear()
    fast_base, _ = train_capturing(make_cfg(*FAST_COMMON, 'train.fast="on"'), tmp_path / "fast")
    assert counters["stats"]["unique_graphs"] >= 2  # UNet and text encoder really were compiled
    check = next(e for e in events(tmp_path / "fast") if e["type"] == "fast_path")
    assert check["enabled"] is True and check["grad_error"] < 1e-4 and check["backend"] == "aot_eager"
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    for part in ("unet", "text_encoder"):
        a = {n: p for n, p in getattr(eager_base, part).named_parameters() if "lora_" in n}
        b = {n: p for n, p in getattr(fast_base, part).named_parameters() if "lora_" in n}
        assert a.keys() == b.keys() and a
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fault", ["wrong gradients", "compiler error"])
def test_fast_path_falls_back_when_compiling_goes_wrong(fault, make_cfg, tmp_path, monkeypatch):
    """A miscompile (simulated: the 'compiled' UNet scales its output) or a compiler crash is caught by the check
    before the first step; the run trains on the eager path, says why, and ends with the eager path's losses."""
    import torch

    from trainer.training import fast_path
    from trainer.training.loop import train

    def bad_compile(models, trained, device):
        class Scaled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, *args, **kwargs):
                if fault == "compiler error":
                    raise RuntimeError("InductorError: simulated")
                out = self.inner(*args, **kwargs)
                out.sample = out.sample * 1.5
                return out

        return {n: Scaled(m) if n == "unet" else m for n, m in models.items()}

    train(make_cfg(*FAST_COMMON, 'train.fast="off"'), tmp_path / "eager")
    monkeypatch.setattr(fast_path, "compile_models", bad_compile)
    train(make_cfg(*FAST_COMMON, 'train.fast="on"'), tmp_path / "fast")
    check = next(e for e in events(tmp_path / "fast") if e["type"] == "fast_path")
    assert check["enabled"] is False and "training on the eager path" in check["reason"]
    if fault == "compiler error":
        assert check["grad_error"] is None and "simulated" in check["reason"]
    else:
        assert check["grad_error"] > fast_path.MAX_GRAD_ERROR
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "eager"), rel=1e-6)


@pytest.mark.slow
def test_inductor_on_cpu_is_checked_before_use(make_cfg, tmp_path):
    """The real compiler (inductor) on this CPU: whatever it produces, the run either trains compiled with gradients
    matching the eager path, or falls back to eager; its losses match the eager run either way. (torch 2.13 CPU
    inductor miscompiles the UNet up block's backward, see trainer/training/fast_path.py, so today this falls back.)"""
    from trainer.training.loop import train

    train(make_cfg(*FAST_COMMON, 'train.fast="off"'), tmp_path / "eager")
    train(make_cfg(*FAST_COMMON, 'train.fast="on"'), tmp_path / "fast")
    check = next(e for e in events(tmp_path / "fast") if e["type"] == "fast_path")
    assert check["backend"] == "inductor"
    assert check["enabled"] is (check["grad_error"] <= 0.1)
    print("inductor on CPU: gradient error", check["grad_error"], "enabled", check["enabled"])
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part_and_writes_its_table(tmp_path):
    """bench/gpu_check.sh --cpu-smoke: the GPU check's parts (pytest -m gpu, training speed eager and compiled via
    bench/train_speed.py, preview swap) on tiny models, so the script a GPU session runs never rots."""
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["parts"]) >= {"pytest", "sd15", "sdxl", "swap"}
    assert all(p["rc"] == 0 for p in result["parts"].values())
    rows = {(r["arch"], r["path"]): r for r in result["train"]}
    assert set(rows) >= {("sd15", "eager"), ("sd15", "fast"), ("sdxl", "eager")}
    for r in rows.values():
        assert r["steps_s"] > 0 and r["images_s"] == pytest.approx(r["steps_s"] * r["batch"], rel=0.01)
        assert r["device"] == "cpu" and r["resolution"] == 64
    assert rows["sd15", "fast"]["fast_path"] is True  # compiled (aot_eager) and its gradient check passed
    assert {r["mode"] for r in result["swap"]} == {"multi", "hotswap"}
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| sd15 | 64 | 1 | fast | lora |" in table and "| hotswap | cpu |" in table


def test_gpu_check_stopped_from_outside_leaves_no_process_behind(tmp_path):
    """Its parts run in their own process sessions; a SIGTERM (e.g. from `timeout`) must end them too, or they go on
    using the GPU beside the next command."""
    import os
    import signal
    import time

    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--parts", "sd15",
                             "--out", str(tmp_path)], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "train_speed.py" in cmdline and str(tmp_path) in cmdline:
                found.append(int(pid))
        return found

    deadline = time.time() + 60
    while not children() and time.time() < deadline:
        time.sleep(0.2)
    assert children(), "the sd15 part never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    time.sleep(0.5)
    assert children() == []


@pytest.mark.gpu
def test_fast_path_on_cuda_passes_its_check_and_matches_eager(make_cfg, tmp_path):
    """On a GPU: inductor + CUDA graphs are used (the check passes) and the bf16 loss curve follows the eager one."""
    from trainer.training.loop import train

    train(make_cfg(*FAST_COMMON, "train.steps=6", 'train.fast="off"'), tmp_path / "eager")
    train(make_cfg(*FAST_COMMON, "train.steps=6", 'train.fast="auto"'), tmp_path / "fast")
    check = next(e for e in events(tmp_path / "fast") if e["type"] == "fast_path")
    assert check["enabled"] is True and check["backend"] == "inductor", check
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "eager"), rel=0.05)
