import pytest

from trainer.config import Config, ConfigError, PRESETS_DIR, list_presets, load_config, load_preset, parse_override, to_toml


def test_every_preset_loads():
    names = list_presets()
    assert {"sd15-style", "tiny-test"} <= set(names)
    for name in names:
        assert isinstance(load_preset(name), Config)


def test_presets_are_sparse_diffs_from_the_defaults():
    """A preset sets only what differs from trainer/config.py's defaults, so a changed default reaches every preset
    that does not say otherwise, and a reader sees at a glance what a preset is about."""
    import tomllib

    defaults = Config.model_validate({}).model_dump()
    for path in sorted(PRESETS_DIR.glob("*.toml")):
        for section, values in tomllib.loads(path.read_text()).items():
            for key, value in values.items():
                assert defaults[section][key] != value, f"{path.name}: {section}.{key} = {value!r} is the default"


def test_sd15_preset_has_style_defaults():
    cfg = load_preset("sd15-style")
    assert (cfg.lora.rank, cfg.lora.alpha) == (16, 16.0)
    assert (cfg.train.lr_unet, cfg.train.lr_text_encoder) == (1e-4, 5e-5)
    assert cfg.train.optimizer == "adamw" and cfg.train.lr_scheduler == "cosine" and cfg.train.warmup_steps > 0
    assert cfg.data.resolution == 512 and cfg.train.mixed_precision == "auto"


def test_demo_style_preset_trains_the_demo_set_on_the_demo_base():
    cfg = load_preset("demo-style")
    assert cfg.model.path == "builtin:demo-sd" and cfg.data.trigger == "zkstyle"
    assert (PRESETS_DIR.parent / cfg.data.path).is_dir()
    assert not cfg.data.flip and not cfg.data.shuffle_captions  # captions name left/right and end with the position
    assert cfg.report.enabled and cfg.report.clip_model is None


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstepz = 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.stepz" in str(err.value) and str(path) in str(err.value)


def test_bad_values_are_rejected():
    for override in ["lora.rank=0", "train.lr_scheduler=\"wavy\"", "data.caption_dropout=1.5", "output.name=\"../x\"",
                     "data.resolution=500", "lora.train_unet=false"]:
        extra = ["lora.train_text_encoder=false"] if override.startswith("lora.train_unet") else []
        with pytest.raises(ConfigError):
            load_config(PRESETS_DIR / "tiny-test.toml", [override, *extra])


def test_not_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_parse_as_toml_values():
    assert parse_override("train.steps=200") == (["train", "steps"], 200)
    assert parse_override("data.trigger=zk style") == (["data", "trigger"], "zk style")
    assert parse_override('sample.prompts=["a", "b"]') == (["sample", "prompts"], ["a", "b"])
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_merge_order_preset_then_ui_then_cli():
    cfg = load_config(PRESETS_DIR / "sd15-style.toml", ["lora.rank=8"], extra={"lora": {"rank": 4, "alpha": 2.0}})
    assert cfg.lora.rank == 8  # CLI beats UI
    assert cfg.lora.alpha == 2.0  # UI beats preset
    assert cfg.train.lr_unet == 1e-4  # preset kept


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PRESETS_DIR / "sd15-style.toml", ["train.resume=\"latest\""])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
