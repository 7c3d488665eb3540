"""Web UI: jobs (uploads, queue, child processes) and the Gradio app driven end to end with gradio_client."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app import form, jobs, uploads
from tests.conftest import ROOT, TINY_STYLE, free_port, wait_for, wait_for_run_end

EXAMPLES = sorted(TINY_STYLE.glob("*"))


def png_bytes(size=(80, 80), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- uploads


def test_sanitized_names():
    assert uploads.sanitize_name("My Photo (1).PNG") == "My_Photo_1.png"
    assert uploads.sanitize_name("../../etc/passwd") == "passwd"
    assert uploads.sanitize_name("v1.2 final") == "v1.2_final"
    assert uploads.sanitize_name(".bashrc") == "bashrc"
    assert uploads.sanitize_name("ünïcødé café.jpg") == "n_c_d_caf.jpg"
    assert uploads.sanitize_name("") == "file"
    assert str(uploads.safe_relpath("10_my style/a b.png")) == "10_my_style/a_b.png"
    for bad in ("../x.png", "a/../../x.png", "/etc/x.png", "C:/x.png", "a/b/c/d/e.png"):
        with pytest.raises(uploads.UploadError):
            uploads.safe_relpath(bad)


def test_upload_validation_and_zip_slip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good image.png").write_bytes(png_bytes())
    (src / "good image.txt").write_text("a red square")
    (src / "tiny.png").write_bytes(png_bytes((8, 8)))
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "nocap.jpg").write_bytes(png_bytes())  # a PNG named .jpg decodes fine (Pillow sniffs content)
    (src / "script.sh").write_text("rm -rf /")
    evil = src / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.png", png_bytes())
        zf.writestr("/abs.png", png_bytes())
        zf.writestr("sub/inner.png", png_bytes())
        zf.writestr("sub/inner.txt", "inner caption")
        zf.writestr("readme.md", "hi")
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (0o120777 << 16)  # a symlink entry
        zf.writestr(link, "/etc/passwd")
    run = jobs.new_run_dir(tmp_path / "outputs", "my run")
    assert run.name == "my_run"
    stored, problems = uploads.add_files(run, sorted(src.iterdir()))
    dataset = run / "dataset"
    names = sorted(p.relative_to(dataset).as_posix() for p in stored)
    assert names == ["broken.png", "good_image.png", "good_image.txt", "nocap.jpg", "sub/inner.png",
                     "sub/inner.txt", "tiny.png"]
    text = "\n".join(problems)
    for needle in ("script.sh: file type '.sh' refused", "../escape.png", "/abs.png", "readme.md", "link.png: symlink"):
        assert needle in text, (needle, text)
    assert not (tmp_path / "outputs" / "escape.png").exists() and not (run / "escape.png").exists()
    assert all(p.resolve().is_relative_to(dataset.resolve()) for p in dataset.rglob("*"))

    rows, error = uploads.dataset_items(run, min_image_size=64)
    status = {r["file"]: r["status"] for r in rows}
    assert error == ""
    assert status["good_image.png"] == "ok" and status["sub/inner.png"] == "ok"
    assert status["nocap.jpg"].startswith("missing caption")
    assert status["tiny.png"].startswith("too small")
    assert status["broken.png"].startswith("cannot decode")

    assert uploads.save_captions(run, {"nocap.jpg": "now captioned", "../x.png": "no"}) == ["../x.png: not an image of this dataset"]
    assert (dataset / "nocap.txt").read_text().strip() == "now captioned"


def test_upload_limits(tmp_path, monkeypatch):
    run = jobs.new_run_dir(tmp_path / "outputs", "limits")
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.png").write_bytes(png_bytes())
    monkeypatch.setattr(uploads, "MAX_FILE_BYTES", 100)
    _, problems = uploads.add_files(run, [tmp_path / "a.png"])
    assert problems and "over the" in problems[0] and "a.png" in problems[0]
    monkeypatch.setattr(uploads, "MAX_FILE_BYTES", 10**6)
    monkeypatch.setattr(uploads, "MAX_FILES", 1)
    stored, problems = uploads.add_files(run, [tmp_path / "a.png", tmp_path / "b.png"])
    assert len(stored) == 1 and "limit" in problems[0]


def test_run_names_stay_inside_outputs(tmp_path):
    outputs = tmp_path / "outputs"
    run = jobs.new_run_dir(outputs, "x")
    assert jobs.run_path(outputs, "x") == run
    for bad in ("..", "../x", "/tmp", "x/..", ""):
        with pytest.raises(FileNotFoundError):
            jobs.run_path(outputs, bad)


# ----------------------------------------------------------------------------- form


def test_form_round_trip_and_errors():
    for preset in form.list_presets():
        values = form.preset_values(preset)
        assert form.values_to_config(preset, values) == form.load_preset_config(preset)
    values = form.preset_values("tiny-test")
    values.update({"train.steps": 7.0, "sample.prompts": "a\n\n b ", "model.revision": ""})
    cfg = form.values_to_config("tiny-test", values, "train.warmup_steps=1\n# comment")
    assert cfg.train.steps == 7 and cfg.sample.prompts == ["a", "b"] and cfg.model.revision is None
    assert cfg.train.warmup_steps == 1
    with pytest.raises(form.ConfigError, match="train.steps"):
        form.values_to_config("tiny-test", {**values, "train.steps": 0})
    with pytest.raises(form.ConfigError, match="nosuch"):
        form.values_to_config("tiny-test", values, "train.nosuch=1")
    assert all(s.help for s in form.BASIC_SPECS), "every basic field has help text from the config"


def test_ui_module_does_not_import_torch():
    code = "import sys, app.ui, app.jobs, app.form; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- queue and processes

FAKE_TRAINER = """
import json, sys, time, pathlib
run = pathlib.Path(sys.argv[sys.argv.index("--run-dir") + 1])
end = time.time() + 60
while not (run / "go").exists() and time.time() < end:
    time.sleep(0.05)
with open(run / "events.jsonl", "a") as f:
    f.write(json.dumps({"type": "done", "step": 1}) + "\\n")
"""


def test_queue_runs_one_at_a_time_in_order(tmp_path, monkeypatch):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    monkeypatch.setattr(jobs, "TRAINER_CMD", [sys.executable, str(fake)])
    outputs = tmp_path / "outputs"
    cfg = form.load_preset_config("tiny-test")
    runs = []
    for name in ("first", "second", "third", "fourth"):
        run, _ = jobs.create_run(outputs, cfg, [EXAMPLES[0]], name=name)
        runs.append(run)
        time.sleep(0.01)
    a, b, c, d = runs
    assert [jobs.status(r).state for r in runs] == ["queued"] * 4
    assert jobs.advance(outputs) == a
    assert jobs.advance(outputs) is None  # one at a time
    assert jobs.status(a).state == "running" and jobs.status(b).state == "queued"
    assert "cancelled before it started" in jobs.cancel(b)
    (a / "go").touch()
    wait_for(lambda: jobs.status(a).state == "done", 30, what="first run done")
    assert jobs.advance(outputs) == c  # b was cancelled: skipped
    assert jobs.status(b).state == "cancelled" and "pid" not in jobs.read_job(b)
    (c / "go").touch()
    wait_for(lambda: jobs.status(c).state == "done", 30, what="third run done")
    (d / "go").touch()
    assert jobs.advance(outputs) == d
    wait_for(lambda: jobs.status(d).state == "done", 30, what="fourth run done")
    assert jobs.advance(outputs) is None
    assert [s.state for s in jobs.list_runs(outputs)] == ["done", "done", "cancelled", "done"]


def _real_run(tmp_path, make_cfg, reap, name: str, steps: int) -> Path:
    cfg = make_cfg(f"train.steps={steps}")
    run, problems = jobs.create_run(tmp_path / "outputs", cfg, EXAMPLES, name=name)
    assert problems == []
    reap.append(run)
    assert jobs.advance(tmp_path / "outputs") == run
    return run


def test_kill_9_marks_failed_with_log_tail(tmp_path, make_cfg, reap):
    run = _real_run(tmp_path, make_cfg, reap, "killed", steps=100000)
    wait_for(lambda: jobs.status(run).step >= 1, 180, what="first step")
    pid = jobs.read_job(run)["pid"]
    proc = jobs._CHILDREN.pop(pid)  # as after a server restart: only the pid in job.json is known
    assert jobs.status(run).state == "running"  # reattached through /proc
    os.kill(pid, signal.SIGKILL)
    st = wait_for(lambda: (s := jobs.status(run)).state == "failed" and s, 30, what="failed state")
    assert "without finishing" in st.reason
    assert "training:" in st.reason  # the end of train.log (tqdm progress)
    proc.wait(10)
    jobs._CHILDREN[pid] = proc  # with the Popen known, the signal is named
    assert "killed by signal 9" in jobs.status(run).reason


def test_cancel_stops_with_partial_adapter(tmp_path, make_cfg, reap):
    from safetensors import safe_open

    run = _real_run(tmp_path, make_cfg, reap, "cancelled", steps=100000)
    # Cancel before the trainer has even started (it clears RUN/stop at start): the queue loop re-asserts it.
    assert "stopping" in jobs.cancel(run)
    stop = jobs.start_queue_loop(tmp_path / "outputs", 0.2)
    try:
        st = wait_for(lambda: (s := jobs.status(run)).state == "stopped" and s, 180, what="stopped state")
    finally:
        stop.set()
    assert 1 <= st.step < 1000  # stopped within seconds of the request, not after running on
    adapters = jobs.adapter_files(run)
    assert {p.name for p in adapters} >= {"cancelled.safetensors", "cancelled.diffusers.safetensors"}
    for path in adapters:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            assert any("lora_up" in k or "lora_B" in k for k in keys)
            if "lora_up" in " ".join(keys):  # the kohya file says at which step it was saved: the stopped one
                assert f.metadata()["ss_steps"] == str(st.step)
    # resumable: the checkpoint of the step it stopped at
    assert (run / "checkpoints" / f"step-{st.step:06d}" / "state.json").is_file()
    zipped = jobs.run_zip(run)
    with zipfile.ZipFile(zipped) as zf:
        names = zf.namelist()
    assert f"{run.name}/config.toml" in names and not any("/checkpoints/" in n for n in names)


# ----------------------------------------------------------------------------- end to end through gradio_client


@pytest.fixture
def server(tmp_path):
    from app.ui import build_app

    outputs = tmp_path / "outputs"
    stop = jobs.start_queue_loop(outputs, 0.5)
    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, allowed_paths=[str(outputs)], quiet=True)
    yield f"http://127.0.0.1:{port}/", outputs
    stop.set()
    demo.close()
    for st in jobs.list_runs(outputs):  # never leave a trainer behind
        pid = jobs.read_job(st.run_dir).get("pid")
        if st.state in ("running", "stopping") and pid:
            os.kill(pid, signal.SIGKILL)


def test_ui_end_to_end(server, tiny_base, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from safetensors import safe_open

    url, outputs = server
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))

    with pytest.raises(AppError, match="Add images"):
        client.predict(run="", preset_name="tiny-test", extra_lines="", api_name="/train")

    bad = tmp_path / "notes.exe"
    bad.write_bytes(b"MZ")
    uploads = [handle_file(str(p)) for p in EXAMPLES] + [handle_file(str(bad))]
    run, grid, md, _ = client.predict(uploads, "", "e2e run", 16, api_name="/upload")
    assert run == "e2e_run"
    assert len(grid["data"]) == 12 and {row[3] for row in grid["data"]} == {"ok"}
    assert "notes.exe" in md and "refused" in md
    grid["data"][0][2] = "an edited caption"
    same, grid, md = client.predict(run, grid, 16, api_name="/save_captions")
    assert same == run and (outputs / run / "dataset" / EXAMPLES[0].with_suffix(".txt").name).read_text() == \
        "an edited caption\n"

    common = dict(run=run, preset_name="tiny-test", model_path=str(tiny_base), train_checkpoint_every=0,
                  train_save_every=0, sample_every=0)
    with pytest.raises(AppError, match="train.steps"):
        client.predict(**common, train_steps=0, extra_lines="", api_name="/train")

    # train -> done -> download the adapter and the zip
    status_md, selected = client.predict(**common, train_steps=3, extra_lines="", api_name="/train")
    assert run in status_md and selected["value"] == run  # the Runs dropdown update, selecting the new run
    wait_for_run_end(outputs / run)  # the run's own events, not a guess of how long it takes
    st = client.predict(run, api_name="/status")
    assert st["state"] == "done", st
    assert st["step"] == 3 and st["samples"], st
    md, loss, samples, files, config, log, report_png, verdict = client.predict(run, api_name="/panel")
    assert "done" in md and "3/3" in md
    assert "Style report" in md and "style lift" in md  # the trainer's report event, shown on the panel
    assert "which file for which tool" in md and "A1111/Forge, ComfyUI, kohya `merge_lora.py`, diffusers — exact" in md
    assert report_png and Path(report_png).stat().st_size > 0
    assert len(loss["data"]) == 3
    assert samples
    adapters = [f for f in files if f.endswith(".safetensors")]
    assert adapters and any(f.endswith(".zip") for f in files)
    for path in adapters:
        assert Path(path).resolve().is_relative_to((tmp_path / "downloads").resolve())  # came over HTTP
        with safe_open(path, "pt") as f:
            assert len(list(f.keys())) > 0
    assert 'trigger = "zkstyle"' in config and str(outputs / run / "dataset") in config

    # nothing was written outside the outputs folder (the tmp downloads are the client's)
    assert {p.name for p in tmp_path.iterdir()} <= {"outputs", "downloads", "notes.exe"}


@pytest.mark.slow
def test_ui_cancel_and_killed_worker(server, tiny_base, tmp_path):
    """Through the UI: Cancel saves a partial adapter; kill -9 of the worker is reported and the UI stays up."""
    from gradio_client import Client, handle_file

    url, outputs = server
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    run = client.predict([handle_file(str(p)) for p in EXAMPLES], "", "slow", 16, api_name="/upload")[0]
    common = dict(run=run, preset_name="tiny-test", model_path=str(tiny_base), train_checkpoint_every=0,
                  train_save_every=0, sample_every=0)
    # a long run -> cancel -> stopped with a partial adapter
    second = client.predict(**common, train_steps=100000, extra_lines="", api_name="/train")[1]["value"]
    assert second == run
    wait_for(lambda: client.predict(second, api_name="/status")["step"] >= 1, 180, 0.5, "run stepping")
    client.predict(second, api_name="/cancel")
    st = wait_for(lambda: (s := client.predict(second, api_name="/status"))["state"] in ("stopped", "failed") and s,
                  120, 0.5, "run stopped")
    assert st["state"] == "stopped" and st["adapters"], st
    files = client.predict(second, api_name="/panel")[3]
    assert any(f.endswith(".safetensors") for f in files)

    # training the same dataset again makes a new run folder with a copy of it; kill -9 -> failed
    third = client.predict(**common, train_steps=100000, extra_lines="", api_name="/train")[1]["value"]
    assert third != run and (outputs / third / "dataset" / EXAMPLES[0].name).exists()
    wait_for(lambda: client.predict(third, api_name="/status")["step"] >= 1, 180, 0.5, "second run stepping")
    os.kill(json.loads((outputs / third / "job.json").read_text())["pid"], signal.SIGKILL)
    st = wait_for(lambda: (s := client.predict(third, api_name="/status"))["state"] == "failed" and s,
                  30, 0.5, "second run failed")
    assert "killed by signal 9" in st["reason"] and "training:" in st["reason"]
    md = client.predict(third, api_name="/panel")[0]
    assert "Failed" in md and "killed by signal 9" in md


def test_dataset_with_no_usable_image_names_each_file(tmp_path):
    run = jobs.new_run_dir(tmp_path / "outputs", "bad")
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.png").write_bytes(png_bytes((8, 8)))
    uploads.add_files(run, [tmp_path / "a.png", tmp_path / "b.png"])
    rows, error = uploads.dataset_items(run, 64)
    assert "none of the 2 images" in error
    status = {r["file"]: r["status"] for r in rows}
    assert status["a.png"].startswith("cannot decode") and status["b.png"].startswith("too small")
