"""Every LoRA variant trains on the tiny base and exports a file that diffusers loads with exactly the trained ΔW.

ΔW is measured functionally: a layer's effective weight is its output for the identity matrix, so the same
probe works for LoRA, DoRA, VeRA, AdaLoRA and Delta-LoRA (whose frozen-weight drift is part of the output).
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import trainer.training.loop as loop
from trainer.families.loading import ModelError
from trainer.adapters.variants import lora_layers

VARIANT_SETTINGS = {
    "lora": ["lora.alpha=2.0"],
    "dora": ["lora.alpha=2.0", "output.plain_lora_rank=8"],  # a fixed rank: written whatever its error
    "loraplus": [],
    "lorafa": [],
    "vera": ["lora.vera_rank=8"],
    "adalora": ["lora.rank=2", "lora.adalora_init_rank=4", "lora.adalora_tinit=0.25", "lora.adalora_tfinal=0.25",
                "lora.adalora_delta_t=1"],
    "loradrop": ["lora.loradrop_probe_steps=2", "lora.loradrop_threshold=0.6"],
    "deltalora": ["lora.deltalora_start=1", "lora.deltalora_lambda=0.5"],
}


def trained_model(make_cfg, train_capturing, tmp_path, variant, extra=()):
    cfg = make_cfg("train.steps=4", f'lora.variant="{variant}"', "lora.dropout=0.0", "train.lr_unet=5e-3",
                   "train.lr_text_encoder=5e-3", *VARIANT_SETTINGS[variant], *extra)
    return train_capturing(cfg, tmp_path / "run")


@torch.no_grad()
def effective_deltas(modules: dict) -> dict[str, torch.Tensor]:
    """{name: W_eff − W_base} for every adapted Linear layer, measured through the layer's forward."""
    out = {}
    for prefix, module in modules.items():
        module.eval()
        for name, layer in lora_layers(module).items():
            layer = copy.deepcopy(layer).double()  # float64: W_eff − W cancels without fp32 rounding noise
            base = layer.get_base_layer()
            eye = torch.eye(base.in_features, dtype=torch.float64, device=base.weight.device)
            out[f"{prefix}.{name}"] = (layer(eye) - base(eye)).T.float()
    return out


@pytest.mark.parametrize("variant", list(VARIANT_SETTINGS))
def test_variant_trains_and_exports_exact_delta(variant, make_cfg, train_capturing, tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    base, final = trained_model(make_cfg, train_capturing, tmp_path, variant)
    live = effective_deltas({"unet": base.unet, "text_encoder": base.text_encoder})
    assert live and any(d.abs().max() > 0 for d in live.values())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.load_lora_weights(str(final), adapter_name="exported")
    loaded = effective_deltas({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert loaded.keys() == live.keys()
    for name, want in live.items():
        got = loaded[name]
        rel = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{variant} {name}: relative ΔW error {rel:.2e}"

    # The kohya/A1111 file: up·down·alpha/r per key is the same ΔW (DoRA: through ComfyUI's formula, which divides
    # by the row norm of the ORIGINAL weight; test_export.comfyui_weight is written from ComfyUI's source).
    from tests.test_export import comfyui_weight

    kohya = load_file(final.with_name("tiny-test.safetensors"))
    bases = {f"{p}.{n}": layer.get_base_layer().weight.detach().double()  # float64: W' − W without cancellation
             for p, m in {"unet": base.unet, "text_encoder": base.text_encoder}.items()
             for n, layer in lora_layers(m).items()}
    for name, want in live.items():
        part, module = name.split(".", 1)
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        key = prefix + module.replace(".", "_")
        group = {s: kohya[f"{key}.{s}"].double() for s in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
                 if f"{key}.{s}" in kohya}
        got = (comfyui_weight(bases[name], group, eps=torch.finfo(torch.float32).eps) - bases[name]).float()
        assert (got - want).norm() / want.norm().clamp_min(1e-12) < 1e-5, f"kohya {variant} {name}"
    assert len(kohya) == (4 if variant == "dora" else 3) * len(live)
    assert len({v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")}) == 1  # one rank, alpha = rank

    if variant != "dora":  # diffusers' own kohya loader (one alpha per part) gives the diffusers file's weights
        direct = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
        direct.load_lora_weights(str(final.with_name("tiny-test.safetensors")), adapter_name="kohya")
        through_kohya = effective_deltas({"unet": direct.unet, "text_encoder": direct.text_encoder})
        assert through_kohya.keys() == loaded.keys()
        for name, want in loaded.items():
            rel = (through_kohya[name] - want).norm() / want.norm().clamp_min(1e-12)
            assert rel < 1e-4, f"diffusers, kohya file, {variant} {name}: {rel:.2e}"
    else:  # the plain-LoRA export of the DoRA run: loads in diffusers' kohya loader with the error it reports
        plain = final.with_name("tiny-test.plain.safetensors")
        with safe_open(str(plain), "pt") as f, safe_open(str(final.with_name("tiny-test.safetensors")), "pt") as k:
            report = json.loads(f.metadata()["style_lora_plain"])
            assert "style_lora_plain_skipped" not in k.metadata()
        assert report["rank"] == 8 and set(report["rel_error"]) == {"unet", "text_encoder"}
        direct = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
        direct.load_lora_weights(str(plain), adapter_name="plain")
        approx = effective_deltas({"unet": direct.unet, "text_encoder": direct.text_encoder})
        for part in ("unet", "text_encoder"):
            names = [n for n in live if n.startswith(part + ".")]
            lost = sum(float((approx[n] - live[n]).pow(2).sum()) for n in names)
            total = sum(float(live[n].pow(2).sum()) for n in names)
            assert abs((lost / total) ** 0.5 - report["rel_error"][part]) < 1e-4 + 0.01 * report["rel_error"][part]

    if variant == "loradrop":  # the probe dropped the unimportant layers before the real run
        probe = json.loads((tmp_path / "run" / "loradrop.json").read_text())
        assert 0 < len(probe["kept"]) < len(probe["importance"]) == 40  # 32 UNet + 8 text-encoder layers
        assert len(live) == len(probe["kept"])
    if variant == "deltalora":  # exported as rank 2r: s·[(1+λ)B, −λB_K]·[A; A_K]
        ranks = {layer.lora_A["exported"].weight.shape[0] for layer in lora_layers(pipe.unet).values()}
        assert ranks == {8}


def test_qlora_is_refused_on_cpu_before_loading(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="qlora needs a CUDA GPU"):
        loop.train(make_cfg('lora.variant="qlora"'), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_deltalora_keeps_base_bit_identical_and_resumes(make_cfg, train_capturing, tiny_base, tmp_path):
    from diffusers import UNet2DConditionModel

    base, _ = trained_model(make_cfg, train_capturing, tmp_path, "deltalora", extra=["train.checkpoint_every=2"])
    original = dict(UNet2DConditionModel.from_pretrained(tiny_base / "unet").named_parameters())
    for name, p in base.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), original[name.replace(".base_layer", "")].detach()), name
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"

    assert any(k.startswith("deltalora.") for k in load_file(ckpt / "extra.safetensors"))
