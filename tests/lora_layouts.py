"""LoRA files as other trainers write them, for a tiny base: `write_layout(name, path, parts, family)` writes one and
returns the ΔW a consumer applies per module ("part.module", the module path as the base model names it, text
encoders without `text_model.`). Each writer cites the source its key spelling was read from (docs/lora-layouts.md);
module names come from the families' kohya_name (where the trainer uses kohya names) or the model's own
named_modules (where the trainer walks the model), never a hand table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK, ALPHA = 4, 3.0  # alpha != rank wherever the trainer writes one
DENOISER_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "ff.net.2",
                    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "proj_in")
TEXT_TARGETS = ("layers.0.self_attn.q_proj", "layers.0.self_attn.out_proj", "layers.1.mlp.fc1")


def targets(parts: dict[str, torch.nn.Module], linear_only: bool = False) -> list[tuple[str, str]]:
    """(part, module path as the model names it): a first attention block's projections, its feed-forward out, one
    3x3 conv (unless `linear_only`) and a few text-encoder layers."""
    out = []
    for part, model in parts.items():
        mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        if part.startswith("text_encoder"):
            out += [(part, n) for n in mods if n.endswith(TEXT_TARGETS)]
            continue
        first = next(n for n in mods if ".transformer_blocks.0." in n or n.startswith("transformer_blocks.0."))
        block = first[: first.index("transformer_blocks.0.")]
        out += [(part, n) for n in mods if n.startswith(block) and n.removeprefix(block).removeprefix(
            "transformer_blocks.0.") in DENOISER_TARGETS]
        conv = next((n for n, m in mods.items() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                     and ".resnets." in n), None)
        if conv and not linear_only:
            out.append((part, conv))
    return out


def expected_key(part: str, module: str) -> str:
    return f"{part}.{module.removeprefix('text_model.')}"


def _weight(parts, part: str, module: str) -> torch.Tensor:
    return parts[part].get_submodule(module).weight


def lora_pair(shape, gen, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of `shape` (a conv's down keeps its kernel, its up is 1x1)."""
    down = torch.randn(rank, *shape[1:], generator=gen) * 0.3
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.3
    return down, up


def lora_delta(down, up, scale: float, shape) -> torch.Tensor:
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def kohya_groups(family, parts, linear_only: bool = False) -> dict[str, list[tuple[str, str]]]:
    """{kohya name: [(part, module) in row order]}: modules that share a name (SD3's q/k/v in one qkv) together."""
    config = parts[family.DENOISER].config
    groups: dict[str, dict[int, tuple[str, str]]] = {}
    for part, module in targets(parts, linear_only):
        name = family.kohya_name(part, module, config)
        slot = family.kohya_slot(part, module)
        groups.setdefault(name, {})[slot[0] if slot else 0] = (part, module)
    return {name: [g[i] for i in sorted(g)] for name, g in groups.items()}


def split_rows(delta: torch.Tensor, members, parts) -> dict[str, torch.Tensor]:
    """A fused ΔW cut into its members' rows."""
    out, row = {}, 0
    for part, module in members:
        n = _weight(parts, part, module).shape[0]
        out[expected_key(part, module)] = delta[row: row + n]
        row += n
    return out


def fused_shape(members, parts) -> tuple[int, ...]:
    shapes = [tuple(_weight(parts, p, m).shape) for p, m in members]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def write_kohya(path: Path, parts, family, gen, header: dict) -> dict[str, torch.Tensor]:
    """kohya sd-scripts networks/lora.py (SD1/SDXL: `lora_unet`/`lora_te`/`lora_te1`/`lora_te2` + module path, `.` ->
    `_`; SDXL's UNet is sd-scripts' SGM-named one) and networks/lora_sd3.py (`lora_unet_joint_blocks_..._qkv`, q/k/v
    in one fused LoRA, split_qkv merged back in LoRANetwork.state_dict): lora_down/lora_up/alpha, scale alpha/dim."""
    state, expected = {}, {}
    for name, members in kohya_groups(family, parts).items():
        shape = fused_shape(members, parts)
        down, up = lora_pair(shape, gen)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)}
        expected |= split_rows(lora_delta(down, up, ALPHA / RANK, shape), members, parts)
    save_file(state, path, {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK),
                            "ss_network_alpha": str(ALPHA), **header})
    return expected


def factorization(dim: int) -> tuple[int, int]:
    """(m, n), m*n = dim, m <= n as near sqrt(dim) as divides (LyCORIS functional/general.py factorization, factor -1)."""
    m = max(d for d in range(1, int(dim ** 0.5) + 1) if dim % d == 0)
    return m, dim // m


def lycoris_factors(algo: str, shape, gen) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """LyCORIS lycoris/modules/loha.py or lokr.py tensors of one Linear and the ΔW ComfyUI applies
    (comfy/weight_adapter/loha.py: (w1a@w1b)*(w2a@w2b)·alpha/dim; lokr.py: kron(w1, w2), ·alpha/dim only where a
    factor is split, dim = that factor's rank). LoKr here: full w1 (the small one), w2 split at rank RANK."""
    rand = lambda *s: torch.randn(*s, generator=gen) * 0.3  # noqa: E731
    shape = tuple(shape)
    if algo == "loha":
        t = {"hada_w1_a": rand(shape[0], RANK), "hada_w1_b": rand(RANK, shape[1]),
             "hada_w2_a": rand(shape[0], RANK), "hada_w2_b": rand(RANK, shape[1])}
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (ALPHA / RANK)
    else:
        (o1, o2), (i1, i2) = factorization(shape[0]), factorization(shape[1])
        t = {"lokr_w1": rand(o1, i1), "lokr_w2_a": rand(o2, RANK), "lokr_w2_b": rand(RANK, i2)}
        delta = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (ALPHA / RANK)
    return {**t, "alpha": torch.tensor(ALPHA)}, delta.reshape(shape)  # a 1x1 conv's too (ComfyUI reshapes)


def write_lycoris(path: Path, parts, family, gen, algo: str, prefix: str | None = None,
                  header: dict | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS through sd-scripts (lycoris/kohya.py: the kohya names, `lora_unet`/`lora_te*`) or, with `prefix`
    "lycoris_", its own wrapper over the denoiser (lycoris/wrapper.py LORA_PREFIX = "lycoris", diffusers module path
    `.` -> `_`: SimpleTuner's LyCORIS files, save_hooks.py _save_lycoris)."""
    state, expected = {}, {}
    if prefix is None:
        groups = kohya_groups(family, parts, linear_only=True)
    else:
        groups = {prefix + m.replace(".", "_"): [(p, m)] for p, m in targets({family.DENOISER: parts[
            family.DENOISER]}, linear_only=True)}
    for name, members in groups.items():
        tensors, delta = lycoris_factors(algo, fused_shape(members, parts), gen)
        state |= {f"{name}.{k}": v for k, v in tensors.items()}
        expected |= split_rows(delta, members, parts)
    meta = header or {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo})}
    save_file(state, path, meta)
    return expected


def write_named(path: Path, parts, family, gen, prefixes: dict[str, str], header: dict,
                linear_only: bool = False) -> dict[str, torch.Tensor]:
    """kohya-style keys over the model's own module names (`prefix` + named_modules path, `.` -> `_`), alpha kept:
    ai-toolkit toolkit/lora_special.py (lora_unet/lora_te1/lora_te2 + root.named_modules() names, no keymap for
    SD1/SDXL in network_mixins.get_keymap), OneTrainer's LEGACY/"mixture" files (convert_lora_util.py
    convert_to_mixture and kohya_flatten over LoRAModuleWrapper's `prefix.name`)."""
    state, expected = {}, {}
    for part, module in targets(parts, linear_only):
        name = prefixes[part] + module.replace(".", "_")
        down, up = lora_pair(tuple(_weight(parts, part, module).shape), gen)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)}
        expected[expected_key(part, module)] = lora_delta(down, up, ALPHA / RANK, _weight(parts, part, module).shape)
    save_file(state, path, header)
    return expected


def write_peft(path: Path, parts, gen, prefix: dict[str, str], header: dict | None, scale: float,
               te_suffixes: bool = False) -> dict[str, torch.Tensor]:
    """peft lora_A/lora_B keys (`prefix[part]` + module path): diffusers save_lora_weights (`unet.`/`transformer.`/
    `text_encoder.` from pack_weights), ai-toolkit's peft_format (`transformer.`), peft's PeftModel.save_pretrained
    (`base_model.model.`). `te_suffixes`: text encoders through diffusers' convert_state_dict_to_diffusers
    (PEFT_TO_DIFFUSERS: q/k/v/out_proj -> .lora_linear_layer.down/up), as SimpleTuner's save hook does."""
    state, expected = {}, {}
    for part, module in targets({p: m for p, m in parts.items() if p in prefix}, linear_only=True):
        w = _weight(parts, part, module)
        down, up = lora_pair(tuple(w.shape), gen)
        a, b = ".lora_A.weight", ".lora_B.weight"
        if te_suffixes and part.startswith("text_encoder") and module.endswith("_proj"):
            a, b = ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"
        state |= {prefix[part] + module + a: down, prefix[part] + module + b: up}
        expected[expected_key(part, module)] = lora_delta(down, up, scale, w.shape)
    save_file(state, path, header)
    return expected


def adapter_metadata(parts, names) -> str:
    """diffusers' lora_adapter_metadata header: each part's peft LoraConfig.to_dict() packed with `part.`
    (training_utils._collate_lora_metadata, lora_base._pack_dict_with_prefix)."""
    from peft import LoraConfig

    meta = {}
    for part in names:
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted({m.rsplit(".", 1)[-1] for p, m in
                                                                            targets(parts, True) if p == part}))
        meta |= {f"{part}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    return json.dumps(meta, indent=2, sort_keys=True, default=str)


def native_name(family, part: str, module: str, config) -> str:
    """The checkpoint's own (dotted) name of a module: the kohya name's body with its dots back (SGM / Stability
    MMDiT names, from the family's kohya_name; text encoders as the model names them)."""
    if part.startswith("text_encoder"):
        return module
    from trainer.families import sd3, sdxl

    if family is sdxl:
        return sdxl.sgm_unet_name(module, sdxl.unet_layout(config))
    if family is sd3:
        return sd3.sai_name(module)[0]
    raise ValueError(f"{family.NAME}: ComfyUI's own UNet names are not this family's kohya names")


def write_comfy(path: Path, parts, family, gen, header: dict) -> dict[str, torch.Tensor]:
    """OneTrainer's COMFY format (modelSaver/mixin/LoRASaverMixin.py _save_comfy: `diffusion_model.` + the native
    names, q/k/v fused, text encoders under `text_encoders.clip_l.transformer` / `clip_g` (Model.lora_text_encoders),
    lora_A/lora_B with .alpha kept), the form ComfyUI's comfy/lora.py model_lora_keys_unet maps one to one."""
    config = parts[family.DENOISER].config
    clips = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    state, expected = {}, {}
    for members in kohya_groups(family, parts).values():
        part, module = members[0]
        name = native_name(family, part, module, config)
        name = (f"text_encoders.{clips[part]}.transformer.{name}" if part in clips else f"diffusion_model.{name}")
        shape = fused_shape(members, parts)
        down, up = lora_pair(shape, gen)
        state |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": torch.tensor(ALPHA)}
        expected |= split_rows(lora_delta(down, up, ALPHA / RANK, shape), members, parts)
    save_file(state, path, header)
    return expected


def write_processor(path: Path, parts, family, gen) -> dict[str, torch.Tensor]:
    """diffusers' attention-processor LoRA (< 0.21, LoRAAttnProcessor: `unet.<attention>.processor.to_q_lora.down.
    weight`, to_out.0 as `to_out_lora`; text encoders `<module>.lora_linear_layer.down.weight`), as ComfyUI's
    model_lora_keys_unet and diffusers' DIFFUSERS_OLD_TO_DIFFUSERS still read them; no alpha (scale 1)."""
    state, expected = {}, {}
    for part, module in targets(parts, linear_only=True):
        head, _, proj = module.rpartition(".")
        if not part.startswith("text_encoder") and module.endswith("to_out.0"):
            head, proj = module[: -len(".to_out.0")], "to_out"
        if part.startswith("text_encoder"):
            keys = (f"{part}.{module}.lora_linear_layer.down.weight", f"{part}.{module}.lora_linear_layer.up.weight")
        elif proj in ("to_q", "to_k", "to_v", "to_out"):
            keys = (f"{part}.{head}.processor.{proj}_lora.down.weight", f"{part}.{head}.processor.{proj}_lora.up.weight")
        else:
            continue  # the processors held q/k/v/out LoRA only
        w = _weight(parts, part, module)
        down, up = lora_pair(tuple(w.shape), gen)
        state |= dict(zip(keys, (down, up)))
        expected[expected_key(part, module)] = lora_delta(down, up, 1.0, w.shape)
    save_file(state, path)
    return expected


LAYOUTS = ("kohya", "loha", "lokr", "ai-toolkit", "onetrainer", "onetrainer-comfy", "simpletuner", "peft",
           "diffusers-old", "lycoris-wrapper")


def write_layout(name: str, path: Path, parts: dict[str, torch.nn.Module], family,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a LoRA file of layout `name` (LAYOUTS) for the base of `parts` ({part: model}, as Base.parts() gives)
    and return the ΔW per "part.module" that a consumer applies."""
    gen = torch.Generator().manual_seed(seed)
    den = family.DENOISER
    tes = [p for p in parts if p != den]
    kohya = {"ss_base_model_version": family.KOHYA_VERSION}
    if name == "kohya":
        return write_kohya(path, parts, family, gen, kohya)
    if name in ("loha", "lokr"):
        return write_lycoris(path, parts, family, gen, name)
    if name == "lycoris-wrapper":  # SimpleTuner's LyCORIS: the wrapper over the denoiser, its config in the header
        return write_lycoris(path, parts, family, gen, "lokr", "lycoris_", {"lycoris_config": json.dumps(
            {"algo": "lokr", "multiplier": 1.0, "linear_dim": RANK, "linear_alpha": ALPHA})})
    if name == "ai-toolkit":
        software = {"software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit",
                                            "version": "0.0"}), "format": "pt", **kohya}
        if den == "transformer":  # is_v3: peft_format forced, alpha dropped (= rank) (lora_special.py)
            return write_peft(path, {den: parts[den]}, gen, {den: f"{den}."}, software, 1.0)
        te = {tes[0]: "lora_te_"} if len(tes) == 1 else {tes[0]: "lora_te1_", tes[1]: "lora_te2_"}
        return write_named(path, parts, family, gen, {den: "lora_unet_", **te}, software)
    if name == "onetrainer":
        ot = {"ot_branch": "master", "ot_revision": "0" * 40, "modelspec.sai_model_spec": "1.0.0",
              **({"ss_base_model_version": "sdxl_"} if family.NAME == "sdxl" else {})}  # DtypeModelSaverMixin
        if den == "transformer":  # convert_to_mixture: lora_transformer_, split q/k/v
            prefixes = {den: "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
            return write_named(path, parts, family, gen, prefixes, ot, linear_only=True)
        te = {tes[0]: "lora_te_"} if len(tes) == 1 else {tes[0]: "lora_te1_", tes[1]: "lora_te2_"}
        return write_named(path, parts, family, gen, {den: "lora_unet_", **te}, ot)
    if name == "onetrainer-comfy":
        return write_comfy(path, parts, family, gen, {"ot_branch": "master", "ot_revision": "0" * 40})
    if name == "simpletuner":  # diffusers save_lora_weights + _collate_lora_metadata + modelspec
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: adapter_metadata(parts, parts),
                  "modelspec.implementation": "diffusers", "modelspec.sai_model_spec": "1.0.0"}
        return write_peft(path, parts, gen, {p: f"{p}." for p in parts}, header, ALPHA / RANK, te_suffixes=True)
    if name == "peft":  # PeftModel.save_pretrained on the denoiser: adapter_model.safetensors + adapter_config.json
        config = json.loads(adapter_metadata(parts, [den]))
        (path.parent / "adapter_config.json").write_text(json.dumps({k.removeprefix(f"{den}."): v
                                                                    for k, v in config.items()}))
        return write_peft(path, {den: parts[den]}, gen, {den: "base_model.model."}, None, ALPHA / RANK)
    if name == "diffusers-old":
        return write_processor(path, parts, family, gen)
    raise ValueError(f"unknown layout {name!r} (known: {', '.join(LAYOUTS)})")
