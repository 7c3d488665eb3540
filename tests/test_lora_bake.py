"""lora bake: LoRA changes merged into a base. Into a single file: the tiny SD3.5 Medium pipeline written as a
Stability-layout checkpoint (tests/sd3_single_file.py), changes on q/k/v (one fused qkv in the file), the adaLN
halves diffusers swaps, a text encoder of each CLIP; the baked file, loaded back through load_base (diffusers'
from_single_file), holds base + w·ΔW in every changed module and the source's weights everywhere else, and every
file tensor not touched is byte-identical. Also two weighted files, a folder bake of the demo SD1 base, and the
refusals. Most LoRAs are injected as Deltas (deltas_of); the two-file bake reads real kohya and diffusers files."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from trainer.lora_tools.bake import bake
from trainer.lora_tools.deltas import Delta

pytestmark = pytest.mark.usefixtures("one_thread")
MMDIT_KEYS = ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
              "transformer.transformer_blocks.0.attn.to_v", "transformer.transformer_blocks.1.attn.add_k_proj",
              "transformer.transformer_blocks.1.norm1_context.linear", "transformer.norm_out.linear",
              "transformer.transformer_blocks.0.ff.net.2")
TEXT_KEYS = ("text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder_2.encoder.layers.1.mlp.fc1")


@dataclass
class FakeLora:
    family: str
    deltas: dict = field(default_factory=dict)


def random_deltas(base, keys, seed: int) -> dict[str, Delta]:
    """A rank-2 Delta per module key, shaped like the base's weight (entries around 0.01-0.1)."""
    from trainer.lora_tools.bake import find_module

    g, parts, out = torch.Generator().manual_seed(seed), base.parts(), {}
    for key in keys:
        part, name = key.split(".", 1)
        shape = tuple(find_module(parts[part], name)[1].weight.shape)
        out[key] = Delta(shape, torch.randn(2, shape[1], generator=g) * 0.1, torch.randn(shape[0], 2, generator=g),
                         scale=0.5)
    return out


def weights(base, keys) -> dict[str, torch.Tensor]:
    from trainer.lora_tools.bake import find_module

    parts = base.parts()
    return {k: find_module(parts[k.split(".", 1)[0]], k.split(".", 1)[1])[1].weight.detach().clone() for k in keys}


@pytest.fixture(scope="module")
def sd35_file(tmp_path_factory):
    """(single-file checkpoint, its weights-free config folder) of the tiny SD3.5 Medium."""
    import shutil

    from tests.sd3_single_file import real_clip_shapes, write_sd3_single_file
    from trainer.families.tiny_sd3 import build_tiny_sd35

    tmp = tmp_path_factory.mktemp("bake-sd35")
    folder = real_clip_shapes(build_tiny_sd35(tmp / "folder", medium=True))
    configs = shutil.copytree(folder, tmp / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    return write_sd3_single_file(folder, tmp / "sd3.5.safetensors"), configs


def loaded(path, configs=None):
    from trainer.config import ModelConfig
    from trainer.families.loading import load_base

    return load_base(ModelConfig(path=str(path), single_file_config=str(configs) if configs else None))


def assert_baked(source, baked, expected: dict[str, torch.Tensor]):
    """Changed modules hold `expected`; every other tensor of every part equals the source's bit for bit."""
    got = weights(baked, expected)
    for key, want in expected.items():
        error = float((got[key].double() - want.double()).abs().max() / want.double().abs().max())
        assert error <= 1e-6, f"{key}: {error}"
    changed = {f"{k.split('.', 1)[0]}.{n}" for k in expected for n in (k.split(".", 1)[1] + ".weight",
                                                                        "text_model." + k.split(".", 1)[1] + ".weight")}
    for part, model in source.parts().items():
        other = baked.parts()[part].state_dict()
        for name, tensor in model.state_dict().items():
            if f"{part}.{name}" not in changed:
                assert torch.equal(tensor, other[name]), f"{part}.{name} changed"


def file_tensors(path) -> dict[str, tuple[torch.dtype, bytes]]:
    from safetensors.torch import load_file

    return {k: (v.dtype, v.contiguous().view(torch.uint8).numpy().tobytes()) for k, v in load_file(str(path)).items()}


def test_bake_into_the_single_file_layout(sd35_file, tmp_path):
    file, configs = sd35_file
    source = loaded(file, configs)
    deltas = random_deltas(source, MMDIT_KEYS + TEXT_KEYS, seed=0)
    lora = tmp_path / "style.safetensors"
    out = tmp_path / "baked.safetensors"
    result = bake(str(file), [(lora, 0.8)], out, single_file_config=str(configs),
                  deltas_of=lambda path: FakeLora("sd3", deltas))
    assert result["modules"] == len(deltas) and result["family"] == "sd3"
    before = weights(source, deltas)
    assert_baked(source, loaded(out, configs), {k: before[k] + 0.8 * d.weight() for k, d in deltas.items()})
    old, new = file_tensors(file), file_tensors(out)
    assert set(old) == set(new)
    touched = {k for k in old if old[k] != new[k]}
    assert all(old[k][0] == new[k][0] for k in old)  # dtypes kept
    # q, k and v land in one fused qkv: seven MMDiT modules touch five file tensors, the two CLIP modules two
    mmdit = "model.diffusion_model."
    assert touched == {mmdit + "joint_blocks.0.x_block.attn.qkv.weight",
                       mmdit + "joint_blocks.1.context_block.attn.qkv.weight",
                       mmdit + "joint_blocks.1.context_block.adaLN_modulation.1.weight",
                       mmdit + "final_layer.adaLN_modulation.1.weight", mmdit + "joint_blocks.0.x_block.mlp.fc2.weight",
                       "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                       "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight"}
    assert "7 tensors of the file changed" in result["summary"]


def test_two_weighted_files(sd35_file, tmp_path):
    file, configs = sd35_file
    source = loaded(file, configs)
    first = random_deltas(source, MMDIT_KEYS[:3], seed=1)
    second = random_deltas(source, (MMDIT_KEYS[0], TEXT_KEYS[0]), seed=2)
    from trainer.lora_tools.write import write_lora

    # real files, read back by read_lora: a kohya file (q/k/v fused into one qkv module) and a diffusers file
    write_lora(tmp_path / "a.safetensors", first, "sd3", "kohya", {}, unet_config=source.unet.config)
    write_lora(tmp_path / "b.safetensors", second, "sd3", "diffusers", {})
    out = tmp_path / "two.safetensors"
    bake(str(file), [(tmp_path / "a.safetensors", 0.5), (tmp_path / "b.safetensors", -1.0)], out,
         single_file_config=str(configs))
    before = weights(source, {*first, *second})
    expected = {k: before[k] + 0.5 * first[k].weight() if k in first else before[k].clone() for k in before}
    for key, delta in second.items():
        expected[key] = expected[key] - delta.weight()
    assert_baked(source, loaded(out, configs), expected)


def test_bake_the_demo_base_into_a_folder(tmp_path):
    source = loaded("builtin:demo-sd")
    keys = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet.mid_block.attentions.0.proj_in",
            "text_encoder.encoder.layers.0.self_attn.v_proj")
    deltas = random_deltas(source, keys, seed=3)
    out = tmp_path / "baked"
    result = bake("builtin:demo-sd", [(tmp_path / "x.safetensors", 1.0)], out,
                  deltas_of=lambda path: FakeLora(source.kind, deltas))
    assert result["modules"] == 3 and (out / "model_index.json").is_file()
    before = weights(source, deltas)
    assert_baked(source, loaded(out), {k: before[k] + d.weight() for k, d in deltas.items()})


def test_refusals(sd35_file, tmp_path):
    file, configs = sd35_file
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"x")

    def fake(path):
        return FakeLora("sd3", {})

    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        bake(str(file), [(tmp_path / "a.safetensors", 1.0)], exists, single_file_config=str(configs), deltas_of=fake)
    with pytest.raises(ValueError, match="not a single-file checkpoint.*bake into a folder"):
        bake("builtin:demo-sd", [(tmp_path / "a.safetensors", 1.0)], tmp_path / "o.safetensors", deltas_of=fake)
    with pytest.raises(ValueError, match=r"a\.safetensors: a LoRA for SD 1.*bases, but .* is SD 3"):
        bake(str(file), [(tmp_path / "a.safetensors", 1.0)], tmp_path / "o.safetensors",
             single_file_config=str(configs), deltas_of=lambda path: FakeLora("sd1", {}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        bake("builtin:demo-sd", [(tmp_path / "a.safetensors", 1.0)], tmp_path / "full", deltas_of=fake)


def test_folder_bake_draws_what_the_lora_draws_through_peft(tmp_path):
    """The baked demo base's image equals the base's with the same LoRA loaded by diffusers/peft (≤ 2/255)."""
    from diffusers import StableDiffusionPipeline

    from trainer.families.loading import builtin_model_path

    folder = builtin_model_path("demo-sd")
    source = loaded("builtin:demo-sd")
    keys = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
            "text_encoder.encoder.layers.0.self_attn.k_proj", "text_encoder.encoder.layers.1.mlp.fc2")
    deltas = random_deltas(source, keys, seed=4)
    out = tmp_path / "baked"
    bake("builtin:demo-sd", [(tmp_path / "x.safetensors", 1.0)], out,
         deltas_of=lambda path: FakeLora(source.kind, deltas))

    def draw(pipe):
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return pipe("a red square", num_inference_steps=3, height=size, width=size, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    kwargs = dict(dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    with_lora = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    peft_dict = {}
    for key, d in deltas.items():  # diffusers' canonical text-encoder spelling keeps CLIP's `text_model.`
        key = key.replace("text_encoder.", "text_encoder.text_model.", 1)
        peft_dict[f"{key}.lora_A.weight"] = d.down
        peft_dict[f"{key}.lora_B.weight"] = d.up * d.scale
    with_lora.load_lora_weights(peft_dict)
    expected = draw(with_lora)
    got = draw(StableDiffusionPipeline.from_pretrained(out, **kwargs))
    plain = draw(StableDiffusionPipeline.from_pretrained(folder, **kwargs))
    assert abs(expected - plain).max() > 4 / 255  # the LoRA visibly changes the image
    assert abs(expected - got).max() <= 2 / 255


def test_single_file_bake_loads_with_from_single_file_and_draws_the_loras_image(sd35_file, tmp_path):
    """The baked SD3.5 file through diffusers' own StableDiffusion3Pipeline.from_single_file: its transformer and text
    encoders compute what the base file's do with the LoRA file loaded by load_lora_weights (relative 1e-4), and it
    draws the LoRA's image (≤ 2/255, where the LoRA moves the image by 0.1 on average)."""
    from diffusers import StableDiffusion3Pipeline

    from trainer.lora_tools.write import write_lora

    file, configs = sd35_file
    source = loaded(file, configs)
    # text-encoder attention only: diffusers' text-encoder loader maps no peft key of a CLIP MLP (PEFT_TO_DIFFUSERS)
    keys = MMDIT_KEYS + ("text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder_2.encoder.layers.1.self_attn.v_proj")
    deltas = {k: d.scaled(4.0) for k, d in random_deltas(source, keys, seed=5).items()}
    lora = write_lora(tmp_path / "style.diffusers.safetensors", deltas, "sd3", "diffusers", {})
    out = tmp_path / "baked.safetensors"
    bake(str(file), [(lora, 1.0)], out, single_file_config=str(configs))

    def pipeline(path):
        pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(configs), torch_dtype=torch.float32)
        pipe.text_encoder_3.eval()  # from_single_file leaves T5 in training mode: its dropout would differ per call
        return pipe

    def draw(pipe):
        size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        return pipe("a red square", num_inference_steps=3, height=size, width=size, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    with_lora, baked = pipeline(file), pipeline(out)
    with_lora.load_lora_weights(str(lora))
    with torch.no_grad():
        embeds = [p.encode_prompt("a red square", "a red square", "a red square", do_classifier_free_guidance=False)
                  for p in (with_lora, baked)]
        for want, got in zip(embeds[0], embeds[1]):
            if want is not None:
                assert float((got - want).norm() / want.norm()) < 1e-4
        g = torch.Generator().manual_seed(1)
        config = baked.transformer.config
        latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=g)
        outputs = [p.transformer(latents, encoder_hidden_states=embeds[0][0], pooled_projections=embeds[0][2],
                                 timestep=torch.tensor([500.0])).sample for p in (with_lora, baked)]
    assert float((outputs[1] - outputs[0]).norm() / outputs[0].norm()) < 1e-4
    expected, plain, got = draw(with_lora), draw(pipeline(file)), draw(baked)
    assert abs(expected - plain).mean() > 0.05  # the LoRA changes the image a lot
    assert abs(expected - got).max() <= 2 / 255
