"""The CLI as a user runs it: real subprocesses, real exit codes, no tracebacks for user mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=ROOT, env_extra=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_preset_end_to_end(tmp_path):
    """`python -m trainer train presets/tiny-test.toml`, untouched but for where outputs go."""
    out = cli("train", "presets/tiny-test.toml", "--set", f'output.dir="{tmp_path}"', "--set", "train.steps=3",
              env_extra={"STYLE_LORA_BUILTIN_DIR": str(tmp_path / "builtin")})
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "tiny-test"
    assert f"adapter: {run_dir / 'tiny-test.safetensors'}  (A1111" in out.stdout
    assert f"adapter: {run_dir / 'tiny-test.diffusers.safetensors'}  (diffusers)" in out.stdout
    assert "training" in out.stderr and "it/s" in out.stderr  # tqdm progress bar
    assert "steps = 3" in (run_dir / "config.toml").read_text()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-000003-00.png"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events][-3:] == ["done", "report_started", "report"]  # the style report comes last
    assert (run_dir / "report.json").is_file()

    from diffusers import StableDiffusionPipeline  # the adapter loads in diffusers on the same builtin base

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "builtin" / "tiny-sd15", safety_checker=None)
    pipe.load_lora_weights(str(run_dir / "tiny-test.diffusers.safetensors"), adapter_name="style")
    assert pipe.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"]}

    # A second run with the same name never overwrites the first.
    again = cli("train", "presets/tiny-test.toml", "--set", f'output.dir="{tmp_path}"', "--set", "train.steps=1",
                "--set", "sample.prompts=[]", env_extra={"STYLE_LORA_BUILTIN_DIR": str(tmp_path / "builtin")})
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "tiny-test-2" / "tiny-test.diffusers.safetensors").is_file()


def test_resume_command_continues_a_stopped_run(tiny_base, tmp_path):
    common = ["--set", f'model.path="{tiny_base}"', "--set", "sample.prompts=[]"]
    first = cli("train", "presets/tiny-test.toml", "--run-dir", str(tmp_path / "run"), *common,
                "--set", "train.steps=2", "--set", "train.checkpoint_every=1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli("resume", str(tmp_path / "run"), "--set", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "resumed"] == [2]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "train.stepz"),
        (['model.path="/nowhere/model"'], "model.path '/nowhere/model': no such file or folder"),
        (['model.path="/tmp/evil.ckpt"'], "pickles"),
        (['model.path="someone/some-model"'], "model.path 'someone/some-model': cannot load"),
        (['data.path="/nowhere/images"'], "/nowhere/images"),
        (["lora.unet_targets=[\"no_such_layer\"]"], "no module matching"),
    ],
)
def test_user_mistakes_exit_2_with_a_message_and_no_traceback(tiny_base, tmp_path, overrides, message):
    args = ["train", "presets/tiny-test.toml", "--run-dir", str(tmp_path / "run"), "--set", f'model.path="{tiny_base}"']
    for o in overrides:
        args += ["--set", o]
    out = cli(*args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_accelerate_two_processes(tiny_base, tmp_path):
    """Data-parallel over 2 CPU processes (torchrun + gloo): the same launcher users run on N GPUs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "trainer", "train", "presets/tiny-test.toml", "--set", f'model.path="{tiny_base}"',
           "--set", f'output.dir="{tmp_path}"', "--set", "train.steps=3", "--set", "train.checkpoint_every=2"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "tiny-test"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events][:2] == ["dataset", "start"] and events[1]["processes"] == 2
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]  # one writer, not two
    assert (run_dir / "checkpoints" / "step-000002" / "state.json").is_file()
    adapter = load_file(run_dir / "tiny-test.diffusers.safetensors")
    ups = [t for k, t in adapter.items() if "lora_B" in k]
    assert ups and all(t.abs().max() > 0 for t in ups)  # every layer trained (B starts at zero)
    assert any(k.startswith("text_encoder.") for k in adapter) and any(k.startswith("unet.") for k in adapter)


def test_convert_command_round_trips_a_trained_adapter(tiny_base, tmp_path):
    run = cli("train", "presets/tiny-test.toml", "--run-dir", str(tmp_path / "run"), "--set", f'model.path="{tiny_base}"',
              "--set", "train.steps=1", "--set", "sample.prompts=[]", "--set", "lora.alpha=2.0")
    assert run.returncode == 0, run.stderr[-3000:]
    kohya = load_file(tmp_path / "run" / "tiny-test.safetensors")
    out = cli("convert", str(tmp_path / "run" / "tiny-test.safetensors"), str(tmp_path / "d.safetensors"), "--to", "diffusers")
    assert out.returncode == 0, out.stderr[-3000:]
    back = cli("convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya")
    assert back.returncode == 0, back.stderr[-3000:]
    again = load_file(tmp_path / "k.safetensors")
    assert again.keys() == kohya.keys()
    for key, value in kohya.items():
        assert torch.allclose(again[key], value, rtol=1e-6, atol=0), key
    # alpha = rank (4) in every module, the trained scale 2/4 folded into lora_up; the trained alpha in the metadata
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    with safe_open(str(tmp_path / "run" / "tiny-test.safetensors"), "pt") as f:
        assert (f.metadata()["ss_network_dim"], f.metadata()["ss_network_alpha"]) == ("4", "2.0")

    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    refused = cli("convert", str(pickle), str(tmp_path / "x.safetensors"), "--to", "kohya")
    assert refused.returncode == 2 and "evil.ckpt" in refused.stderr and "Traceback" not in refused.stderr
