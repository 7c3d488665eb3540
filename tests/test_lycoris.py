"""LyCORIS (LoHa, LoKr) and LoCon train on the tiny base; every file they write gives the live model's ΔW exactly.

The consumers' formulas below are written from their sources (ComfyUI comfy/weight_adapter/loha.py, lokr.py;
A1111 extensions-builtin/Lora/network_hada.py, network_lokr.py, network.py `calc_scale`), not from trainer code.
"""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import trainer.training.loop as loop
from tests.test_export import comfyui_weight, spec_key
from trainer.config import ConfigError
from trainer.adapters.variants import lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RUNS = {  # id: (variant, extra settings)
    "loha": ("loha", ["lora.rank=2", "lora.alpha=3.0"]),
    "lokr": ("lokr", ["lora.rank=2", "lora.alpha=3.0"]),  # rank 2: some LoKr factors decomposed, some full
    "loha-locon": ("loha", ["lora.rank=2", "lora.alpha=1.0", "lora.conv_rank=3", "lora.conv_alpha=1.5"]),
    "lokr-locon": ("lokr", ["lora.rank=4", "lora.alpha=2.0", "lora.conv_rank=2", "lora.conv_alpha=4.0"]),
    "lora-locon": ("lora", ["lora.rank=4", "lora.alpha=2.0", "lora.conv_rank=2", "lora.conv_alpha=1.0"]),
    # presets/demo-style.toml's placement: attention, proj_in/out (1x1 convolutions in SD1.5), feed-forward, LoCon
    "lora-locon-ff": ("lora", ['lora.unet_targets=["to_q","to_k","to_v","to_out.0","proj_in","proj_out",'
                               '"ff.net.0.proj","ff.net.2"]', "lora.rank=4", "lora.alpha=2.0", "lora.conv_rank=2",
                               "lora.conv_alpha=1.0"]),
}
LOHA_KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}


@torch.no_grad()
def merged_deltas(modules: dict, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{kohya key: (W, W' − W)} in float64 for every layer holding `adapter`, merged by peft itself."""
    out = {}
    for part, model in modules.items():
        for name, layer in lora_layers(model).items():
            layer = copy.deepcopy(layer).double()
            weight = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[adapter])
            out[spec_key(part, name.removeprefix("text_model."))] = (weight, layer.get_base_layer().weight.detach() - weight)
    return out


def comfyui_lycoris(weight: torch.Tensor, g: dict) -> torch.Tensor:
    """ComfyUI's LoHa/LoKr calculate_weight at strength 1 (no dora_scale, no Tucker factors)."""
    if "hada_w1_a" in g:
        alpha = g["alpha"] / g["hada_w1_b"].shape[0] if "alpha" in g else 1.0
        diff = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
        return weight + alpha * diff.reshape(weight.shape)
    dim = None
    w1, w2 = g.get("lokr_w1"), g.get("lokr_w2")
    if w1 is None:
        dim = g["lokr_w1_b"].shape[0]
        w1 = g["lokr_w1_a"] @ g["lokr_w1_b"]
    if w2 is None:
        dim = g["lokr_w2_b"].shape[0]
        w2 = g["lokr_w2_a"] @ g["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    alpha = g["alpha"] / dim if "alpha" in g and dim is not None else 1.0
    return weight + alpha * torch.kron(w1, w2).reshape(weight.shape)


def a1111_lycoris(weight: torch.Tensor, g: dict) -> torch.Tensor:
    """A1111 1.10's NetworkModuleHada / NetworkModuleLokr with finalize_updown and calc_scale (multiplier 1)."""
    if "hada_w1_a" in g:
        dim = g["hada_w1_b"].shape[0]
        updown = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
    else:
        dim = None
        for part in ("lokr_w1_b", "lokr_w2_b"):
            if part in g:
                assert g[part].numel() == 1, "A1111 1.10 evaluates `if self.w1b:` on the tensor: fails for more values"
                dim = g[part].shape[0]
        w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
        w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"] @ g["lokr_w2_b"]
        w1 = w1[:, :, None, None] if w2.dim() == 4 else w1
        updown = torch.kron(w1, w2)
    scale = g["alpha"] / dim if dim is not None and "alpha" in g else 1.0
    return weight + updown.reshape(weight.shape) * scale


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("run", list(RUNS))
def test_lycoris_trains_and_every_file_gives_the_trained_delta(run, make_cfg, train_capturing, tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    variant, extra = RUNS[run]
    cfg = make_cfg("train.steps=4", f'lora.variant="{variant}"', "lora.dropout=0.0", "train.lr_unet=5e-3",
                   "train.lr_text_encoder=5e-3", *extra)
    base, final = train_capturing(cfg, tmp_path / "run")
    live = merged_deltas({"unet": base.unet, "text_encoder": base.text_encoder})
    assert live and all(delta.abs().max() > 0 for _, delta in live.values()), "every layer trained"
    convs = [k for k, (w, _) in live.items() if w.dim() == 4 and w.shape[-1] == 3]
    assert bool(convs) == ("locon" in run), "LoCon adds the 3×3 resnet convolutions, and only LoCon"
    if "locon" in run:
        assert any("_resnets_" in k and k.endswith(("conv1", "conv2")) for k in convs)
        assert any(k.endswith("time_emb_proj") for k in live) and any(k.endswith("conv_shortcut") for k in live)

    kohya_path = final.with_name("tiny-test.safetensors")
    kohya = load_file(kohya_path)
    with safe_open(str(kohya_path), "pt") as f:
        header = f.metadata()
    groups: dict[str, dict] = {}
    for key, tensor in kohya.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor.double()
    assert groups.keys() == live.keys(), "one kohya key per adapted module, named as A1111/ComfyUI expect"
    for name, g in groups.items():
        weight, want = live[name]
        if variant == "loha":
            assert g.keys() == LOHA_KEYS, name
        if variant == "lokr":
            assert g.keys() == {"lokr_w1", "lokr_w2", "alpha"}, name
        tools = [comfyui_lycoris, a1111_lycoris] if variant != "lora" else [comfyui_weight]
        for tool in tools:
            err = relative(tool(weight, g) - weight, want)
            assert err < 1e-5, f"{tool.__name__} {name}: {err:.1e}"
    if variant != "lora":
        assert header["ss_network_module"] == "lycoris.kohya" and f'"algo": "{variant}"' in header["ss_network_args"]

    # diffusers: the exact ΔW as a plain LoRA (closed form or full-rank SVD per module), loaded by diffusers itself
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.load_lora_weights(str(final), adapter_name="exported")
    loaded = merged_deltas({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "exported")
    assert loaded.keys() == live.keys()
    for name, (_, want) in live.items():
        err = relative(loaded[name][1], want)
        assert err < 1e-5, f"diffusers {name}: {err:.1e}"


def test_lokr_resumes_exactly(make_cfg, tmp_path):
    common = ("train.steps=4", "train.checkpoint_every=2", 'lora.variant="lokr"', "lora.rank=2", "lora.conv_rank=2",
              "lora.dropout=0.1")
    straight = load_file(loop.train(make_cfg(*common), tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    assert any(".lokr_w" in k for k in load_file(checkpoint / "lora.safetensors"))
    resumed = load_file(loop.train(make_cfg(*common, f'train.resume="{checkpoint}"'), tmp_path / "resumed"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_lycoris_settings_that_cannot_work_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="conv_rank"):
        make_cfg('lora.variant="vera"', "lora.conv_rank=4")
    with pytest.raises(ConfigError, match="train_unet"):
        make_cfg("lora.conv_rank=4", "lora.train_unet=false")
    with pytest.raises(ConfigError, match="rslora"):
        make_cfg('lora.variant="loha"', "lora.rslora=true")


def test_downloads_guide_sends_lycoris_files_to_a1111_and_comfyui(make_cfg, tmp_path):
    import app.downloads_view as view
    from trainer.lora_files import lycoris

    assert view.LYCORIS_KEY == lycoris.LYCORIS_KEY
    loop.train(make_cfg("train.steps=1", 'lora.variant="loha"'), tmp_path / "run")
    line = view.file_use(tmp_path / "run" / "tiny-test.safetensors")
    assert "A1111/Forge and ComfyUI (LyCORIS keys) — exact" in line and ".diffusers.safetensors" in line


def test_sdxl_loha_with_locon_uses_sgm_names_and_stays_exact(tmp_path, train_capturing):
    """SDXL: LyCORIS keys carry kohya's SGM UNet names and lora_te1_/lora_te2_ (trainer.lora_files.kohya_names, the table the
    SDXL tests check against diffusers' own SGM mapping); every one is exact in ComfyUI's formula."""
    from diffusers import StableDiffusionXLPipeline

    from tests.test_sdxl import config
    from trainer.lora_files.kohya_names import module_names
    from trainer.families.tiny_xl import build_tiny_sdxl

    base_dir = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    cfg = config(base_dir, tmp_path, 'lora.variant="loha"', "lora.rank=2", "lora.conv_rank=2",
                 "train.cache_text_embeddings=false", 'output.name="xl"')
    live_base, final = train_capturing(cfg, tmp_path / "run")
    parts = {"unet": live_base.unet, **live_base.text_encoders()}
    table = module_names(parts, "sdxl")
    kohya = load_file(tmp_path / "run" / "xl.safetensors")
    groups: dict[str, dict] = {}
    for key, tensor in kohya.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor.double()
    assert any(n.startswith("lora_unet_input_blocks_") and n.endswith("_in_layers_2") for n in groups)  # resnet conv1
    assert {n.split("_")[1] for n in groups} == {"unet", "te1", "te2"}
    live = {}
    for part, model in parts.items():
        for name, layer in lora_layers(model).items():
            layer = copy.deepcopy(layer).double()
            weight = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=["default"])
            live[(part, name.removeprefix("text_model."))] = (weight, layer.get_base_layer().weight.detach() - weight)
    assert len(groups) == len(live)
    for name, g in groups.items():
        weight, want = live[table[name]]
        assert relative(comfyui_lycoris(weight, g) - weight, want) < 1e-5, name

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(str(final), adapter_name="exported")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for name, layer in lora_layers(getattr(pipe, part)).items():
            layer = copy.deepcopy(layer).double()
            weight = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=["exported"])
            got = layer.get_base_layer().weight.detach() - weight
            assert relative(got, live[(part, name.removeprefix("text_model."))][1]) < 1e-5, (part, name)
