"""The Dataset tab's tools: captioning as a child process (tiny captioners from tests/tiny_captioners.py), bulk
edits, undo, tag selection, concepts and the summary; logic functions and end to end through gradio_client."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from app import dataset_tools as dt
from app import jobs, uploads
from tests.conftest import TINY_STYLE, wait_for
from tests.tiny_captioners import WORDS, build_tiny_blip, build_tiny_tagger
from trainer.config import load_config

EXAMPLES = sorted(TINY_STYLE.glob("*.png"))[:3]


def draft(tmp_path: Path, with_captions: bool = False) -> Path:
    run = jobs.new_run_dir(tmp_path / "outputs", "tools")
    files = EXAMPLES + ([p.with_suffix(".txt") for p in EXAMPLES] if with_captions else [])
    stored, problems = uploads.add_files(run, files)
    assert problems == [] and len(stored) == len(files)
    return run


def test_caption_events_with_the_tiny_tagger(tmp_path):
    run = draft(tmp_path)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(run / "dataset" / "red.png")
    (run / "dataset" / "broken.png").write_bytes(b"not an image")
    tagger = build_tiny_tagger(tmp_path / "tagger")
    events = list(dt.caption_events(run, str(tagger), "auto", strip="watercolor", only=None))
    assert events[-1] == {"event": "finished"}, events
    per_image = [e for e in events if "status" in e]
    assert [e["done"] for e in per_image] == list(range(1, 6)) and per_image[0]["total"] == 5
    assert (run / "dataset" / "red.txt").read_text() == "kagamine rin, red theme, ^_^\n"
    md = dt.progress_markdown(events)
    assert "Captioning 5/5" in md and "skipped `broken.png`: cannot decode image" in md
    assert "4 written, 0 kept (existing), 1 skipped" in md


def test_caption_failure_is_one_line(tmp_path):
    run = draft(tmp_path)
    events = list(dt.caption_events(run, str(tmp_path / "no-such-model.onnx"), "tags"))
    assert events[-1]["event"] == "failed" and "no-such-model.onnx" in events[-1]["message"]
    assert events[-1]["message"].startswith("error:") and "\n" not in events[-1]["message"]
    assert list(dt.caption_events(run, "  "))[-1]["event"] == "failed"
    # a model name that looks like an option is still a model name
    assert "--undo" in dt.caption_command(run / "dataset", "--undo")[-2]


FAKE_CAPTIONER = """
import json, os, pathlib, sys, time
pathlib.Path(sys.argv[1]).parent.joinpath("child.pid").write_text(str(os.getpid()))
print(json.dumps({"event": "loading", "message": "loading"}), flush=True)
time.sleep(120)
"""


def test_closing_the_progress_ends_the_child(tmp_path, monkeypatch):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_CAPTIONER)
    monkeypatch.setattr(dt, "CAPTION_CMD", [sys.executable, str(fake)])
    run = draft(tmp_path)
    events = dt.caption_events(run, "m")
    assert next(events)["event"] == "loading"
    pid = int((run / "child.pid").read_text())
    events.close()  # what gradio does when the page goes away
    wait_for(lambda: not jobs.pid_alive(pid), 15, what="captioner child ended")


def test_bulk_edit_tags_selection_undo_and_concepts(tmp_path):
    run = draft(tmp_path, with_captions=True)
    names = dt.image_names(run)
    assert len(names) == 3
    first_tag, count = dt.tag_rows(run)[0]
    assert count >= 1 and dt.images_with_tag(run, first_tag)
    assert dt.bulk_edit(run, prefix="zkstyle", only=names[:1]) == ["prefix zkstyle: 1 captions changed"]
    assert dt.images_with_tag(run, "zkstyle") == names[:1]
    assert dt.bulk_edit(run) == ["nothing to do: fill in a prefix, suffix, find/replace, tag to remove or words "
                                 "to strip"]
    assert dt.undo(run) == "'prefix zkstyle' undone: 1 caption files restored"
    assert dt.images_with_tag(run, "zkstyle") == [] and dt.undo(run) == "nothing to undo"
    dt.bulk_edit(run, prefix="zqone")
    dt.bulk_edit(run, suffix="zqtwo")
    assert dt.clear_undo(run) == "Undo history cleared (2 steps)." and dt.undo(run) == "nothing to undo"
    assert dt.images_with_tag(run, "zqone") == names  # clearing forgets the history, the captions stay as they are

    sub = run / "dataset" / "3_castles"
    sub.mkdir()
    Image.new("RGB", (64, 64)).save(sub / "c.png")
    assert dt.concept_folders(run) == ["3_castles"]
    assert dt.save_concept(run, "3_castles", "zkcastle", "a castle", 2) == "3_castles: concept saved"
    assert (sub / "concept.toml").read_text() == 'trigger = "zkcastle"\ncaption_prefix = "a castle"\nrepeats = 2\n'
    assert "| `3_castles` | zkcastle | a castle | 2 |" in dt.concepts_markdown(run)
    with pytest.raises(ValueError, match="not a subfolder"):
        dt.save_concept(run, "../x", "t", "", None)
    cfg = load_config(None, ["data.trigger='zkstyle'", "data.min_image_size=16", "train.batch_size=1"])
    summary = dt.summary_markdown(run, cfg)
    assert "Dataset: 4 images" in summary and "3_castles: 1 images, seen 2x per epoch" in summary
    assert "trigger 'zkcastle'" in summary and "no caption file: 1 (3_castles/c.png)" in summary
    assert str(run) not in summary  # paths relative to the dataset
    assert dt.save_concept(run, "3_castles", "", "", None) == "3_castles: concept removed"


@pytest.fixture
def server(tmp_path):
    from app.ui import build_app
    from tests.conftest import free_port

    outputs = tmp_path / "outputs"
    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, allowed_paths=[str(outputs)], quiet=True)
    yield f"http://127.0.0.1:{port}/", outputs
    demo.close()


def test_ui_captions_with_a_model_and_bulk_edits(server, tmp_path):
    from gradio_client import Client, handle_file

    url, outputs = server
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    run, grid, _, _ = client.predict([handle_file(str(p)) for p in EXAMPLES], "", "ui tools", 16, api_name="/upload")
    assert {row[3] for row in grid["data"]} == {"missing caption (trains on the trigger word alone)"}
    blip = build_tiny_blip(tmp_path / "blip")

    started = time.time()
    name, grid, md, progress, tags, selected = client.predict(run, str(blip), "auto", False, "", [], 16,
                                                              api_name="/caption")
    assert name == run and "Captioning 3/3" in progress and "3 written" in progress, progress
    captions = [row[2] for row in grid["data"]]
    assert all(c and set(c.split()) <= set(WORDS) for c in captions), captions
    assert {row[3] for row in grid["data"]} == {"ok"}
    assert time.time() - started < 120

    # click a tag -> its images are selected; a bulk edit on the selection only; undo
    tag = tags["data"][0][0]
    selection = client.predict(run, tag, api_name="/select_tag")
    chosen = selection["value"] if isinstance(selection, dict) else selection
    assert chosen and set(chosen) <= {p.name for p in EXAMPLES}
    name, grid, _, edit_md, tags, _ = client.predict(run, "zkstyle", "", "", "", "", "", chosen, 16,
                                                     api_name="/bulk_edit")
    assert f"prefix zkstyle: {len(chosen)} captions changed" in edit_md
    prefixed = {row[1] for row in grid["data"] if row[2].startswith("zkstyle, ")}
    assert prefixed == set(chosen)
    name, grid, _, undo_md, _, _ = client.predict(run, [], 16, api_name="/undo_edit")
    assert "undone" in undo_md and not any(row[2].startswith("zkstyle") for row in grid["data"])
    assert client.predict(run, api_name="/clear_undo").startswith("Undo history cleared (")  # the model's captions
    assert client.predict(run, [], 16, api_name="/undo_edit")[3] == "nothing to undo"

    summary = client.predict(run=run, preset_name="tiny-test", extra_lines="", api_name="/summary")
    assert "Dataset: 3 images" in summary and "steps per epoch" in summary


def test_uploads_accept_concept_files(tmp_path):
    import zipfile

    archive = tmp_path / "concepts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(EXAMPLES[0], "2_castles/a.png")
        zf.writestr("2_castles/concept.toml", 'trigger = "zkcastle"\n')
        zf.writestr("2_castles/other.toml", "x = 1\n")
    run = jobs.new_run_dir(tmp_path / "outputs", "zip")
    stored, problems = uploads.add_files(run, [archive])
    assert sorted(p.name for p in stored) == ["a.png", "concept.toml"]
    assert len(problems) == 1 and "other.toml: file type '.toml' refused" in problems[0]
    assert "| `2_castles` | zkcastle |" in dt.concepts_markdown(run)
