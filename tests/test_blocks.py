"""lora.blocks on the tiny bases: only the chosen denoiser blocks train, each at its rank, and both files hold exactly
that (the kohya file at one rank, zero-padded), as diffusers (and, for SD3.5's kohya file, ComfyUI) read them."""

from __future__ import annotations

import tomllib

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_STYLE
from tests.sd3_comfyui import comfy_deltas
from tests.test_export import assert_matches_peft, spec_key
from tests.test_sd3 import merged, tiny_folder, train_live, worst
from trainer.adapters.variants import lora_layers
from trainer.config import ConfigError, load_config, to_toml, validate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# attention, a Linear in every resnet (so each tiny UNet level holds targets) and one module outside every block
UNET_TARGETS = '["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "time_embedding.linear_1"]'
MMDIT_TARGETS = '["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "context_embedder"]'
BASES = {  # id: (lora.blocks, lora.unet_targets, {block: rank} expected, module-path prefix of each block)
    "unet": ('{"down.1" = 4, "up.1" = 8, "mid" = 0}', UNET_TARGETS, {"down.1": 4, "up.1": 8},
             {"down.1": "down_blocks.1.", "up.1": "up_blocks.1."}),
    "mmdit": ('{"block.0" = 2, "block.1" = 8}', MMDIT_TARGETS, {"block.0": 2, "block.1": 8},
              {"block.0": "transformer_blocks.0.", "block.1": "transformer_blocks.1."}),
}


def config(base, out, *overrides: str):
    return load_config(ROOT / "presets" / "tiny-test.toml", [
        f'model.path="{base}"', f'data.path="{TINY_STYLE}"', f'output.dir="{out}"', "train.steps=2",
        "train.checkpoint_every=0", "train.save_every=0", "sample.every=0", "sample.prompts=[]", "report.enabled=false",
        "lora.rank=4", "lora.alpha=2.0", "lora.dropout=0.0", "data.caption_dropout=0.0", "train.lr_unet=1e-2",
        "train.lr_text_encoder=1e-2", *overrides])


def pipeline_deltas(folder, path) -> dict:
    """ΔW of a LoRA file as the base's own diffusers pipeline loads it (load_lora_weights)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(path), adapter_name="file")
    parts = [p for p in ("unet", "transformer", "text_encoder", "text_encoder_2") if getattr(pipe, p, None) is not None]
    return merged({p: getattr(pipe, p) for p in parts}, "file")


def check_trained_blocks(base, blocks: dict, prefixes: dict, targets: list[str]) -> dict[str, int]:
    """The live denoiser has LoRA exactly on the targets inside the chosen blocks, at their ranks; returns them."""
    ranks = {name: layer.r["default"] for name, layer in lora_layers(base.unet).items()}
    want = {name: rank for block, rank in blocks.items() for name, _ in base.unet.named_modules()
            if name.startswith(prefixes[block]) and ".base_layer" not in name and ".lora_" not in name
            and any(name == t or name.endswith("." + t) for t in targets)}
    assert ranks == want
    for layer in lora_layers(base.unet).values():  # alpha keeps lora.alpha/lora.rank = 2/4
        assert layer.scaling["default"] == pytest.approx(0.5)
    # the text encoders are not affected: they train at lora.rank
    assert {layer.r["default"] for m in base.text_encoders().values() for layer in lora_layers(m).values()} == {4}
    return ranks


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd35"])
def test_blocks_train_only_the_chosen_blocks_and_both_files_hold_them(kind, tiny_base, tmp_path):
    from trainer.families.tiny_xl import build_tiny_sdxl

    folder = {"sd15": lambda: tiny_base, "sdxl": lambda: build_tiny_sdxl(tmp_path / "tiny-sdxl"),
              "sd35": tiny_folder}[kind]()
    blocks, targets, ranks, prefixes = BASES["mmdit" if kind == "sd35" else "unet"]
    cfg = config(folder, tmp_path, f"lora.blocks={blocks}", f"lora.unet_targets={targets}", 'output.name="b"')
    base, final = train_live(cfg, tmp_path / "run")
    trained = check_trained_blocks(base, ranks, prefixes, cfg.lora.unet_targets)
    assert not any(name.startswith(("time_embedding", "context_embedder")) for name in trained)

    live = merged({base.family.DENOISER: base.unet, **base.text_encoders()}, "default")
    assert {name for part, name in live if part == base.family.DENOISER} == trained.keys()
    assert worst(pipeline_deltas(folder, final), live) < 1e-5  # the diffusers file, through diffusers
    kohya = final.with_name("b.safetensors")
    tensors = load_file(kohya)
    if kind == "sd35":  # diffusers reads no SD3 kohya keys; ComfyUI's patch, emulated from its source
        from diffusers import StableDiffusion3Pipeline

        assert worst(comfy_deltas(kohya, StableDiffusion3Pipeline.from_pretrained(folder)), live) < 1e-5
        return
    # one rank (the largest) with alpha = rank in every module, zero rows below a module's own rank
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {8}
    assert {float(t) for k, t in tensors.items() if k.endswith(".alpha")} == {8.0}
    assert worst(pipeline_deltas(folder, kohya), live) < 1e-5  # the kohya file, through diffusers' kohya loader
    if kind == "sd15":  # ... and as A1111/ComfyUI compute it, key by key: exactly the trained modules
        unet = {k: t for k, t in tensors.items() if k.startswith("lora_unet_")}
        assert {k.split(".")[0] for k in unet} == {spec_key("unet", name) for name in trained}
        assert_matches_peft({"unet": base.unet}, unet)
        for name, rank in trained.items():
            assert not unet[f"{spec_key('unet', name)}.lora_down.weight"][rank:].any()


def attached(cfg):
    from trainer.adapters.attach import attach_lora
    from trainer.families.loading import load_base

    base = load_base(cfg.model)
    attach_lora(base, cfg.lora)
    return base


def test_unset_blocks_trains_what_it_did_and_all_blocks_at_lora_rank_match_it(tiny_base, tmp_path):
    from trainer.training.checkpoint import estimate_lora_params

    unset_cfg = config(tiny_base, tmp_path)  # the disk estimate bounds lora.blocks by its largest rank (8 > 4)
    assert estimate_lora_params(config(tiny_base, tmp_path, 'lora.blocks={"up.1" = 8}')) > \
        estimate_lora_params(unset_cfg) > 0
    unset = attached(unset_cfg)
    peft = unset.unet.peft_config["default"]
    assert set(peft.target_modules) == set(unset.family.DEFAULT_TARGETS) and not peft.rank_pattern
    every = {name: 4 for name in unset.family.block_names(unset.unet.config)}
    listed = attached(config(tiny_base, tmp_path, "lora.blocks=" + str(every).replace(":", " =").replace("'", '"')))
    assert not listed.unet.peft_config["default"].rank_pattern
    for a, b in ((unset.unet, listed.unet), (unset.text_encoder, listed.text_encoder)):
        assert {n: (m.r["default"], m.scaling["default"]) for n, m in lora_layers(a).items()} == \
               {n: (m.r["default"], m.scaling["default"]) for n, m in lora_layers(b).items()}


@pytest.mark.parametrize("overrides, message", [
    (['lora.blocks={"down.1" = -1}'], r"lora\.blocks\.down\.1: Input should be greater than or equal to 0"),
    (['lora.blocks={"down.1" = 0, "up.1" = 0}'], r"lora\.blocks selects nothing"),
    (['lora.blocks={"down 1" = 4}'], r"lora\.blocks: 'down 1' is not a block name"),
    (['lora.blocks={"up.1" = 4}', 'lora.variant="vera"'], r"lora\.blocks .*lora\.variant = vera"),
    (['lora.blocks={"up.1" = 4}', "lora.train_unet=false"], r"lora\.blocks .*train_unet = true"),
])
def test_bad_blocks_are_refused_before_anything_loads(overrides, message, tiny_base, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config(tiny_base, tmp_path, *overrides)


def test_blocks_the_base_lacks_or_without_targets_are_refused_when_attaching(tiny_base, tmp_path, monkeypatch):
    import trainer.training.loop as loop
    from trainer.families.loading import ModelError

    unknown = config(tiny_base, tmp_path, 'lora.blocks={"down.7" = 4, "up.1" = 4}')
    message = r"^lora\.blocks: this SD 1\.x base has no block 'down\.7'; its blocks are down\.0, down\.1, mid, up\.0, up\.1 \("
    with pytest.raises(ModelError, match=message):
        attached(unknown)  # any base: when the adapter is attached
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("loaded the base"))
    with pytest.raises(ModelError, match=message):  # a diffusers folder: from its configs, before loading it
        loop.train(unknown, tmp_path / "run")
    with pytest.raises(ModelError, match=r"^lora\.blocks: no target module lies in down\.1"):  # no attention there
        attached(config(tiny_base, tmp_path, 'lora.blocks={"down.1" = 4}'))


def test_blocks_round_trip_through_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[lora]\nrank = 8\n\n[lora.blocks]\n"down.1" = 4\n"up.2" = 16\nmid = 0\n', encoding="utf-8")
    cfg = load_config(path)
    assert cfg.lora.blocks == {"down.1": 4, "up.2": 16, "mid": 0}
    assert validate(tomllib.loads(to_toml(cfg))) == cfg


@pytest.mark.parametrize("variant", ["lora", "loha"])
def test_locon_convolutions_follow_the_blocks_at_conv_rank(variant, tiny_base, tmp_path):
    """With lora.conv_rank the chosen blocks' 3×3 convolutions keep conv_rank/conv_alpha (kohya's conv_dim), the other
    layers take their block's rank; nothing outside the blocks (conv_in, conv_out, other levels) is adapted."""
    base = attached(config(tiny_base, tmp_path, 'lora.blocks={"up.1" = 8}', f'lora.variant="{variant}"',
                           "lora.conv_rank=2", "lora.conv_alpha=3.0"))
    layers = lora_layers(base.unet)
    assert layers and all(name.startswith("up_blocks.1.") for name in layers)
    convs = {name for name, layer in layers.items() if getattr(layer.get_base_layer(), "kernel_size", (1, 1)) != (1, 1)}
    assert convs and {layers[n].r["default"] for n in convs} == {2}
    assert all(layers[n].scaling["default"] == pytest.approx(1.5) for n in convs)
    assert {layer.r["default"] for n, layer in layers.items() if n not in convs} == {8}
    assert all(layer.scaling["default"] == pytest.approx(0.5) for n, layer in layers.items() if n not in convs)
