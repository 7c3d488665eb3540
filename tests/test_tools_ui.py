"""The web UI's Tools tab without a browser (app/tools_view.py): the argument list each command gets from the form,
values refused with one clear line, only the user's own files listed, and `info` and `resize` run for real on an
adapter the project trained on the tiny base, the result listed in Preview. The browser walk:
tests/test_browser_tools.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app import jobs, preview_client, tools_job, tools_view
from app.tools_view import ToolError, build_args
from tests.conftest import ROOT, TINY_STYLE


def form(**values) -> dict:
    return {**{k: "" for k in tools_view.FORM}, "overwrite": False, "thumbnail": None, "conv_rank": 0, **values}


def fake_run(outputs: Path, name: str, owner: str | None = None, files=("a.safetensors",)) -> Path:
    """A run folder as the UI lists it (job.json written, the trainer gone), with these adapter files (not real)."""
    run_dir = jobs.new_run_dir(outputs, name, owner=owner)
    for f in files:
        (run_dir / f).write_bytes(b"not a real adapter")
    jobs.write_job(run_dir, {"pid": 2**22 + 12345, "launched_at": 0, "returncode": 0})
    return run_dir


# ----------------------------------------------------------------------------- argument lists


def test_each_command_gets_the_cli_arguments_and_writes_in_the_tools_folder(tmp_path):
    outputs = tmp_path / "outputs"
    run = fake_run(outputs, "style", files=("style.safetensors", "style-step000010.safetensors"))
    a, b = f"run:{run.name}/style.safetensors", f"run:{run.name}/style-step000010.safetensors"
    home = tools_view.tools_dir(outputs)
    assert home == outputs / ".tools" / "local"

    args, out = build_args(outputs, form(command="Info", file=a))
    assert args == ["info", str(run / "style.safetensors")] and out is None
    args, out = build_args(outputs, form(command="Resize", file=a, rank=2.0, to="diffusers"))
    assert args == ["resize", str(run / "style.safetensors"), "--rank", "2", "--to", "diffusers", "--out",
                    str(home / "style-r2.safetensors")] and out == home / "style-r2.safetensors"
    args, _ = build_args(outputs, form(command="Resize", file=a, rank="8", dynamic="sv_fro", param="0.9",
                                       out_name="small", overwrite=True))
    assert args[2:] == ["--rank", "8", "--dynamic", "sv_fro", "--param", "0.9", "--out", str(home / "small.safetensors"),
                        "--overwrite"]
    args, _ = build_args(outputs, form(command="Resize", file=a, rank=4, conv_rank=2))
    assert args[2:6] == ["--rank", "4", "--conv-rank", "2"]
    args, out = build_args(outputs, form(command="Merge", files=f"{a}:0.7\n\n{b}", to="kohya"))
    assert args == ["merge", f"{run / 'style.safetensors'}:0.7", f"{run / 'style-step000010.safetensors'}:1",
                    "--to", "kohya", "--out", str(home / "merged.safetensors")]
    args, out = build_args(outputs, form(command="Bake", files=f"{a}:-0.5", model="builtin:demo-sd",
                                         out_name="my base"))
    assert args == ["bake", "builtin:demo-sd", f"{run / 'style.safetensors'}:-0.5", "--out",
                    str(home / "checkpoints" / "my_base")]
    args, _ = build_args(outputs, form(command="Extract", model="builtin:demo-sd", tuned="builtin:demo-sd", rank=4,
                                       conv_rank=2))
    assert args == ["extract", "--base", "builtin:demo-sd", "--tuned", "builtin:demo-sd", "--rank", "4",
                    "--conv-rank", "2", "--out", str(home / "extracted.safetensors")]
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"png")
    args, out = build_args(outputs, form(command="Edit metadata", file=a, title=" My  style ", tags="a, b",
                                         thumbnail=str(thumb)))
    assert args == ["meta", str(run / "style.safetensors"), "--set", "title=My style", "--set", "tags=a, b",
                    "--thumbnail", str(thumb), "--out", str(home / "style-meta.safetensors")]


def test_the_form_s_methods_are_the_cli_s():
    from trainer.lora_tools.cli import METHODS

    assert tools_view.METHODS == METHODS


@pytest.mark.parametrize("values, message", [
    (dict(command="Resize", rank="abc"), "Rank must be a whole number, 1 or more (got 'abc')"),
    (dict(command="Resize", rank=0), "Rank must be a whole number, 1 or more (got '0')"),
    (dict(command="Resize", rank=-3), "Rank must be a whole number"),
    (dict(command="Resize", rank=2.5), "Rank must be a whole number"),
    (dict(command="Resize"), "Resize: give a rank (or a dynamic method and its parameter)"),
    (dict(command="Resize", dynamic="sv_ratio", param="x"), "the sv_ratio parameter must be a number (got 'x')"),
    (dict(command="Resize", dynamic="sv_ratio", param=-1), "the sv_ratio parameter must be above 0"),
    (dict(command="Resize", dynamic="magic", param=1), "dynamic method must be one of sv_ratio"),
    (dict(command="Merge", files="RUN:abc"), "line 1: the weight must be a number (got 'abc')"),
    (dict(command="Merge", files=""), "add the LoRA files to combine"),
    (dict(command="Merge", files="run:nosuch/x.safetensors:1"), "not one of your LoRA files"),
    (dict(command="Bake", files="RUN"), "Base model (the checkpoint to bake into): give a base model"),
    (dict(command="Extract", model="builtin:demo-sd", tuned="builtin:demo-sd", rank=2, conv_rank=-1),
     "Conv rank must be a whole number, 0 or more"),
    (dict(command="Edit metadata"), "Edit metadata: fill in at least one field"),
    (dict(command="Info", file=""), "pick a LoRA file first"),
    (dict(command="Info", file="run:../../etc/passwd"), "not one of your LoRA files"),
    (dict(command="Format disk"), "unknown command 'Format disk'"),
])
def test_bad_values_are_refused_with_one_clear_line(tmp_path, values, message):
    outputs = tmp_path / "outputs"
    run = fake_run(outputs, "style")
    value = f"run:{run.name}/a.safetensors"
    values = {k: (v.replace("RUN", value) if isinstance(v, str) else v) for k, v in values.items()}
    with pytest.raises(ToolError) as err:
        build_args(outputs, form(**{"file": value, **values}))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_an_output_name_becomes_a_plain_file_name_in_the_user_s_tools_folder(tmp_path):
    outputs = tmp_path / "outputs"
    run = fake_run(outputs, "style", owner="alice")
    value = f"run:{run.name}/a.safetensors"
    home = tools_view.tools_dir(outputs, "alice")
    assert home.parent == outputs / ".tools" and home.name.startswith("user-") and "alice" not in home.name
    for name, written in [("../../../etc/passwd", "passwd.safetensors"), ("/tmp/x.safetensors", "x.safetensors"),
                          ("my lora!.SAFETENSORS", "my_lora.safetensors"), ("..", "file.safetensors")]:
        _, out = build_args(outputs, form(command="Resize", file=value, rank=1, out_name=name), "alice")
        assert out == home / written, (name, out)


# ----------------------------------------------------------------------------- a user's own files


def test_only_the_user_s_own_files_are_listed_and_accepted(tmp_path):
    from app.auth import may_read

    outputs = (tmp_path / "outputs").resolve()
    alice, bob = fake_run(outputs, "style", "alice"), fake_run(outputs, "style", "bob", files=("b.safetensors",))
    jobs.new_run_dir(outputs, "draft", owner="alice")  # a draft has no adapters to list
    for user in ("alice", "bob"):
        tools_view.tools_dir(outputs, user).mkdir(parents=True)
        (tools_view.tools_dir(outputs, user) / f"{user}-r2.safetensors").write_bytes(b"x")
    values = [v for _, v in tools_view.lora_choices(outputs, "alice")]
    assert values == [f"run:{alice.name}/a.safetensors", "tool:alice-r2.safetensors"]
    assert {f"run:{alice.name}/a.safetensors", f"run:{bob.name}/b.safetensors"} <= {
        v for _, v in tools_view.lora_choices(outputs, None)}  # without login the one local user sees every run
    for theirs in (f"run:{bob.name}/b.safetensors", "tool:bob-r2.safetensors", "upload:bob-r2.safetensors",
                   f"run:{alice.name}/job.json", f"run:{alice.name}/../{bob.name}/b.safetensors"):
        with pytest.raises(ToolError, match="not one of your LoRA files"):
            tools_view.resolve(outputs, theirs, "alice")
    assert tools_view.resolve(outputs, "tool:alice-r2.safetensors", "alice").read_bytes() == b"x"
    mine, theirs = (tools_view.tools_dir(outputs, u) / f"{u}-r2.safetensors" for u in ("alice", "bob"))
    assert may_read(outputs, str(mine), "alice") and not may_read(outputs, str(theirs), "alice")
    assert not may_read(outputs, str(mine), None)
    # Preview lists each user's results only
    assert ("alice-r2.safetensors (tools)", "tool:alice-r2.safetensors") in preview_client.adapter_choices(outputs,
                                                                                                           "alice")
    assert "tool:bob-r2.safetensors" not in [v for _, v in preview_client.adapter_choices(outputs, "alice")]
    # a logged-in user's base model path must be in the base folders and their own
    with pytest.raises(ToolError, match="not found here"):
        tools_view.checkpoint(outputs, "/etc", "Base model", "alice")
    with pytest.raises(ToolError, match="not found here"):
        tools_view.checkpoint(outputs, str(bob / "b.safetensors"), "Base model", "alice")
    assert tools_view.checkpoint(outputs, str(alice / "a.safetensors"), "Base model", "alice")
    assert tools_view.checkpoint(outputs, "someone/some-model", "Base model", "alice") == "someone/some-model"


def test_an_upload_is_checked_and_never_replaces_one(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    outputs = tmp_path / "outputs"
    src = tmp_path / "My LoRA.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((2, 4), np.float32),
               "lora_unet_x.lora_up.weight": np.zeros((4, 2), np.float32)}, str(src))
    assert tools_view.store_upload(outputs, src, "alice") == "upload:My_LoRA.safetensors"
    assert tools_view.store_upload(outputs, src, "alice") == "upload:My_LoRA-2.safetensors"
    assert "upload:My_LoRA-2.safetensors" in [v for _, v in tools_view.lora_choices(outputs, "alice")]
    assert tools_view.lora_choices(outputs, "bob") == []
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 20)
    with pytest.raises(ToolError, match="bad.safetensors: not a readable LoRA file"):
        tools_view.store_upload(outputs, bad, "alice")
    with pytest.raises(ToolError, match="only .safetensors"):
        tools_view.store_upload(outputs, TINY_STYLE / "01_red_circle.png", "alice")


def test_an_error_is_one_line_never_a_traceback():
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    boom()\nValueError: boom\n"
    assert tools_job.error_line("warning: slow\nerror: x.safetensors: no LoRA keys\n", 2) == \
        "x.safetensors: no LoRA keys"
    assert tools_job.error_line(trace, 1) == "the command failed (exit code 1): ValueError: boom"
    assert tools_job.error_line("", -15) == "the command was stopped (signal 15)"
    assert tools_job.parse_result('notice\n{"out": "a", "summary": "s"}\n') == {"out": "a", "summary": "s"}
    assert tools_job.parse_result("no json") is None


# ----------------------------------------------------------------------------- for real on a trained adapter


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory) -> Path:
    """outputs/ holding one finished run trained on the tiny base (2 steps), as the UI lists it."""
    import torch

    from trainer.config import load_config
    from trainer.training.loop import train

    outputs = tmp_path_factory.mktemp("tools") / "outputs"
    run_dir = jobs.new_run_dir(outputs, "tiny")
    cfg = load_config(ROOT / "presets" / "tiny-test.toml", [
        f'model.path="{tiny_base}"', f'data.path="{TINY_STYLE}"', f'output.dir="{outputs}"', 'output.name="tiny"',
        "train.steps=2", "train.checkpoint_every=0", "train.save_every=0", "sample.every=0", "sample.prompts=[]",
        "report.enabled=false"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, run_dir)
    finally:
        torch.set_num_threads(before)
    jobs.write_job(run_dir, {"pid": 2**22 + 12345, "launched_at": 0, "returncode": 0})
    return outputs


def run_tool(outputs: Path, **values) -> tools_job.ToolJob:
    """As the tab's Run does: the arguments, the input's base, the child, and the result's base recorded."""
    args, out = build_args(outputs, form(**values))
    job = tools_job.ToolJob(outputs, args, out, tools_view.source_base(outputs, form(**values)))
    assert job.wait(600), "the command did not end"
    tools_view.remember_base(outputs, out, job.base)
    return job


def test_info_and_resize_run_for_real_and_the_result_is_in_preview(trained):
    outputs = trained
    choices = tools_view.lora_choices(outputs)
    value = next(v for _, v in choices if v.endswith("/tiny.safetensors"))
    info = run_tool(outputs, command="Info", file=value)
    assert not info.error, info.error
    text = tools_job.result_text(info)
    assert "kohya" in text and "4" in text, text  # the layout and the rank the run trained

    resized = run_tool(outputs, command="Resize", file=value, rank=2)
    assert not resized.error, resized.error
    out = tools_view.tools_dir(outputs) / "tiny-r2.safetensors"
    assert out.is_file() and Path(resized.result["out"]) == out
    shown = tools_job.result_text(resized)
    assert shown.startswith("tiny-r2.safetensors: ") and str(outputs) not in shown, shown  # no server folders shown
    assert ("tiny-r2.safetensors (tools)", "tool:tiny-r2.safetensors") in preview_client.adapter_choices(outputs)
    assert preview_client.resolve(outputs, "tool:tiny-r2.safetensors")[0] == out
    assert "tool:tiny-r2.safetensors" in [v for _, v in tools_view.lora_choices(outputs)]
    again = run_tool(outputs, command="Info", file="tool:tiny-r2.safetensors")
    assert not again.error and "2" in tools_job.result_text(again)

    before = out.stat().st_mtime_ns
    refused = run_tool(outputs, command="Resize", file=value, rank=2)  # the same name, no overwrite
    assert refused.error and "\n" not in refused.error and "Traceback" not in refused.error, refused.error
    assert tools_job.result_text(refused).startswith("Error: ") and out.stat().st_mtime_ns == before
    replaced = run_tool(outputs, command="Resize", file=value, rank=2, overwrite=True)
    assert not replaced.error, replaced.error


def test_a_running_command_can_be_cancelled(trained):
    args, out = build_args(trained, form(command="Info", file=tools_view.lora_choices(trained)[0][1]))
    job = tools_job.ToolJob(trained, args, out)
    time.sleep(0.2)  # still importing: well before the command could end
    job.cancel()
    assert job.wait(60) and job.error == "cancelled" and tools_job.result_text(job) == "Cancelled."


def test_info_is_shown_as_a_few_lines_of_text(trained):
    """`lora info --json` has no summary (its fields only): the tab writes the layout, ranks and consumers itself."""
    job = run_tool(trained, command="Info", file=tools_view.lora_choices(trained)[0][1])
    assert not job.error and "layout" in job.result, job.error
    text = tools_job.result_text(job)
    assert text.startswith("tiny.diffusers.safetensors: diffusers layout, lora"), text
    assert "rank 4, alpha 4" in text and "loads exactly in: " in text and "{" not in text, text


def test_a_file_that_needs_its_base_is_read_with_its_run_s_base(tmp_path):
    """The demo base's layout differs from its family's reference: its kohya file names modules only with the base.
    Info asks for --model, the tab runs it once more with the run's base, and a result made from it keeps that base
    (Info on it, and Preview's base)."""
    from tests.conftest import finished_demo_run

    outputs = tmp_path / "outputs"
    run_dir = finished_demo_run(outputs, "demo", steps=1, batch_size=1)
    value = f"run:demo/{next(p.name for p in jobs.adapter_files(run_dir) if '.diffusers.' not in p.name)}"
    info = run_tool(outputs, command="Info", file=value)
    assert not info.error and info.args[-2:] == ["--model", "builtin:demo-sd"], (info.error, info.args)
    assert "kohya layout" in tools_job.result_text(info)
    resized = run_tool(outputs, command="Resize", file=value, rank=2, out_name="small")
    assert not resized.error, resized.error
    assert tools_view.recorded_bases(outputs) == {"small.safetensors": "builtin:demo-sd"}
    assert preview_client.resolve(outputs, "tool:small.safetensors")[1] == "builtin:demo-sd"
    again = run_tool(outputs, command="Info", file="tool:small.safetensors")
    assert not again.error and again.args[-2:] == ["--model", "builtin:demo-sd"], again.error
    assert tools_job.result_text(again).startswith("small.safetensors: kohya layout")


def test_merge_meta_bake_and_extract_run_for_real(trained, tiny_base, tmp_path):
    """The other four commands through the tab's child: merge (0.5 + 0.25 of the run's file), tag the result, bake
    the run's LoRA into the base (a folder) and extract it back from base and bake: each ΔW is the run's."""
    from PIL import Image
    from safetensors import safe_open

    from trainer.lora_tools.deltas import read_lora

    outputs = trained
    value = next(v for _, v in tools_view.lora_choices(outputs) if v.endswith("/tiny.safetensors"))
    run_delta = {k: d.weight() for k, d in read_lora(tools_view.resolve(outputs, value)).deltas.items()}

    def worst(path, factor: float) -> float:
        got = read_lora(path).deltas
        assert set(got) == set(run_delta), path
        return max(float((got[k].weight() - factor * w).norm() / (factor * w).norm()) for k, w in run_delta.items()
                   if w.abs().max() > 1e-4)

    merged = run_tool(outputs, command="Merge", files=f"{value}:0.5\n{value}:0.25", out_name="half")
    assert not merged.error, merged.error
    assert worst(merged.result["out"], 0.75) < 1e-5
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "cover.png")
    tagged = run_tool(outputs, command="Edit metadata", file="tool:half.safetensors", title="Half", trigger="zk",
                      thumbnail=str(tmp_path / "cover.png"))
    assert not tagged.error, tagged.error
    with safe_open(tagged.result["out"], "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "Half" and meta["modelspec.thumbnail"].startswith("data:image/png")

    baked = run_tool(outputs, command="Bake", files=f"{value}:1", model=str(tiny_base), out_name="baked")
    assert not baked.error, baked.error
    folder = Path(baked.result["out"])
    assert (folder / "model_index.json").is_file()
    extracted = run_tool(outputs, command="Extract", model=str(tiny_base), tuned=str(folder), rank=8, conv_rank=8,
                         out_name="back")
    assert not extracted.error, extracted.error
    assert worst(extracted.result["out"], 1.0) < 1e-3  # fp32 rounding of W + ΔW in the baked weights
