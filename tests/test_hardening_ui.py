"""Hardening, round 2 (issue 15), the web app's side: uploads are transactional (a refused or failed file never
replaces a good one, and the rest of a batch is stored), logins are throttled, and the run that just finished is
the preview's pick. The trainer's side is tests/test_hardening.py."""

from __future__ import annotations

import errno
import json
import time
import zipfile
from pathlib import Path


from app import jobs, uploads
from tests.conftest import TINY_STYLE, free_port


# ----------------------------------------------------------------------------- transactional uploads


def _png() -> bytes:
    return next(TINY_STYLE.glob("*.png")).read_bytes()


def test_a_refused_upload_never_replaces_a_good_file(tmp_path):
    run = tmp_path / "run"
    good = tmp_path / "a.png"
    good.write_bytes(_png())
    assert uploads.add_files(run, [good])[1] == []
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(lying, "w") as zf:
        zf.writestr("a.png", b"junk " * 500)
    raw = bytearray(lying.read_bytes())  # the size field says 10 bytes: the entry holds 2500
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.find(sig) + offset
        raw[at:at + 4] = (10).to_bytes(4, "little")
    lying.write_bytes(bytes(raw))
    stored, problems = uploads.add_files(run, [lying])
    assert stored == [] and "a.png" in problems[0] and "not stored" in problems[0]
    assert (run / "dataset" / "a.png").read_bytes() == _png()
    assert sorted(p.name for p in (run / "dataset").iterdir()) == ["a.png"]  # no temporary left


def test_a_name_taken_by_a_folder_is_refused_and_the_batch_goes_on(tmp_path):
    run = tmp_path / "run"
    archive = tmp_path / "earlier.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png/inside.png", _png())
    assert uploads.add_files(run, [archive])[1] == []
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png())
    b.write_bytes(_png())
    stored, problems = uploads.add_files(run, [a, b])
    assert problems == ["a.png: a folder of that name already exists in the dataset (from an earlier zip?); rename "
                        "the file or start a new dataset"]
    assert stored == [run / "dataset" / "b.png"] and (run / "dataset" / "a.png" / "inside.png").is_file()


def test_a_full_disk_refuses_one_upload_keeps_the_old_file_and_the_rest(tmp_path, monkeypatch):
    import os

    run = tmp_path / "run"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png())
    b.write_bytes(_png()[:-1])
    uploads.add_files(run, [a])
    real, calls = os.replace, []

    def full_once(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst)

    monkeypatch.setattr(uploads.os, "replace", full_once)
    b_as_a = tmp_path / "new" / "a.png"
    b_as_a.parent.mkdir()
    b_as_a.write_bytes(b"other bytes")
    stored, problems = uploads.add_files(run, [b_as_a, b])
    assert len(problems) == 1 and problems[0].startswith("a.png: cannot store: ") and "the disk is full" in problems[0]
    assert stored == [run / "dataset" / "b.png"]
    assert (run / "dataset" / "a.png").read_bytes() == _png()
    assert not [p for p in (run / "dataset").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- login throttling


def test_login_throttle_per_user_and_address():
    from app.auth import LoginThrottle

    now = [0.0]
    t = LoginThrottle(per_user=3, per_address=5, first_lock_s=2, max_lock_s=60, forget_s=600, clock=lambda: now[0])
    for _ in range(3):
        assert t.wait_s("alice", "1.1.1.1") == (0.0, "")
        t.failed("alice", "1.1.1.1")
    assert t.wait_s("alice", "1.1.1.1") == (0.0, "")  # three free failures
    t.failed("alice", "1.1.1.1")
    assert t.wait_s("alice", "9.9.9.9") == (2.0, "user")  # the user is locked from any address
    assert t.wait_s("bob", "1.1.1.1") == (0.0, "")  # another user from the same address is not (yet)
    now[0] += 2.5
    t.failed("alice", "2.2.2.2")
    assert t.wait_s("alice", "2.2.2.2")[0] == 4.0  # doubling
    for _ in range(20):
        now[0] += 100
        t.failed("alice", "3.3.3.3")
    assert t.wait_s("alice", "3.3.3.3") == (60.0, "user")  # capped
    t.succeeded("alice", "3.3.3.3")
    assert t.wait_s("alice", "4.4.4.4") == (0.0, "")  # a success clears the user...
    assert t.wait_s("carol", "3.3.3.3")[1] == "addr"  # ...not the address that guessed
    now[0] += 700
    assert t.wait_s("carol", "3.3.3.3") == (0.0, "")
    t.failed("carol", "3.3.3.3")
    assert t.wait_s("carol", "3.3.3.3") == (0.0, "")  # forgotten after forget_s
    for i in range(LoginThrottle.MAX_KEYS + 10):
        t.failed(f"made-up-{i}", "5.5.5.5")
    assert len(t._failures) <= LoginThrottle.MAX_KEYS + 2


def test_login_attempts_are_throttled_through_the_server(tmp_path):
    import httpx

    from app.auth import LoginThrottle, launch_kwargs
    from app.ui import build_app

    now = [0.0]
    throttle = LoginThrottle(per_user=5, per_address=8, clock=lambda: now[0])
    demo = build_app(tmp_path / "outputs")
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, quiet=True,
                        **launch_kwargs([("alice", "wonderland"), ("bob", "pw")], throttle))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            def login(user: str, password: str) -> httpx.Response:
                return http.post("/login", data={"username": user, "password": password})

            assert [login("alice", f"guess{i}").status_code for i in range(5)] == [400] * 5
            r = login("alice", "guess5")
            assert r.status_code == 400
            locked = login("alice", "wonderland")  # locked: the right password does not get in either
            assert locked.status_code == 429 and "Too many failed logins for user 'alice'" in locked.text
            assert login("bob", "pw").status_code == 200  # one user's lock is not another's
            assert [login("mallory", "x").status_code for _ in range(3)] == [400] * 3
            blocked = login("bob", "pw")  # 9 failures from this address (8 free): every login from it waits
            assert blocked.status_code == 429 and "address 127.0.0.1" in blocked.text
            now[0] += 3600
            assert login("alice", "wonderland").status_code == 200
    finally:
        demo.close()


# ----------------------------------------------------------------------------- preview after a run


def _finished_run(outputs: Path, name: str, ended: float) -> None:
    run = outputs / name
    run.mkdir(parents=True)
    jobs.write_job(run, {"queued_at": ended - 10, "pid": 999999999, "launched_at": ended - 10})
    (run / "events.jsonl").write_text(json.dumps({"type": "done", "step": 1, "time": ended}) + "\n")
    (run / f"{name}.safetensors").write_bytes(b"adapter")


def test_the_run_that_just_finished_is_preselected_in_the_preview_tab(tmp_path):
    from gradio_client import Client

    from app.ui import build_app

    outputs = tmp_path / "outputs"
    _finished_run(outputs, "older", time.time() - 100)
    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, quiet=True, allowed_paths=[str(outputs)])

    def preview_pick(outputs_of_tick) -> str | None:
        picks = [o["value"] for o in outputs_of_tick if isinstance(o, dict) and str(o.get("value")).startswith("run:")]
        return picks[0] if picks else None

    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert preview_pick(c.predict("", api_name="/tick")) == "run:older"
        assert preview_pick(c.predict("", api_name="/tick")) is None  # nothing new: the user's pick is left alone
        _finished_run(outputs, "fresh", time.time())  # a run ends while the page is open
        assert preview_pick(c.predict("", api_name="/tick")) == "run:fresh"
    finally:
        demo.close()


# ----------------------------------------------------------------------------- issue 30: a run's files for its owner only


def _owned_runs(outputs: Path) -> dict[str, Path]:
    runs = {}
    for user in ("alice", "bob"):
        runs[user] = jobs.new_run_dir(outputs, "style", owner=user)
        for name in ("style.safetensors", "train.log"):
            (runs[user] / name).write_text(f"{user}'s {name}")
        jobs.write_job(runs[user], {"queued_at": 0.0})
    return runs


def test_a_run_s_files_are_served_only_to_its_owner(tmp_path):
    import httpx
    from gradio_client import Client

    from app.__main__ import served_paths
    from app.auth import launch_kwargs
    from app.preview_client import uploads_dir
    from app.ui import build_app

    outputs = (tmp_path / "outputs").resolve()
    runs = _owned_runs(outputs)
    (runs["bob"] / "link.log").symlink_to(runs["alice"] / "train.log")  # a link in bob's run to alice's file
    upload = uploads_dir(outputs, "alice")
    upload.mkdir(parents=True)
    (upload / "mine.safetensors").write_text("alice's upload")
    demo = build_app(outputs)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    demo.queue().launch(prevent_thread_lock=True, server_port=port, quiet=True, **served_paths(outputs),
                        **launch_kwargs([("alice", "wonderland"), ("bob", "builder")], outputs=outputs))
    try:
        with httpx.Client(base_url=url) as alice, httpx.Client(base_url=url) as bob, \
                httpx.Client(base_url=url) as nobody:
            assert alice.post("/login", data={"username": "alice", "password": "wonderland"}).status_code == 200
            assert bob.post("/login", data={"username": "bob", "password": "builder"}).status_code == 200
            for path in [runs["alice"] / n for n in ("style.safetensors", "train.log", "job.json")]:
                mine = alice.get(f"/gradio_api/file={path}")
                assert mine.status_code == 200 and mine.content == path.read_bytes()
                assert bob.get(f"/gradio_api/file={path}").status_code == 404  # as if it did not exist
                assert bob.head(f"/gradio_api/file={path}").status_code == 404
                assert nobody.get(f"/gradio_api/file={path}").status_code in (401, 403, 404)
            around = [f"{runs['bob']}/%2E%2E/{runs['alice'].name}/train.log",  # '..' out of bob's own run
                      f"{runs['bob'] / 'link.log'}",  # a link out of it
                      f"{upload / 'mine.safetensors'}"]  # another user's preview upload
            for path in around:
                assert bob.get(f"/gradio_api/file={path}").status_code == 404, path
            assert alice.get(f"/gradio_api/file={upload / 'mine.safetensors'}").status_code == 200
            assert bob.get(f"/gradio_api/file={runs['bob'] / 'train.log'}").text == "bob's train.log"
        probe = Client(url + "/", verbose=False, auth=("bob", "builder")).predict("/etc", api_name="/describe_base")
        assert "path not found here" in probe, probe  # /etc exists, but the picker does not say so
    finally:
        demo.close()


def test_the_base_picker_describes_no_server_path_outside_the_base_folders(tiny_base, tmp_path, monkeypatch):
    from app import form

    outputs = tmp_path / "outputs"
    (outputs / "run").mkdir(parents=True)
    (outputs / "run" / "etc").symlink_to("/etc")
    monkeypatch.delenv("STYLE_LORA_BASE_DIRS", raising=False)
    unknown = form.describe_base("someone/some-model", "alice", outputs)
    assert "SD 1.x" in form.describe_base(str(tiny_base))  # without login the one user owns the server
    assert "not found here" not in form.describe_base("/etc")
    for probe in (str(tiny_base), "/etc", "/etc/passwd", "/no/such/folder", f"{outputs}/../../..",
                  str(outputs / "run" / "etc"), str(tiny_base / "unet" / "config.json")):
        assert form.describe_base(probe, "alice", outputs) == unknown, probe
    monkeypatch.setenv("STYLE_LORA_BASE_DIRS", str(tiny_base.parent))  # the admin's model folder
    assert "SD 1.x" in form.describe_base(str(tiny_base), "alice", outputs)


# ----------------------------------------------------------------------------- issue 30: Prodigy in the form


def test_choosing_prodigy_in_the_form_sets_both_learning_rates_unless_the_user_set_them():
    import pytest

    from app import form
    from trainer.config import ConfigError

    for preset in form.list_presets():
        values = form.preset_values(preset)
        rates = (values["train.lr_unet"], values["train.lr_text_encoder"])
        if values["train.optimizer"] == "prodigy":
            continue
        # the widgets change as soon as Prodigy is picked, and change back when it is left
        assert form.learning_rates_for("prodigy", preset, *rates) == (1.0, 1.0), preset
        assert form.learning_rates_for("adamw", preset, 1.0, 1.0) == rates
        assert form.learning_rates_for("prodigy", preset, 0.5, 0.5) == (0.5, 0.5)  # the user's: kept
        # the form sent with the preset's rates (no change event, e.g. the API) trains with Prodigy at 1.0
        cfg = form.values_to_config(preset, {**values, "train.optimizer": "prodigy"})
        assert (cfg.train.optimizer, cfg.train.lr_unet, cfg.train.lr_text_encoder) == ("prodigy", 1.0, 1.0), preset
        both = {**values, "train.optimizer": "prodigy", "lora.train_unet": True, "lora.train_text_encoder": True}
        with pytest.raises(ConfigError, match="prodigy needs one learning rate"):  # an explicit conflict: refused
            form.values_to_config(preset, {**both, "train.lr_unet": 1.0, "train.lr_text_encoder": 0.5})


def test_the_learning_rate_widgets_follow_the_optimizer_through_the_server(tmp_path):
    from gradio_client import Client

    from app import form
    from app.ui import build_app

    demo = build_app(tmp_path / "outputs")
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, quiet=True)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        values = form.preset_values(form.DEFAULT_PRESET)
        rates = (values["train.lr_unet"], values["train.lr_text_encoder"])
        assert tuple(c.predict("prodigy", form.DEFAULT_PRESET, *rates, api_name="/optimizer")) == (1.0, 1.0)
        assert tuple(c.predict("adamw", form.DEFAULT_PRESET, 1.0, 1.0, api_name="/optimizer")) == rates
    finally:
        demo.close()


# ----------------------------------------------------------------------------- issue 30: waits follow the run's events

FAKE_RUN = """
import json, sys, time
run_dir, steps, every, hang = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "hang"
def emit(kind, **kw):
    with open(run_dir + "/events.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "type": kind, **kw}) + "\\n")
for step in range(1, steps + 1):
    time.sleep(every)
    emit("step", step=step, total=steps, loss=0.1)
    if hang:
        time.sleep(600)
emit("done", step=steps, paths=[])
emit("report", summary={})
"""


def _fake_run(outputs: Path, steps: int, every: float, hang: bool = False):
    import subprocess
    import sys

    run = outputs / ("hangs" if hang else "slow")
    run.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_RUN, str(run.resolve()), str(steps), str(every),
                             "hang" if hang else "go"])
    jobs.write_job(run, {"queued_at": time.time(), "pid": proc.pid, "launched_at": time.time()})
    return run, proc


def test_waiting_for_a_run_follows_its_events_not_a_fixed_guess(tmp_path):
    import pytest

    from tests.conftest import wait_for_run_end

    run, proc = _fake_run(tmp_path / "outputs", steps=8, every=0.5)  # 4 s in all, an event every 0.5 s
    try:
        started = time.time()
        ended = wait_for_run_end(run, stall_s=2.0, ceiling_s=60)  # longer than the stall limit, yet never stalled
        assert ended.state == "done" and ended.step == 8 and time.time() - started > 2.0
    finally:
        proc.wait(30)
    stuck, proc = _fake_run(tmp_path / "outputs", steps=8, every=0.1, hang=True)
    try:
        with pytest.raises(AssertionError, match=r"hangs: state running after \d+s, no new event for \d+s "
                                                 r"\(last: step\)"):
            wait_for_run_end(stuck, stall_s=2.0, ceiling_s=60)
    finally:
        proc.kill()
        proc.wait(30)
