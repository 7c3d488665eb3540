"""SD3.5 (Medium and Large) on the tiny random bases: training, resume, and both files as their consumers read them.

The consumers are emulated from their sources, not from trainer code: ComfyUI's SD3 key map and patch in
tests/sd3_comfyui.py; diffusers is the installed StableDiffusion3Pipeline itself.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import trainer.training.loop as loop
from tests.conftest import ROOT, TINY_STYLE
from tests.sd3_comfyui import comfy_deltas, comfy_unet_keys, mmdit_to_diffusers, sai_weights, te_weight
from tests.test_train import steps_of
from trainer.lora_files.export import COMPACT_KEY
from trainer.lora_files.kohya import kohya_to_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TINY = "builtin:tiny-sd35"

# ----------------------------------------------------------------------------- diffusers and the live model


@torch.no_grad()
def merged(models: dict, adapter: str, originals: dict | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """{(part, module): W' − W} of every peft layer (LoRA, VeRA, AdaLoRA, LoHa, LoKr) holding `adapter`, merged by
    peft itself in float64; W is the weight of the same module in `originals` (the untouched base) when given."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for part, model in models.items():
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer) and adapter in layer.active_adapters:
                layer = copy.deepcopy(layer).double()
                weight = layer.get_base_layer().weight.detach().clone()
                layer.merge(adapter_names=[adapter])
                name = name.removeprefix("base_model.model.").removeprefix("text_model.")
                if originals is not None:
                    weight = te_weight(originals[part], name) if part.startswith("text_encoder") else \
                        originals[part].get_submodule(name).weight.detach().double()
                out[(part, name)] = layer.get_base_layer().weight.detach() - weight
    return out


def pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder)


def diffusers_deltas(folder, path: Path) -> dict[tuple[str, str], torch.Tensor]:
    """ΔW of a diffusers file as StableDiffusion3Pipeline.load_lora_weights applies it (a LoKr in peft's own layout:
    as the Preview loads it, the transformer through load_lora_adapter)."""
    from trainer.lora_files.adapter_files import load_lora_file

    pipe = pipeline(folder)
    load_lora_file(pipe, path, "file")
    return merged({p: getattr(pipe, p) for p in ("transformer", "text_encoder", "text_encoder_2")}, "file")


def worst(got: dict, want: dict) -> float:
    """The largest relative (Frobenius) difference over the modules that changed (an untrained fused part is a zero
    block); the sets must be equal. The last block's add_q_proj gets no gradient (its context tokens' attention
    output is dropped), so under plain LoRA it never changes; under DoRA weight decay still moves its magnitude."""
    got, want = ({k: v for k, v in d.items() if v.any()} for d in (got, want))
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:6]
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


def config(out: Path, *overrides: str, base: str = TINY):
    from trainer.config import load_config

    return load_config(ROOT / "presets" / "tiny-test.toml", [
        f'model.path="{base}"', f'data.path="{TINY_STYLE}"', f'output.dir="{out}"', "train.steps=3",
        "train.checkpoint_every=0", "train.save_every=0", "sample.every=0", "sample.prompts=[]", "lora.rank=4",
        "lora.alpha=3.0", "data.caption_dropout=0.0", "train.lr_unet=1e-2", "train.lr_text_encoder=1e-2", *overrides])


def train_live(cfg, run_dir: Path):
    """(the Base the loop trained, the diffusers file) as conftest's train_capturing, usable in module fixtures."""
    captured = {}
    real = loop.load_base
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "load_base", lambda *a, **k: captured.update(base=real(*a, **k)) or captured["base"])
        final = loop.train(cfg, run_dir)
    return captured["base"], final


def tiny_folder() -> Path:
    from trainer.families.loading import builtin_model_path

    return builtin_model_path(TINY.removeprefix("builtin:"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One Medium run with both CLIPs trained (alpha 3 ≠ rank 4): its files and the live model's ΔW."""
    out = tmp_path_factory.mktemp("sd3")
    base, final = train_live(config(out, "output.name=\"m\""), out / "run")
    live = merged({"transformer": base.unet, **base.text_encoders()}, "default")
    return {"kohya": final.with_name("m.safetensors"), "diffusers": final, "live": live}


def transformer_keys(path: Path) -> set[str]:
    return {k.split(".")[0] for k in load_file(path) if k.startswith("lora_unet_")}


DEFAULT_KOHYA = {f"lora_unet_joint_blocks_{i}_{m}" for i in (0, 1)
                 for m in ("x_block_attn_qkv", "x_block_attn_proj", "context_block_attn_qkv")} \
    | {"lora_unet_joint_blocks_0_context_block_attn_proj"}  # the last block's context stream ends before its proj
DEAD_Q = "transformer_blocks.1.attn.add_q_proj"  # see worst()


# ----------------------------------------------------------------------------- 1. training, resume, Large


def stop_after(monkeypatch, step: int) -> None:
    """Ask the trainer to stop (like the UI's Cancel) right after `step`: deterministic, unlike a watcher thread
    racing a loop that runs 20 steps a second."""
    from trainer.events import STOP_FILE

    real = loop.train_step

    def train_step(run, k):
        loss = real(run, k)
        if k + 1 == step:
            (run.run_dir / STOP_FILE).touch()
        return loss

    monkeypatch.setattr(loop, "train_step", train_step)


def test_medium_resumes_bit_identical_and_large_trains(tmp_path, monkeypatch):
    from trainer.families.tiny_sd3 import build_tiny_sd35_large

    common = ("train.steps=6", "lora.dropout=0.1", "data.caption_dropout=0.1", "train.lr_unet=1e-3")
    straight = loop.train(config(tmp_path, *common), tmp_path / "straight")
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        loop.train(config(tmp_path, *common), resumed)
    _, events = steps_of(resumed)
    first_stop = events[-1]["step"]
    assert events[-1]["type"] == "stopped" and first_stop < 6
    loop.train(config(tmp_path, *common, 'train.resume="latest"'), resumed)
    _, events = steps_of(resumed)
    assert [e["type"] for e in events].count("resumed") == 1
    assert (events[-1]["type"], events[-1]["step"]) == ("done", 6)
    for name in ("tiny-test.safetensors", "tiny-test.diffusers.safetensors"):
        want, got = load_file(straight.with_name(name)), load_file(resumed / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    at_stop = load_file(resumed / "checkpoints" / f"step-{first_stop:06d}" / "lora.safetensors")
    key = "transformer_blocks.0.attn.to_q.lora_B"
    assert not torch.equal(next(v for k, v in at_stop.items() if key in k),
                           load_file(straight)[f"transformer.{key}.weight"]), "the stop was mid-run"
    assert transformer_keys(straight.with_name("tiny-test.safetensors")) == DEFAULT_KOHYA

    large = build_tiny_sd35_large(tmp_path / "tiny-sd35-large")
    final = loop.train(config(tmp_path, "train.steps=2", base=str(large)), tmp_path / "large")
    kohya = final.with_name("tiny-test.safetensors")
    assert transformer_keys(kohya) == DEFAULT_KOHYA and not any("attn2" in k for k in load_file(final))
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("5-large",
                                                                              "stable-diffusion-3-5-large/lora")
    assert worst(comfy_deltas(kohya, pipeline(large)), diffusers_deltas(large, final)) < 1e-6


# ----------------------------------------------------------------------------- 2. and 3. both files, exact


def test_diffusers_file_loads_in_the_sd3_pipeline_with_the_trained_delta(trained):
    pipe = pipeline(tiny_folder())
    before = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    pipe.load_lora_weights(str(trained["diffusers"]), adapter_name="file")
    assert pipe.transformer.peft_config["file"].lora_alpha == 3.0  # from lora_adapter_metadata, not assumed = rank
    got = merged({p: getattr(pipe, p) for p in ("transformer", "text_encoder", "text_encoder_2")}, "file")
    assert {p for p, _ in got} == {"transformer", "text_encoder", "text_encoder_2"} and len(got) == 15 + 2 * 8
    assert [k for k, v in trained["live"].items() if not v.any()] == [("transformer", DEAD_Q)]
    assert worst(got, trained["live"]) < 1e-6
    # transformers' adapter loader reports the base weights as "missing": they are untouched
    for name, p in pipe.text_encoder.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name


def test_kohya_file_in_comfyui_equals_the_diffusers_file(trained):
    with safe_open(str(trained["kohya"]), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "5-medium"
    down, up = (load_file(trained["kohya"])[f"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_{s}.weight"]
                for s in ("down", "up"))
    assert down.shape == (12, 32) and up.shape == (96, 12) and up[:32, 4:].abs().max() == 0  # stacked, block-diagonal
    assert {k.split(".")[0] for k in keys if k.startswith("lora_te")} == {
        f"lora_te{t}_text_model_encoder_layers_{b}_self_attn_{m}" for t in (1, 2) for b in (0, 1)
        for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
    comfy = comfy_deltas(trained["kohya"], pipeline(tiny_folder()))
    assert worst(comfy, trained["live"]) < 1e-6
    assert worst(comfy, diffusers_deltas(tiny_folder(), trained["diffusers"])) < 1e-6


# ----------------------------------------------------------------------------- 4. full-size key maps


MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
              num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
              pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
              dual_attention_layers=tuple(range(13)))


@pytest.mark.parametrize("size", ["medium", "large"])
def test_full_size_kohya_and_diffusers_names_are_what_comfyui_maps(size):
    from diffusers import SD3Transformer2DModel

    from trainer.families.sd3 import DEFAULT_TARGETS, REFERENCE_MMDIT
    from trainer.lora_files.kohya_names import module_names

    cfg = MEDIUM if size == "medium" else {**REFERENCE_MMDIT, "dual_attention_layers": ()}
    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    hidden, blocks = cfg["num_attention_heads"] * 64, cfg["num_layers"]
    assert model.pos_embed.proj.weight.shape[0] // 64 == blocks  # ComfyUI's depth: offset depth·64 = hidden size
    key_map = mmdit_to_diffusers(model.config)
    comfy = comfy_unet_keys(sai_weights(model, key_map))
    ours = module_names({"transformer": model}, "sd3")
    linears = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    defaults = {n for n in linears if n.endswith(DEFAULT_TARGETS)}
    assert len(defaults) == 8 * blocks - 1  # the last block has no to_add_out
    named = {m for _, (_, ms) in ours.items() for m in (ms if isinstance(ms, tuple) else (ms,))}
    ff = {n for n in linears if ".ff" in n or n.endswith(("attn2.to_q", "attn2.to_out.0"))}
    assert defaults | ff | {"context_embedder", "proj_out", "pos_embed.proj"} <= named
    assert bool([n for n in named if ".attn2." in n]) == (size == "medium")
    for key, (part, modules) in ours.items():
        assert part == "transformer" and key in comfy, key
        modules = modules if isinstance(modules, tuple) else (modules,)
        for slot, module in enumerate(modules):
            assert isinstance(model.get_submodule(module), (torch.nn.Linear, torch.nn.Conv2d))  # transformer.<module>
            sai, rows, swap = key_map[module]
            assert comfy[key] == sai and not swap, module  # swapped halves would need ComfyUI's function
            assert rows == ((slot * hidden, hidden) if len(modules) == 3 else None), module
    fused = [m for _, m in ours.values() if isinstance(m, tuple)]
    assert len(fused) == 2 * blocks + (13 if size == "medium" else 0)
    assert all(m[0].endswith(("to_q", "add_q_proj")) and len(m) == 3 for m in fused)


# ----------------------------------------------------------------------------- 5. convert


@pytest.mark.parametrize("with_model", [False, True], ids=["no-model", "model"])
def test_convert_round_trips_both_ways(trained, tmp_path, with_model):
    from trainer.lora_files.convert import convert_file

    folder = tiny_folder()
    model = str(folder) if with_model else None
    want = trained["live"]
    to_diffusers = convert_file(trained["kohya"], tmp_path / "k2d.safetensors", "diffusers", model=model)
    back = convert_file(to_diffusers, tmp_path / "k2d2k.safetensors", "kohya", model=model)
    to_kohya = convert_file(trained["diffusers"], tmp_path / "d2k.safetensors", "kohya", model=model)
    again = convert_file(to_kohya, tmp_path / "d2k2d.safetensors", "diffusers", model=model)
    pipe = pipeline(folder)
    errors = [worst(diffusers_deltas(folder, to_diffusers), want), worst(comfy_deltas(back, pipe), want),
              worst(comfy_deltas(to_kohya, pipe), want), worst(diffusers_deltas(folder, again), want)]
    assert max(errors) < 1e-6, errors
    assert load_file(back).keys() == load_file(trained["kohya"]).keys() == load_file(to_kohya).keys()


# ----------------------------------------------------------------------------- 6. variants


VARIANTS = {"lora": [], "dora": [], "loraplus": [], "lorafa": [], "vera": [], "adalora": [], "loradrop": [],
            "deltalora": ["lora.deltalora_start=0"],
            "loha": ['lora.unet_targets=["attn.to_out.0","ff.net.0.proj"]'],
            "lokr": ['lora.unet_targets=["attn.to_out.0","ff.net.0.proj"]']}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_files_give_the_trained_delta(variant, tmp_path):
    base, final = train_live(config(tmp_path, f'lora.variant="{variant}"', *VARIANTS[variant]), tmp_path / "run")
    fresh = pipeline(tiny_folder())
    parts = ("transformer", "text_encoder", "text_encoder_2")
    live = merged({"transformer": base.unet, **base.text_encoders()}, "default", {p: getattr(fresh, p) for p in parts})
    if variant == "deltalora":  # W follows λ·(BA − B_K·A_K) from K = 0, B_K = 0 (B's init): ΔW = (1 + λ)·s·BA
        live = {k: (1 + 0.5) * v for k, v in live.items()}
    kohya = final.with_name("tiny-test.safetensors")
    with safe_open(str(kohya), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    with safe_open(str(final), "pt") as f:
        compact = json.loads(f.metadata().get(COMPACT_KEY, "{}"))
    assert any(k.endswith(".dora_scale") for k in keys) == (variant == "dora")
    if variant in ("loha", "lokr"):
        assert transformer_keys(kohya) == {f"lora_unet_joint_blocks_{i}_x_block_{m}" for i in (0, 1)
                                           for m in ("attn_proj", "mlp_fc1")}
        assert json.loads(meta["ss_network_args"])["algo"] == variant
    comfy = comfy_deltas(kohya, fresh)
    assert {p for p, _ in comfy} == set(parts)
    assert worst(comfy, live) < 1e-5
    error = worst(diffusers_deltas(tiny_folder(), final), live)
    if compact.get("exact", True):  # LoKr's plain-LoRA form can exceed the size cap: truncated, its error measured
        assert error < 1e-5
    else:
        assert variant == "lokr" and error == pytest.approx(compact["max_layer_rel_error"], rel=1e-3)
    if variant not in ("loha", "lokr"):  # the kohya file read back against the base, as the preview and convert do
        tensors, adapter = kohya_to_diffusers(load_file(kohya), {p: getattr(fresh, p) for p in parts}, "sd3", meta)
        save_file(tensors, tmp_path / "back.safetensors", metadata={"lora_adapter_metadata": json.dumps(adapter)})
        assert worst(diffusers_deltas(tiny_folder(), tmp_path / "back.safetensors"), live) < 1e-5


@pytest.mark.parametrize("variant", ["loha", "lokr", "qlora", "dora"])
def test_variants_that_cannot_work_are_refused_in_one_line(variant, tmp_path):
    from trainer.families.loading import ModelError

    partial = ['lora.unet_targets=["attn.to_q","attn.to_out.0"]'] if variant == "dora" else []
    with pytest.raises(ModelError) as err:
        loop.train(config(tmp_path, f'lora.variant="{variant}"', *partial), tmp_path / "run")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and not (tmp_path / "run" / "tiny-test.safetensors").exists()
    if variant == "qlora":
        assert "CUDA" in message
    else:
        assert "fuse" in message and "q, k and v" in message and "attn.to_q" in message, message
    events = tmp_path / "run" / "events.jsonl"
    assert not events.exists() or '"type": "step"' not in events.read_text()


# ----------------------------------------------------------------------------- 7. T5 off


def test_t5_off_trains_on_zero_states(tmp_path, monkeypatch):
    import trainer.families.sd3 as sd3

    seen = []
    real = sd3.t5_states
    monkeypatch.setattr(sd3, "t5_states", lambda *a: seen.append(real(*a)) or seen[-1])
    base, final = train_live(config(tmp_path, 'model.t5="off"', "train.steps=2"), tmp_path / "off")
    assert base.text_encoder_3 is None and base.tokenizer_3 is None
    width = base.unet.config.joint_attention_dim
    assert seen and all(s.shape[1:] == (256, width) and not s.any() for s in seen)
    steps, events = steps_of(tmp_path / "off")
    assert events[-1]["type"] == "done" and all(e["loss"] == e["loss"] for e in steps)
    assert final.is_file() and final.with_name("tiny-test.safetensors").is_file()
    seen.clear()
    train_live(config(tmp_path, "train.steps=1"), tmp_path / "on")  # T5 on: its states are not zeros
    assert seen and all(s.abs().sum() > 0 for s in seen)
