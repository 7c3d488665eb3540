"""Picking the best save (trainer/report/saves.py, save_report.py, save_grid.py, trainer/preview/xy_grid.py) on the
demo base: one real 6-step run with save_every=2, validation and keep_best, trained once for the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT

DEMO_STYLE = ROOT / "examples" / "demo-style"
DRAW = dict(steps=4, guidance=4.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from trainer.config import load_config
    from trainer.training.loop import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a busy machine (conftest.one_thread)
    out = tmp_path_factory.mktemp("saves")
    cfg = load_config(ROOT / "presets" / "demo-style.toml", [
        f'data.path="{DEMO_STYLE}"', f'output.dir="{out}"', "train.steps=6", "train.save_every=2",
        "train.batch_size=2", "train.checkpoint_every=0", "sample.every=0", "sample.prompts=[]", "lora.rank=4",
        "lora.alpha=4.0", "lora.conv_rank=0", "data.validation_split=0.1", "train.validation_every=2",
        "train.keep_best=true", 'report.prompts=["{trigger}, a red circle on a blue background, left"]',
        "report.seeds=[0]", "report.steps=4"])
    run_dir = out / "demo-style"
    train(cfg, run_dir)  # writes RUN/config.toml, the saves and events.jsonl
    yield run_dir
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def previewer(run):
    from trainer.preview.previewer import Previewer

    return Previewer("builtin:demo-sd")


def events(run_dir: Path) -> list[dict]:
    from trainer.events import read_events

    return read_events(run_dir / "events.jsonl")[0]


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def test_saves_are_listed_with_step_losses_and_marks(run):
    from trainer.report.saves import list_saves

    saves = list_saves(run)
    by_kind = {s.kind: s for s in saves}
    steps = [s.step for s in saves if s.kind == "step"]
    assert steps == [2, 4] and by_kind["final"].step == 6 and by_kind["final"].in_use
    best = [e for e in events(run) if e["type"] == "best"][-1]
    assert by_kind["best"].step == best["step"] and by_kind["best"].label() == f"best (step {best['step']})"
    train_loss = {e["step"]: e["loss"] for e in events(run) if e["type"] == "step"}
    val_loss = {e["step"]: e["loss"] for e in events(run) if e["type"] == "validation"}
    assert set(val_loss) == {2, 4, 6}
    for s in saves:
        assert s.train_loss == train_loss[s.step] and s.val_loss == val_loss[s.step]
        assert s.verdict is None and len(s.files) == 2 and s.bytes == sum(p.stat().st_size for p in s.files) > 0
    assert [s.label() for s in saves if s.kind != "best"] == ["step 2", "step 4", "final (step 6)"]


def grid_draw(pv):
    def draw(request: dict):
        for name, path in request["files"].items():
            pv.load_adapter(path, name)
        kw = {k: request[k] for k in ("prompt", "negative", "steps", "guidance", "seed", "width", "height")}
        return pv.generate(adapters=request["adapters"], **kw)
    return draw


def test_grid_size_labels_text_and_a_cell_equals_a_single_generate(run, previewer, tmp_path):
    from trainer.preview.xy_grid import TEXT_KEY, cell_box, draw_grid, plan
    from trainer.report.save_grid import run_spec

    spec = run_spec(run, "saves", "strength", {"saves": "2,4,6", "strength": "0.5, 1"}, **DRAW)
    sheet, times, complete = draw_grid(spec, grid_draw(previewer), out=tmp_path / "grid.png")
    assert complete and len(times) == 6 and all(t["cell_ms"] > 0 and t["swap_ms"] >= 0 for t in times)
    png = Image.open(tmp_path / "grid.png")
    text = json.loads(png.text[TEXT_KEY])
    assert text["x_labels"] == ["step 2", "step 4", "final (step 6)"] and text["y_labels"] == ["strength 0.5",
                                                                                              "strength 1"]
    assert text["steps"] == 4 and text["seed"] == 0 and len(text["cell_ms"]) == 6
    assert "Steps: 4" in png.text["parameters"]
    # 32 px cells enlarged 4x to 128: a row-label band one cell wide, a 34 px header
    assert png.size == (128 + 3 * 128, 34 + 2 * 128)
    pixels = np.asarray(png.convert("RGB"))
    for c in range(3):  # every column label and row label drew dark pixels in its band
        assert (pixels[18:32, 128 + c * 128:128 + (c + 1) * 128] < 100).any()
    for r in range(2):
        assert (pixels[34 + r * 128:34 + (r + 1) * 128, :128] < 100).any()
    # cell (strength 1, step 4) against a single Generate of the same settings, after other adapters were active
    previewer.generate(prompt="something else", seed=9, width=32, height=32, steps=2, adapters=None)
    request = plan(spec)[4]["request"]  # row 1 (strength 1), column 1 (step 4)
    assert request["adapters"] == {"demo-style-step000004": 1.0} and request["seed"] == 0
    single, _ = previewer.generate(prompt=request["prompt"], negative=request["negative"], steps=4, guidance=4.0,
                                   seed=0, width=32, height=32, adapters={"demo-style-step000004": 1.0})
    box = cell_box(png.size, 3, 2, 1, 1, (32, 32), True)
    cell = pixels[box[1]:box[3], box[0]:box[2]]
    assert np.array_equal(cell[::4, ::4], np.asarray(single))
    assert (cell == np.repeat(np.repeat(np.asarray(single), 4, 0), 4, 1)).all()
    box = cell_box(png.size, 3, 2, 0, 1, (32, 32), True)
    assert not np.array_equal(pixels[box[1]:box[3], box[0]:box[2]], cell)  # strength 0.5 draws another image: the comparison can fail


def test_cli_grid_writes_the_same_png(run, previewer, tmp_path):
    from trainer.cli import main
    from trainer.preview.xy_grid import TEXT_KEY, draw_grid
    from trainer.report.save_grid import run_spec

    out = tmp_path / "cli.png"
    assert main(["grid", str(run), "--x", "seeds", "--y", "prompts", "--seeds", "0,1",
                 "--prompts", "{trigger}, a red circle", "{trigger}, a blue square", "--steps", "4", "--guidance",
                 "4", "--out", str(out)]) == 0
    spec = run_spec(run, "seeds", "prompts", {"seeds": "0,1", "prompts": ["{trigger}, a red circle",
                                                                          "{trigger}, a blue square"]}, **DRAW)
    sheet, _, _ = draw_grid(spec, grid_draw(previewer))
    cli = Image.open(out)
    assert np.array_equal(np.asarray(cli.convert("RGB")), np.asarray(sheet))
    assert json.loads(cli.text[TEXT_KEY])["y_labels"] == ["zkstyle, a red circle", "zkstyle, a blue square"]


def test_report_on_one_save(run, tmp_path):
    from trainer.report.save_report import report_saves
    from trainer.report.saves import list_saves

    run_dir = copy_run(run, tmp_path)
    (report,) = report_saves(run_dir, "2")
    assert report["verdict"]["verdict"] in ("learned", "partly learned", "not learned")
    saved = json.loads((run_dir / "reports" / "demo-style-step000002.json").read_text())
    assert saved["fidelity"] == report["fidelity"] and (run_dir / "reports" / "demo-style-step000002.png").is_file()
    kinds = [e["type"] for e in events(run_dir)][-2:]
    assert kinds == ["save_report_started", "save_report"]
    event = events(run_dir)[-1]
    assert event["stem"] == "demo-style-step000002" and event["step"] == 2
    assert event["progress"] == report["verdict"]["progress"]
    by_step = {s.stem: s for s in list_saves(run_dir)}
    assert by_step["demo-style-step000002"].verdict == report["verdict"]["verdict"]
    assert by_step["demo-style-step000002"].progress == report["verdict"]["progress"]["1.0"]
    assert by_step["demo-style-step000004"].verdict is None
    assert not (run / "reports").exists()  # the module's run is untouched


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_use_this_save_makes_the_downloads_that_save(run, previewer, tmp_path):
    from trainer.lora_files.convert import convert_file
    from trainer.report.saves import list_saves, use_save

    run_dir = copy_run(run, tmp_path)
    final_before = tensors(run_dir / "demo-style.diffusers.safetensors")
    (run_dir / "demo-style-step000004.safetensors").unlink()  # its kohya file is written for it
    fields = use_save(run_dir, "4")
    assert fields["converted"] == [str(run_dir / "demo-style-step000004.safetensors")]
    save = tensors(run_dir / "demo-style-step000004.diffusers.safetensors")
    down = tensors(run_dir / "demo-style.diffusers.safetensors")
    assert down.keys() == save.keys() and all(torch.equal(down[k], save[k]) for k in save)
    convert_file(run_dir / "demo-style-step000004.diffusers.safetensors", tmp_path / "k.safetensors", "kohya")
    kohya, expected = tensors(run_dir / "demo-style.safetensors"), tensors(tmp_path / "k.safetensors")
    assert kohya.keys() == expected.keys() and all(torch.equal(kohya[k], expected[k]) for k in kohya)
    kept = tensors(run_dir / "demo-style-step000006.diffusers.safetensors")  # the trained final, kept as a save
    assert all(torch.equal(kept[k], final_before[k]) for k in final_before)
    assert not all(torch.equal(save[k], final_before[k]) for k in save)
    kw = dict(prompt="zkstyle, a red circle on a blue background, left", width=32, height=32, seed=1, **DRAW)
    for layout in ("", ".diffusers"):  # both downloads draw exactly what the save draws
        previewer.load_adapter(run_dir / f"demo-style{layout}.safetensors", f"down{layout}")
        previewer.load_adapter(run_dir / f"demo-style-step000004{layout}.safetensors", f"save{layout}")
        a, _ = previewer.generate(adapters={f"down{layout}": 1.0}, **kw)
        b, _ = previewer.generate(adapters={f"save{layout}": 1.0}, **kw)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    used = events(run_dir)[-1]
    assert used["type"] == "save_used" and used["step"] == 4 and used["stem"] == "demo-style-step000004"
    saves = {s.stem: s for s in list_saves(run_dir)}
    assert saves["demo-style-step000004"].in_use and saves["demo-style"].step == 4
    assert not saves["demo-style-step000006"].in_use and not saves["demo-style-step000002"].in_use


def test_delete_the_other_saves_frees_exactly_their_bytes(run, tmp_path):
    from trainer.report.saves import delete_other_saves, list_saves, use_save

    run_dir = copy_run(run, tmp_path)
    use_save(run_dir, "2")
    saves = list_saves(run_dir)
    others = [s for s in saves if s.kind != "final" and s.stem != "demo-style-step000002"]
    expected = sum(p.stat().st_size for s in others for p in s.files)
    total = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    fields = delete_other_saves(run_dir)
    after = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    event_bytes = len(json.dumps(events(run_dir)[-1])) + 1  # the saves_deleted line itself
    assert fields["bytes"] == expected > 0 and total - after == expected - event_bytes
    assert sorted(s.stem for s in list_saves(run_dir)) == ["demo-style", "demo-style-step000002"]
    assert events(run_dir)[-1]["type"] == "saves_deleted" and events(run_dir)[-1]["bytes"] == expected
    assert len(fields["stems"]) == len(others) == 3  # step 4, step 6 (the kept final) and best
