"""Every LoRA variant trains on the tiny base and exports a file that diffusers loads with exactly the trained ΔW.

ΔW is measured functionally: a layer's effective weight is its output for the identity matrix, so the same
probe works for LoRA, DoRA, VeRA, AdaLoRA and Delta-LoRA (whose frozen-weight drift is part of the output).
"""

import copy

import pytest
import torch
from safetensors.torch import load_file

import trainer.loop as loop
from trainer.model import ModelError
from trainer.variants import lora_layers

VARIANT_SETTINGS = {
    "lora": ["lora.alpha=2.0"],
    "dora": ["lora.alpha=2.0"],
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

    # The kohya/A1111 file: up·down·alpha/r per key is the same ΔW (DoRA's renormalised form is checked in test_export).
    if variant != "dora":
        kohya = load_file(final.with_name("tiny-test.safetensors"))
        for name, want in live.items():
            part, module = name.split(".", 1)
            prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
            key = prefix + module.replace(".", "_")
            up, down, alpha = kohya[f"{key}.lora_up.weight"], kohya[f"{key}.lora_down.weight"], kohya[f"{key}.alpha"]
            got = up @ down * (alpha / down.shape[0])
            assert (got - want).norm() / want.norm().clamp_min(1e-12) < 1e-5, f"kohya {variant} {name}"
        assert len(kohya) == 3 * len(live)

    if variant == "loradrop":  # the probe dropped the unimportant layers before the real run
        probe = loop.json.loads((tmp_path / "run" / "loradrop.json").read_text())
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
    from safetensors.torch import load_file

    assert any(k.startswith("deltalora.") for k in load_file(ckpt / "extra.safetensors"))
