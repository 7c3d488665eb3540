"""Reliability: the generated bad-input corpus through the trainer and the upload path, pickles refused, disk-space
refusal, atomic checkpoints, OOM as a failed state, kill -9 + resume to the same weights, login and file access."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest

from app import jobs, uploads
from tests.conftest import ROOT, TINY_STYLE, free_port, wait_for

CORPUS = ROOT / "tests" / "bad_inputs"
PWNED = Path("/tmp/style-lora-pwned")  # what the corpus' pickles would write if anything unpickled them


def _script():
    spec = importlib.util.spec_from_file_location("make_bad_inputs", ROOT / "scripts" / "make_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    dest = tmp_path_factory.mktemp("corpus") / "bad_inputs"
    cases = _script().build(dest)
    return dest, cases


def data_cases(cases):
    return [c for c in cases if c["where"] == "dataset"]


# ----------------------------------------------------------------------------- the corpus


def test_corpus_is_generated_and_the_checked_in_copy_matches(corpus):
    dest, cases = corpus
    assert len(cases) >= 20 and len({c["name"] for c in cases}) == len(cases)
    names = {c["name"] for c in cases}
    for needed in ("zero-byte", "truncated-png", "truncated-jpeg", "not-an-image", "decompression-bomb", "one-pixel",
                   "20000px-wide", "cmyk-jpeg", "16-bit", "palette-transparency", "animated-gif", "animated-webp",
                   "exif-rotated", "webp", "caption-bad-encoding", "caption-without-image", "duplicate-names-by-case",
                   "zip-dotdot", "zip-symlink", "pickle-base-ckpt", "pickle-adapter-pt",
                   # round 2 (issue 15): archive quotas and lying headers, huge captions/repeats, non-finite
                   # adapters, settings refused before loading
                   "caption-too-large", "zip-huge-repeats", "zip-bomb", "zip-bomb-spread", "zip-declared-huge",
                   "zip-size-field-too-small", "zip-size-field-too-large", "zip-too-many-entries",
                   "zip-file-folder-clash", "adapter-nan", "adapter-inf", "sample-width-7", "lr-inf", "alpha-nan",
                   "steps-1e12", "resolution-100000", "repeats-huge"):
        assert needed in names, needed
    assert CORPUS.is_dir(), "run: python scripts/make_bad_inputs.py"
    assert _tree(CORPUS) == _tree(dest), "tests/bad_inputs is stale: run python scripts/make_bad_inputs.py"


def _check_scan(items, problems, cases, root: Path):
    used = {i.path.relative_to(root).as_posix() for i in items}
    for c in data_cases(cases):
        mine = [p for p in problems if p.path.name == c["about"]]
        if c["expect"] == "train":
            assert c["about"] in used and not mine, (c["name"], mine)
            continue
        assert any(c["says"] in p.reason for p in mine), (c["name"], [p.reason for p in mine])
        if c["expect"] == "skip":
            assert c["about"] not in used and all(p.skipped for p in mine), c["name"]
        else:  # warn: the images of the case still train
            assert {f for f in c["files"] if not f.endswith(".txt")} <= used, c["name"]
    assert {f"{p.stem}.png" for p in TINY_STYLE.glob("0[0-3]_*.png")} <= used  # the good images


def test_corpus_scan_gives_each_file_a_precise_message(corpus):
    from trainer.config import load_config
    from trainer.data.dataset import scan_dataset
    from trainer.data.images import load_image

    dest, cases = corpus
    cfg = load_config(ROOT / "presets" / "tiny-test.toml", [f'data.path="{dest / "dataset"}"'])
    items, problems = scan_dataset(cfg.data)
    _check_scan(items, problems, cases, dest / "dataset")
    by_name = {i.path.name: i for i in items}
    assert by_name["exif_rotated.jpg"].size == (64, 96)  # EXIF orientation applied
    assert by_name["wide_20000px.png"].bucket[0] / by_name["wide_20000px.png"].bucket[1] >= 4
    assert by_name["utf16_caption.png"].caption == "zkstyle, utf16 caption"
    assert by_name["twin.png"].caption == by_name["twin.jpg"].caption == "shared caption"
    gray = load_image(by_name["gray16.png"].path, (64, 64))
    assert gray.max() > 0.9 and gray.min() < -0.9  # 16 bit scaled to the full range, not clipped to white
    pal = load_image(by_name["palette_alpha.png"].path, (64, 64))
    assert pal[:, :, :20].min() > 0.99  # the transparent half is white, not black
    for problem in problems:
        assert str(problem).startswith(str(problem.path)) and problem.path.is_relative_to(dest / "dataset")


def test_corpus_trains_the_rest_and_writes_only_the_run_folder(corpus, make_cfg, tmp_path):
    import trainer.training.loop as loop
    from trainer.events import read_events

    dest, cases = corpus
    data = tmp_path / "data"
    shutil.copytree(dest / "dataset", data)
    before, outside_before = _tree(data), sorted(p.name for p in tmp_path.iterdir())
    PWNED.unlink(missing_ok=True)
    loop.train(make_cfg("train.steps=2", f'data.path="{data}"'), tmp_path / "run")
    events, _ = read_events(tmp_path / "run" / "events.jsonl")
    assert events[-1]["type"] == "done" and events[-1]["step"] == 2
    reported = {(Path(e["path"]).name, e["reason"]) for e in events if e["type"] == "problem"}
    for c in data_cases(cases):
        hits = [r for name, r in reported if name == c["about"]]
        assert (c["says"] in " ".join(hits)) if c["expect"] != "train" else not hits, (c["name"], hits)
    start = next(e for e in events if e["type"] == "start")
    assert start["images"] == 4 + sum(len([f for f in c["files"] if not f.endswith(".txt")])
                                      for c in data_cases(cases) if c["expect"] != "skip")
    assert start["trainable_params"] <= start["lora_params_estimate"] <= 1.5 * start["trainable_params"]
    assert start["disk_needed_bytes"] < start["disk_free_bytes"]
    assert _tree(data) == before, "the dataset was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*outside_before, "run"])
    assert not PWNED.exists()


def test_corpus_through_the_upload_path(corpus, tmp_path):
    dest, cases = corpus
    run = jobs.new_run_dir(tmp_path / "outputs", "corpus")
    files = sorted((dest / "dataset").iterdir()) + sorted((dest / "uploads").iterdir())
    stored, problems = uploads.add_files(run, files)
    text = "\n".join(problems)
    for c in cases:
        if c["where"] == "uploads":
            assert c["says"] in text and c["files"][0] in text, (c["name"], text)
    dataset = run / "dataset"
    assert all(p.resolve().is_relative_to(dataset.resolve()) for p in dataset.rglob("*"))
    assert (dataset / "ok" / "in_zip.png").is_file() and (dataset / "fine.png").is_file()  # the zips' good entries
    assert not any(p.is_symlink() for p in dataset.rglob("*"))
    assert not (tmp_path / "outputs" / "escape.png").exists() and not (tmp_path / "etc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    # refused archives and entries leave nothing behind: no partial or 0-byte file, no temporary, no folder
    for name in ("short_size.png", "long_size.png", "bomb.png", "flat_000.bmp", "big.png", "c0000.txt",
                 "99999999999_x"):
        assert not (dataset / name).exists(), name
    assert not [p for p in dataset.rglob("*") if p.name.startswith(".")]  # no temporary left
    assert (dataset / "clash.png").is_file() and not (dataset / "clash.png" / "inner.png").exists()

    rows, error = uploads.dataset_items(run, min_image_size=16)
    assert error == ""
    status = {r["file"]: r["status"] for r in rows}
    for c in data_cases(cases):
        if c["expect"] == "skip":
            assert c["says"] in status[c["about"]], (c["name"], status[c["about"]])
        elif c["expect"] == "warn":
            key = c["about"] if c["about"] in status else c["files"][0]
            assert c["says"] in status[key], (c["name"], status.get(key))
        else:
            img = next(f for f in c["files"] if not f.endswith(".txt"))
            assert status[img] in ("ok", "missing caption (trains on the trigger word alone)"), (c["name"], status[img])
    assert uploads.save_captions(run, {"orphan_caption.txt": "x"}) == []  # a caption row: nothing to save


def test_pickles_are_never_loaded(corpus, tmp_path, monkeypatch):
    import pickle

    import torch

    from trainer.config import ModelConfig
    from trainer.lora_files.convert import convert_file
    from trainer.families.loading import ModelError, load_base, resolve_source

    dest, _ = corpus
    models = dest / "models"
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a) or pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a) or pytest.fail("pickle.loads called"))
    PWNED.unlink(missing_ok=True)
    with pytest.raises(ModelError, match="pickles"):
        resolve_source(str(models / "base.ckpt"))
    with pytest.raises(ValueError, match="pickles"):
        convert_file(models / "adapter.pt", tmp_path / "out.safetensors", "diffusers")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        convert_file(models / "renamed_pickle.safetensors", tmp_path / "out.safetensors", "diffusers")
    with pytest.raises(ModelError, match="cannot load"):
        load_base(ModelConfig(path=str(models / "renamed_pickle.safetensors")))
    assert calls == [] and not PWNED.exists() and not (tmp_path / "out.safetensors").exists()


def test_base_folder_with_only_pickled_weights_is_refused(tiny_base, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from trainer.config import ModelConfig
    from trainer.families.loading import ModelError, load_base

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    weights = next((base / "unet").glob("*.safetensors"))
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ModelError, match="safetensors"):
        load_base(ModelConfig(path=str(base)))
    assert calls == []


# ----------------------------------------------------------------------------- disk and atomic writes


def test_refuses_to_start_without_disk_space(make_cfg, tmp_path, monkeypatch):
    import trainer.training.loop as loop
    from trainer.training.checkpoint import DiskSpaceError
    from trainer.events import read_events

    free = 5 * 2**20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("loaded the model before the disk check"))
    with pytest.raises(DiskSpaceError, match=r"needs about \d+ MiB \(.*checkpoint.*\), only 5 MiB free"):
        loop.train(make_cfg("train.steps=4", "train.checkpoint_every=1"), tmp_path / "run")
    events, _ = read_events(tmp_path / "run" / "events.jsonl")
    assert events[-1]["type"] == "failed" and "only 5 MiB free" in events[-1]["reason"]
    # through the job state the UI shows
    job_dir = tmp_path / "run"
    jobs.write_job(job_dir, {"queued_at": 0, "pid": 999999999, "launched_at": 0})
    st = jobs.status(job_dir)
    assert st.state == "failed" and "only 5 MiB free" in st.reason.splitlines()[0]


def test_disk_estimate_grows_with_what_is_kept(make_cfg):
    from trainer.training.checkpoint import estimate_run_bytes

    small = estimate_run_bytes(make_cfg("train.checkpoint_every=0", "train.save_every=0"), 100)["needed_bytes"]
    big = estimate_run_bytes(make_cfg("train.checkpoint_every=1", "train.keep_checkpoints=5", "train.save_every=10",
                                      "lora.rank=64"), 100)["needed_bytes"]
    assert big > small


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import torch

    import trainer.training.checkpoint as ck

    module = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = tmp_path / "run"
    ck.save_checkpoint(run / "checkpoints" / "step-000001", 1, {"m": module}, opt, sched)
    good = _tree(run / "checkpoints" / "step-000001")
    real, n = ck.save_file, {"calls": 0}

    def dies_midway(*a, **k):  # the process 'dies' after the first file of the next checkpoint
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ck, "save_file", dies_midway)
    for step in (2, 1):  # a new step, and re-saving an existing one (a resumed run)
        n["calls"] = 0
        with pytest.raises(KeyboardInterrupt):
            ck.save_checkpoint(run / "checkpoints" / f"step-{step:06d}", step, {"m": module}, opt, sched)
        assert [p.name for p in ck.list_checkpoints(run)] == ["step-000001"]
        assert _tree(run / "checkpoints" / "step-000001") == good
    monkeypatch.setattr(ck, "save_file", real)
    ck.save_checkpoint(run / "checkpoints" / "step-000003", 3, {"m": module}, opt, sched)
    ck.prune_checkpoints(run, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]  # leftovers cleared


# ----------------------------------------------------------------------------- web server: login, files, sessions


def test_parse_auth(tmp_path):
    from app.__main__ import parse_auth

    f = tmp_path / "users"
    f.write_text("# team\nbob:s3:cret\n\ncarol:pw\n")
    assert parse_auth(["alice:pw1"], str(f)) == [("alice", "pw1"), ("bob", "s3:cret"), ("carol", "pw")]
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth([bad], None)


def test_login_file_access_and_upload_through_the_ui(corpus, tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    from app.ui import build_app

    dest, cases = corpus
    outputs = tmp_path / "outputs"
    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, allowed_paths=[str(outputs)], quiet=True,
                        auth=[("alice", "wonderland")])
    url = f"http://127.0.0.1:{port}"
    try:
        files = sorted((dest / "dataset").iterdir()) + sorted((dest / "uploads").iterdir())
        with pytest.raises(Exception):
            Client(url + "/", verbose=False, auth=("alice", "wrong"))
        client = Client(url + "/", verbose=False, auth=("alice", "wonderland"))
        run, grid, md, _ = client.predict([handle_file(str(p)) for p in files], "", "corpus", 16, api_name="/upload")
        for c in cases:
            if c["expect"] in ("skip", "warn", "refuse") and c["where"] in ("dataset", "uploads"):
                assert c["about"] in md or c["files"][0] in md, (c["name"], md)
        image = outputs / run / "dataset" / "00_red_circle.png"
        assert image.is_file()
        anon = httpx.get(f"{url}/gradio_api/file={image}")
        assert anon.status_code in (401, 403), "a file was served without a login"
        with httpx.Client(base_url=url) as http:
            assert http.post("/login", data={"username": "alice", "password": "wonderland"}).status_code == 200
            assert http.get(f"/gradio_api/file={image}").status_code == 200
            for outside in ("/etc/passwd", str(ROOT / "pyproject.toml"), str(outputs / ".." / "x"),
                            str(ROOT / "tests" / "bad_inputs" / "models" / "base.ckpt")):
                r = http.get(f"/gradio_api/file={outside}")
                assert r.status_code in (403, 404), (outside, r.status_code)
    finally:
        demo.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


FAKE_TRAINER = """
import json, sys, time, pathlib
run = pathlib.Path(sys.argv[sys.argv.index("--run-dir") + 1])
with open(run / "events.jsonl", "a") as f:
    f.write(json.dumps({"type": "start", "time": time.time()}) + "\\n")
time.sleep(1.5)
with open(run / "events.jsonl", "a") as f:
    f.write(json.dumps({"type": "done", "step": 1, "time": time.time()}) + "\\n")
"""


def test_two_browser_sessions_training_at_once_queue(tmp_path, monkeypatch, reap):
    from gradio_client import Client, handle_file

    from app.ui import build_app

    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    monkeypatch.setattr(jobs, "TRAINER_CMD", [sys.executable, str(fake)])
    outputs = tmp_path / "outputs"
    stop = jobs.start_queue_loop(outputs, 0.2)
    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, allowed_paths=[str(outputs)], quiet=True)
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(2)]
        runs = [c.predict([handle_file(str(p)) for p in sorted(TINY_STYLE.glob("*"))], "", f"user{i}", 16,
                          api_name="/upload")[0] for i, c in enumerate(clients)]
        assert runs[0] != runs[1]
        results = [None, None]

        def train(i):
            results[i] = clients[i].predict(run=runs[i], preset_name="tiny-test", extra_lines="", api_name="/train")

        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(results)
        reap.extend(outputs / r for r in runs)
        states = sorted(jobs.status(outputs / r).state for r in runs)
        assert states == ["queued", "running"], states  # one at a time, the other waits its turn
        wait_for(lambda: all(jobs.status(outputs / r).state == "done" for r in runs), 60, what="both done")
        started = sorted(jobs.read_job(outputs / r)["started_at"] for r in runs)
        ended = [max(e["time"] for e in jobs.status(outputs / r).events) for r in runs]
        assert min(ended) <= started[1] + 0.5  # the second started only after the first ended
    finally:
        stop.set()
        demo.close()


def test_logged_in_users_see_only_their_own_runs(tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    from app import preview_client as preview
    from app.__main__ import served_paths
    from app.ui import build_app

    outputs = tmp_path / "outputs"
    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, quiet=True, **served_paths(outputs),
                        auth=[("alice", "wonderland"), ("bob", "builder")])
    url = f"http://127.0.0.1:{port}/"
    try:
        alice = Client(url, verbose=False, auth=("alice", "wonderland"))
        bob = Client(url, verbose=False, auth=("bob", "builder"))
        images = [handle_file(str(p)) for p in sorted(TINY_STYLE.glob("*"))[:4]]
        run = alice.predict(images, "", "secret-style", 16, api_name="/upload")[0]
        # The folder name carries 64 random bits: not guessable from the run name.
        assert re.fullmatch(r"secret-style-[0-9a-f]{16}", run), run
        assert jobs.owner_of(outputs / run) == "alice"
        assert alice.predict(run, api_name="/status")["state"] == "draft"
        assert bob.predict(run, api_name="/status")["state"] == "unknown"
        assert bob.predict(run, 16, api_name="/dataset")[0]["data"] in ([], [[]], None) or \
            "No dataset" in bob.predict(run, 16, api_name="/dataset")[1]
        assert bob.predict(api_name="/restore")[0] == ""  # bob's page does not reattach to alice's draft
        assert alice.predict(api_name="/restore")[0] == run
        # Preview uploads live in a per-user folder keyed by a secret that gradio never serves.
        assert preview.uploads_dir(outputs, "alice") != preview.uploads_dir(outputs, "bob")
        from app.user_files import PRIVATE_DIR

        key = outputs / PRIVATE_DIR / "user-key"
        assert key.is_file()
        with httpx.Client(base_url=url) as http:
            assert http.post("login", data={"username": "bob", "password": "builder"}).status_code == 200
            assert http.get(f"gradio_api/file={key}").status_code in (403, 404)
    finally:
        demo.close()
