"""A single-file SD3.5 checkpoint in Stability's layout (`model.diffusion_model.joint_blocks.N.x_block.attn.qkv`,
`first_stage_model.*`, `text_encoders.clip_l|clip_g|t5xxl.transformer.*`) loads offline through load_base with
model.single_file_config = a local diffusers folder, into exactly the weights the pipeline it was written from holds:
with a weights-free config folder (every weight then comes from the file) and with the full folder; with T5 in the
file, without it (model.t5 = "off", or T5 from the folder) and without any text encoder (all from the folder); the
UI names its family from the tensor names alone.

The files are written from the tiny SD3.5 Medium and Large pipelines by tests/sd3_single_file.py, the inverse of
diffusers' own single-file conversion.
"""

from __future__ import annotations

import pytest

from tests.sd3_single_file import MMDIT, TEXT, VAE, real_clip_shapes, write_sd3_single_file

pytestmark = pytest.mark.usefixtures("one_thread")
PARTS = {"transformer": "unet", "vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
         "text_encoder_3": "text_encoder_3"}  # pipeline attribute -> Base attribute


@pytest.fixture(scope="module", params=[True, False], ids=["medium", "large"])
def sd35(request, tmp_path_factory):
    """(diffusers folder, its configs without weights, file, file without T5, file without text encoders, medium?)
    of one tiny SD3.5 size."""
    import shutil

    from trainer.families.tiny_sd3 import build_tiny_sd35

    medium = request.param
    tmp = tmp_path_factory.mktemp("sd35-medium" if medium else "sd35-large")
    folder = real_clip_shapes(build_tiny_sd35(tmp / "folder", medium=medium))
    configs = shutil.copytree(folder, tmp / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    return (folder, configs, write_sd3_single_file(folder, tmp / "sd3.5.safetensors"),
            write_sd3_single_file(folder, tmp / "sd3.5-no-t5.safetensors", ("text_encoder", "text_encoder_2")),
            write_sd3_single_file(folder, tmp / "sd3.5-no-text.safetensors", ()), medium)


def reference(folder):
    import torch
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)


def assert_same_weights(ref, base, parts):
    """Every tensor of each part's state dict (parameters and buffers) equal bit for bit, same dtype."""
    import torch

    for part in parts:
        want, got = getattr(ref, part).state_dict(), getattr(base, PARTS[part]).state_dict()
        assert set(got) == set(want), f"{part}: keys differ: {sorted(set(got) ^ set(want))[:8]}"
        wrong = [k for k in want if got[k].dtype != want[k].dtype or got[k].device.type == "meta"
                 or not torch.equal(got[k], want[k])]
        assert not wrong, f"{part}: {len(wrong)} of {len(want)} tensors differ from the folder's, e.g. {wrong[:5]}"


def test_file_is_in_stabilitys_layout(sd35):
    from safetensors import safe_open

    from trainer.families.tiny_sd3 import TINY_MMDIT

    _, _, file, no_t5, _, medium = sd35
    with safe_open(file, framework="pt") as f:
        keys = set(f.keys())
    assert all(k.startswith((MMDIT, VAE, *TEXT.values())) for k in keys)
    block = MMDIT + "joint_blocks.0."
    assert {block + "x_block.attn.qkv.weight", block + "context_block.attn.qkv.weight", block + "x_block.attn.ln_q.weight",
            MMDIT + "final_layer.adaLN_modulation.1.weight", MMDIT + "pos_embed", VAE + "decoder.up.0.block.0.conv1.weight",
            VAE + "encoder.mid.attn_1.q.weight", TEXT["text_encoder_3"] + "shared.weight"} <= keys
    assert (block + "x_block.attn2.qkv.weight" in keys) == medium  # Medium's MMDiT-X
    assert not any(".transformer_blocks." in k or "to_q" in k for k in keys if k.startswith(MMDIT))
    last = f"{MMDIT}joint_blocks.{TINY_MMDIT['num_layers'] - 1}.context_block."  # the last block's context: pre-only
    assert last + "adaLN_modulation.1.weight" in keys and not any(k.startswith((last + "attn.proj", last + "mlp"))
                                                                 for k in keys)
    with safe_open(no_t5, framework="pt") as f:
        assert not any(k.startswith(TEXT["text_encoder_3"]) for k in f.keys())


def test_single_file_loads_into_the_folders_weights(sd35):
    from trainer.config import ModelConfig
    from trainer.families import sd3
    from trainer.families.loading import load_base

    folder, configs, file, _, _, medium = sd35
    ref = reference(folder)
    for config in (configs, folder):  # weights-free configs: every tensor must come from the file
        base = load_base(ModelConfig(path=str(file), single_file_config=str(config)))
        assert base.family is sd3 and base.kind == "sd3"
        assert sd3.label(base.unet.config) == ("SD 3.5 Medium" if medium else "SD 3.5 Large")
        assert base.text_encoder_3 is not None and base.tokenizer_3 is not None
        assert_same_weights(ref, base, PARTS)
        # from_single_file left T5 in training mode: its dropout noised every caption's conditioning
        assert not any(m.training for m in (base.unet, base.vae, base.text_encoder, base.text_encoder_2,
                                            base.text_encoder_3))


def test_single_file_without_t5_or_text_encoders(sd35):
    from trainer.config import ModelConfig
    from trainer.families import sd3
    from trainer.families.loading import ModelError, load_base

    folder, configs, _, no_t5, no_text, _ = sd35
    ref = reference(folder)
    base = load_base(ModelConfig(path=str(no_t5), single_file_config=str(configs), t5="off"))
    assert base.family is sd3
    assert base.text_encoder_3 is None and base.tokenizer_3 is None and base.frozen_text_encoders() == []
    assert_same_weights(ref, base, [p for p in PARTS if p != "text_encoder_3"])
    # T5 on: the parts the file lacks come from the config folder's weights (loading.parts_missing_from_file), the
    # CLIPs too for a file of the MMDiT and VAE only; a folder without those weights is refused with the way out
    for file in (no_t5, no_text):
        assert_same_weights(ref, load_base(ModelConfig(path=str(file), single_file_config=str(folder))), PARTS)
    with pytest.raises(ModelError, match=r'T5EncoderModel.*model\.t5 = "off"'):
        load_base(ModelConfig(path=str(no_t5), single_file_config=str(configs)))


def test_ui_names_the_base_from_the_file(sd35):
    from app.form import describe_base

    _, _, file, no_t5, no_text, _ = sd35
    for path in (file, no_t5, no_text):
        line = describe_base(str(path))
        assert "SD 3.5" in line and "tensor names" in line, line
