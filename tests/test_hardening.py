"""Hardening, round 2 (issue 15): nothing a user made is ever lost, and every failure is one clear line.

Each test reproduces a reported failure as an instance of a rule: settings checked before anything loads, the adapter
written before anything optional, transactional writes, exclusive run folders, archive quotas, one-line errors
(disk full, is a folder, not a folder, permission), bounded repeats and captions, throttled logins. The hostile files
and settings live in the generated corpus (tests/bad_inputs, scripts/make_bad_inputs.py)."""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
import tomllib
from pathlib import Path

import pytest

from app import jobs, uploads
from tests.conftest import ROOT, TINY_STYLE, one_line

CORPUS = ROOT / "tests" / "bad_inputs"
PRESET = ROOT / "presets" / "tiny-test.toml"


def corpus_cases(where: str) -> list[dict]:
    return [c for c in json.loads((CORPUS / "manifest.json").read_text()) if c["where"] == where]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    from trainer.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    import trainer.training.loop as loop

    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("a model was loaded before the check"))


# ----------------------------------------------------------------------------- validate before loading


@pytest.mark.parametrize("case", corpus_cases("settings"), ids=lambda c: c["name"])
def test_settings_corpus_is_refused_by_name_before_anything_loads(case, tmp_path, capsys, no_model_load):
    import tomli_w

    from trainer.config import ConfigError, deep_merge, load_config, read_toml

    diff = tomllib.loads((CORPUS / "settings" / case["files"][0]).read_text())
    with pytest.raises(ConfigError, match="invalid settings") as err:
        load_config(PRESET, extra=diff)
    assert case["says"] in str(err.value)
    merged = tmp_path / "config.toml"
    merged.write_text(tomli_w.dumps(deep_merge(read_toml(PRESET), diff)))
    code, err = run_cli(capsys, "train", str(merged), "--set", f'output.dir="{tmp_path / "out"}"')
    assert code == 2 and case["says"] in one_line(err)
    assert not (tmp_path / "out").exists()  # refused before a run folder was made


@pytest.mark.parametrize("where, override, says", [
    ("file", 'output.dir="{file}"', "output.dir '{file}' is a file, not a folder"),
    ("under-file", 'output.dir="{file}/runs"', "is a file, so no folder can be made inside it"),
    ("run-dir", "--run-dir={file}", "--run-dir '{file}' is a file, not a folder"),
])
def test_output_paths_must_be_writable_folders(where, override, says, tmp_path, capsys, no_model_load):
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    args = ["train", str(PRESET), "--set", f'data.path="{TINY_STYLE}"']
    args += [override.format(file=file)] if override.startswith("--") else ["--set", override.format(file=file)]
    code, err = run_cli(capsys, *args)
    assert code == 2 and says.format(file=file) in one_line(err)
    assert file.read_text() == "x"


def test_output_dir_without_permission_is_named(tmp_path, capsys, monkeypatch, no_model_load):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path else real(p, mode, **k))
    code, err = run_cli(capsys, "train", str(PRESET), "--set", f'output.dir="{tmp_path / "runs"}"')
    assert code == 2 and f"output.dir '{tmp_path / 'runs'}': no permission to write in '{tmp_path}'" in one_line(err)


def test_convert_to_a_folder_or_from_a_non_finite_adapter_is_one_line(tmp_path, capsys):
    folder = tmp_path / "DIR.safetensors"
    folder.mkdir()
    nan = CORPUS / "models" / "nan_adapter.safetensors"
    code, err = run_cli(capsys, "convert", str(nan), str(folder), "--to", "diffusers")
    assert code == 2 and f"{folder}: is a folder; give the output a file name" in one_line(err)
    file = tmp_path / "file"
    file.write_text("x")
    code, err = run_cli(capsys, "convert", str(nan), str(file / "out.safetensors"), "--to", "diffusers")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    for case in corpus_cases("models"):
        if case["name"].startswith("adapter-"):
            out = tmp_path / f"{case['name']}.safetensors"
            code, err = run_cli(capsys, "convert", str(CORPUS / "models" / case["files"][0]), str(out), "--to",
                                "diffusers")
            assert code == 2 and case["says"] in one_line(err) and not out.exists(), case["name"]


# ----------------------------------------------------------------------------- run folders


def test_two_runs_with_one_name_never_share_a_folder(tmp_path):
    from trainer.cli import new_run_dir
    from trainer.config import load_config

    cfg = load_config(PRESET, [f'output.dir="{tmp_path}"', 'output.name="same"'])
    (tmp_path / "same").mkdir()  # an existing (even empty) folder is never taken over
    start, got = threading.Barrier(8), []

    def claim():
        start.wait()
        got.append(new_run_dir(cfg))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() for p in got) and tmp_path / "same" not in got
    ui = [jobs.new_run_dir(tmp_path, "same") for _ in range(3)]  # the UI's own folders: also exclusive
    assert len(set(ui) | set(got)) == 11


# ----------------------------------------------------------------------------- the adapter comes first


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def test_final_adapter_is_written_before_the_final_samples(make_cfg, tmp_path):
    import base64

    from safetensors import safe_open

    import trainer.training.loop as loop

    run = tmp_path / "run"
    loop.train(make_cfg("train.steps=2", 'sample.prompts=["zkstyle, a red circle"]', "report.enabled=false"), run)
    kinds = [(e["type"], e.get("final")) for e in _events(run) if e["type"] in ("adapter", "samples", "done")]
    assert kinds == [("adapter", True), ("samples", None), ("adapter", True), ("done", None)]
    with safe_open(str(run / "tiny-test.safetensors"), "pt") as f:  # the re-save carries the last sample as cover
        cover = base64.b64decode(json.loads(f.metadata()["ssmd_cover_images"])[0])
    assert cover == (run / "samples" / "step-000002-00.png").read_bytes()


def test_a_failing_final_sample_is_a_warning_and_the_run_is_done(make_cfg, tmp_path, monkeypatch):
    import trainer.training.loop as loop

    def broken(*a, **k):
        raise ValueError("`height` and `width` have to be divisible by 8 but are 7 and 7.")

    monkeypatch.setattr(loop, "render_samples", broken)
    run = tmp_path / "run"
    final = loop.train(make_cfg("train.steps=3", 'sample.prompts=["zkstyle"]', "train.checkpoint_every=3"), run)
    events = _events(run)
    assert events[-1]["type"] == "done" and events[-1]["step"] == 3
    warning = next(e for e in events if e["type"] == "warning")
    assert warning["what"] == "final samples" and "divisible by 8" in warning["reason"]
    assert "the adapter is saved" in warning["reason"]
    assert final.is_file() and (run / "tiny-test.safetensors").is_file()
    assert (run / "checkpoints" / "step-000003" / "state.json").is_file()
    jobs.write_job(run, {"queued_at": 0, "pid": 999999999, "launched_at": 0})
    st = jobs.status(run)
    assert st.state == "done" and len(jobs.adapter_files(run)) == 2  # the UI: done, with downloads


# ----------------------------------------------------------------------------- one line: disk full and others


FULL_DISK = """
import errno, sys
from pathlib import Path
import trainer.training.loop as loop

def full_disk(run_dir, *a, **k):  # the disk fills up when the final adapter is written
    raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / "style.safetensors"))

loop.save_adapters = full_disk
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_mid_run_is_one_line_a_failed_event_and_a_logged_traceback(tiny_base, tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, "train", str(PRESET), "--run-dir", str(run),
                          "--set", f'model.path="{tiny_base}"', "--set", f'data.path="{TINY_STYLE}"',
                          "--set", "train.steps=2", "--set", "train.checkpoint_every=1", "--set", "sample.prompts=[]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = out.stderr.splitlines()[-1]  # above it: the progress bar
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout and line.startswith("error: "), out.stderr
    assert "style.safetensors: the disk is full; free some space" in line and "train.log" in line
    log = (run / "train.log").read_text()
    assert "Traceback" in log and "No space left on device" in log  # the details: in the run's log only
    failed = _events(run)[-1]
    assert failed["type"] == "failed" and "the disk is full" in failed["reason"]
    assert (run / "checkpoints" / "step-000002" / "state.json").is_file()  # what was written before survives
    jobs.write_job(run, {"queued_at": 0, "pid": 999999999, "launched_at": 0})
    st = jobs.status(run)
    assert st.state == "failed" and "the disk is full" in st.reason and "Traceback" not in st.reason


def test_os_errors_read_as_what_to_do():
    from trainer.io import describe_os_error

    for code, says in [(errno.ENOSPC, "the disk is full"), (errno.EISDIR, "is a folder, not a file"),
                       (errno.ENOTDIR, "a part of this path is a file"), (errno.EACCES, "permission denied"),
                       (errno.EROFS, "read-only")]:
        text = describe_os_error(OSError(code, "x", "/data/f.bin"))
        assert text.startswith("/data/f.bin: ") and says in text and "\n" not in text
    assert describe_os_error(OSError(errno.ENOSPC, "x"), "output.dir").startswith("output.dir: the disk is full")


def test_failed_run_panel_shows_the_reason_not_a_traceback(tmp_path):
    from app.ui import panel_markdown

    run = tmp_path / "run"
    run.mkdir()
    jobs.write_job(run, {"queued_at": 0, "pid": 999999999, "launched_at": 0})
    (run / "events.jsonl").write_text(json.dumps({"type": "failed", "time": 1, "reason": "data.path: no images"}) + "\n")
    (run / "train.log").write_text("Traceback (most recent call last):\n  File x\nMemoryError\n")
    st = jobs.status(run)
    assert st.state == "failed" and st.reason == "data.path: no images"
    assert "Traceback" not in panel_markdown(st) and "data.path: no images" in panel_markdown(st)


# ----------------------------------------------------------------------------- dataset: repeats and captions


def test_huge_kohya_repeat_folder_is_refused_with_a_message(tmp_path):
    from trainer.config import load_config
    from trainer.data.dataset import DatasetError, epoch_batches, scan_dataset

    images = sorted(TINY_STYLE.glob("*.png"))[:2]
    for folder, image in zip(("99999999999_x", "2_ok"), images):
        (tmp_path / "data" / folder).mkdir(parents=True)
        shutil.copy(image, tmp_path / "data" / folder / image.name)
    cfg = load_config(PRESET, [f'data.path="{tmp_path / "data"}"'])
    items, problems = scan_dataset(cfg.data)
    assert [(i.path.parent.name, i.repeats) for i in items] == [("2_ok", 2)]
    assert "99999999999 repeats, over the limit of 1000" in problems[0].reason
    assert len(sum(epoch_batches(items, 1, 0, 0), [])) == 2
    shutil.rmtree(tmp_path / "data" / "2_ok")
    with pytest.raises(DatasetError, match="over the limit of 1000"):
        scan_dataset(cfg.data)


def test_caption_symlink_to_a_huge_file_is_not_read_whole(tmp_path):
    from trainer.config import DataConfig
    from trainer.data.dataset import scan_dataset

    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(64 * 2**30)  # sparse: 64 GiB that reading whole would never finish
    data = tmp_path / "run" / "dataset"
    data.mkdir(parents=True)
    shutil.copy(next(TINY_STYLE.glob("*.png")), data / "a.png")
    (data / "a.txt").symlink_to(huge)
    t0 = time.time()
    items, problems = scan_dataset(DataConfig(path=str(data), min_image_size=16))
    assert items[0].caption == "" and "caption file is larger than 64 KiB" in problems[0].reason
    rows, _ = uploads.dataset_items(tmp_path / "run", 16)
    assert rows[0]["caption"] == "" and "larger than 64 KiB" in rows[0]["status"]
    assert time.time() - t0 < 10
