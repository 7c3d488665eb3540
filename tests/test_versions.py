"""Installs are reproducible: the lock pins every dependency within pyproject's ranges, and a known-incompatible
combination of libraries is named in one line at start-up (CLI and UI) instead of failing deep in a run."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver, f"requirements.lock: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = Version(ver)
    return pins


def test_lock_pins_every_dependency_within_pyproject_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        if name == "torch":  # the Makefile installs torch (CPU or CUDA build), the lock leaves it out
            assert name not in pins
            continue
        assert name in pins, f"{name} is not in requirements.lock: run make lock"
        assert pins[name] in req.specifier, f"requirements.lock pins {name} {pins[name]}, outside {req.specifier}"


def test_locked_versions_pass_the_startup_check(monkeypatch):
    from trainer import versions

    pins = locked()
    monkeypatch.setattr(versions, "installed", lambda package: pins.get(package))
    assert versions.incompatible_versions() is None


def test_known_bad_combination_is_named_with_the_fix(monkeypatch):
    from trainer import versions

    fake = {"transformers": Version("5.24.0"), "peft": Version("0.21.2")}
    monkeypatch.setattr(versions, "installed", fake.get)
    message = versions.incompatible_versions()
    assert "transformers 5.24.0" in message and "peft 0.21.2" in message and "peft >= 0.22" in message
    assert "make install" in message and "\n" not in message
    fake["peft"] = Version("0.22.0")  # the fixed peft, once released
    assert versions.incompatible_versions() is None


def fake_distribution(folder, name: str, version: str):
    """A dist-info folder that shadows the installed package's metadata when put first on PYTHONPATH: to the
    start-up check (which reads metadata only) the environment looks like one with `name` `version` installed."""
    dist = folder / f"{name}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.parametrize("command", [["-m", "trainer", "train", "presets/tiny-test.toml"],
                                     ["-m", "app", "--port", "0"]])
def test_cli_and_app_stop_in_one_line_on_transformers_5_24_with_peft_0_21(command, tmp_path):
    import os

    fake_distribution(tmp_path / "site", "transformers", "5.24.0")
    fake_distribution(tmp_path / "site", "peft", "0.21.2")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: incompatible versions: transformers 5.24.0") and "peft 0.21.2" in lines[0]
    assert "run folder" not in proc.stdout  # stopped before making one


def test_peft_refusal_is_passed_on_not_called_a_target_mismatch(make_cfg, tmp_path, monkeypatch):
    """When peft/transformers refuse to attach LoRA for another reason than the targets (here what transformers
    5.24 says with peft 0.21), the user reads their reason, not 'no module matching'."""
    import trainer.adapters.variants as variants
    from trainer.training.loop import train
    from trainer.families.loading import ModelError

    said = "The version of PEFT you are using is not compatible, please use a version >= 0.22.0"
    real = variants.add_adapter

    def refuse_text_encoder(module, config):
        if type(module).__name__.startswith("CLIPText"):
            raise ValueError(said)
        return real(module, config)

    monkeypatch.setattr(variants, "add_adapter", refuse_text_encoder)
    with pytest.raises(ModelError) as err:
        train(make_cfg("lora.train_text_encoder=true"), tmp_path / "run")
    assert said in str(err.value) and "text encoder" in str(err.value)
    assert "no module matching" not in str(err.value)
