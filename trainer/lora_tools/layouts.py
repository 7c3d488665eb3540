"""Which layout and trainer a LoRA file's keys come from, and those keys renamed to the two forms read_lora takes.

  (K) kohya spelling: `lora_unet_<name>`, `lora_te_`/`lora_te1_`/`lora_te2_`/`lora_te3_<name>` with `.lora_down.weight`,
      `.lora_up.weight`, `.alpha`, `.dora_scale` or LyCORIS's `.hada_*` / `.lokr_*` factors
  (D) diffusers/peft spelling: `<part>.<module path>.lora_A.weight` / `.lora_B.weight` / `.lora_magnitude_vector`,
      text-encoder paths with `text_model.`, alpha from the `lora_adapter_metadata` header (or alpha = rank)

Every layout here is one some trainer or consumer writes; docs/lora-layouts.md says which, with the source file each
spelling was read from: kohya sd-scripts and LyCORIS (K as is), ai-toolkit (K with diffusers UNet names, or D),
OneTrainer's historical "mixture" files (`lora_transformer_<diffusers name>`: D, alpha folded into lora_B) and its
COMFY files, SimpleTuner and diffusers (D; LyCORIS wrapper keys `lycoris_<name>`), peft's save_pretrained
(`base_model.model.`), the older diffusers attention-processor keys, and ComfyUI's `diffusion_model.` form.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from trainer.lora_files.adapter_files import LOKR_SUFFIXES
from trainer.lora_files.kohya import KOHYA_SUFFIXES

LYCORIS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", *LOKR_SUFFIXES)  # LoHa's and LoKr's tensors
LORA_SUFFIXES = tuple("." + s for s in KOHYA_SUFFIXES)
LYCORIS_SUFFIXES = tuple("." + s for s in LYCORIS)
K_SUFFIXES = LORA_SUFFIXES + LYCORIS_SUFFIXES
D_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector",
              # peft's own LoKr layout (this app's exact LoKr diffusers file: diffusers' load_lora_adapter reads it)
              *("." + s for s in LOKR_SUFFIXES))
K_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
D_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# peft/diffusers suffix spellings -> (D) suffix
D_RENAMES = {
    ".lora_magnitude_vector.weight": ".lora_magnitude_vector",
    ".lora_linear_layer.down.weight": ".lora_A.weight",  # diffusers' text-encoder spelling (PEFT_TO_DIFFUSERS)
    ".lora_linear_layer.up.weight": ".lora_B.weight",
    ".lora.down.weight": ".lora_A.weight",  # diffusers' convert_state_dict_to_diffusers for to_q/k/v/out.0
    ".lora.up.weight": ".lora_B.weight",
}
# the attention-processor LoRA of diffusers < 0.21: `<attention>.processor.to_q_lora.down.weight`
PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# ComfyUI's text-encoder names (comfy/lora.py model_lora_keys_clip: "text_encoders.<clip>.transformer.")
COMFY_CLIPS = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "clip_h": "lora_te_", "t5xxl": "lora_te3_"}
LAYOUTS = ("kohya", "lycoris", "diffusers", "peft", "diffusers-old", "comfyui", "onetrainer")
TEXT_ROOTS = ("text_model", "text_projection")  # what a CLIP text-encoder path starts with in the files


def _suffix(key: str, suffixes: tuple[str, ...]) -> str | None:
    """The suffix of `suffixes` that `key` ends with (None if none)."""
    return next((s for s in suffixes if key.endswith(s)), None)


def detect(keys: set[str], header: dict[str, str]) -> tuple[str, str]:
    """(layout, trainer) of a file: layout one of LAYOUTS ("unknown" if no key fits); trainer who wrote it as far as
    the keys and metadata tell: "this app", "OneTrainer", "ai-toolkit", "SimpleTuner", "LyCORIS", "kohya sd-scripts",
    "diffusers", "peft" or "unknown"."""
    return _layout(keys), _trainer(keys, header)


def _layout(keys: set[str]) -> str:
    if any(_suffix(k, LYCORIS_SUFFIXES) for k in keys):
        return "lycoris"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys):
        return "comfyui"
    if any(k.startswith("lora_transformer_") for k in keys):
        return "onetrainer"
    if any(".processor." in k for k in keys) or (
            any(".lora_linear_layer." in k or ".lora.down." in k for k in keys)
            and not any(k.endswith(".lora_A.weight") for k in keys)):  # diffusers writes text encoders so still
        return "diffusers-old"
    if any(k.startswith(K_PREFIXES) for k in keys):
        return "kohya"
    if any(_suffix(k, D_SUFFIXES) for k in keys):
        return "diffusers"
    return "unknown"


def _software(header: dict[str, str]) -> str:
    """ai-toolkit's `software` header entry ({"name": "ai-toolkit", ...}, toolkit/metadata.py) as a name."""
    try:
        software = json.loads(header.get("software", "{}"))
    except json.JSONDecodeError:
        return ""
    return str(software.get("name", "")) if isinstance(software, dict) else ""


def _trainer(keys: set[str], header: dict[str, str]) -> str:
    if any(k.startswith("style_lora_") for k in header):
        return "this app"
    if any(k.startswith("ot_") for k in header) or any(k.startswith("lora_transformer_") for k in keys):
        return "OneTrainer"  # ot_branch / ot_revision / ot_config (DtypeModelSaverMixin._create_safetensors_header)
    if _software(header) == "ai-toolkit":
        return "ai-toolkit"
    if "lycoris_config" in header:
        return "SimpleTuner"  # its LyCORIS saves (helpers/training/save_hooks.py _save_lycoris)
    if header.get("ss_network_module", "").startswith("lycoris"):
        return "LyCORIS"
    if any(k.startswith("ss_") for k in header):
        return "kohya sd-scripts"
    if "lora_adapter_metadata" in header:
        return "SimpleTuner" if any(k.startswith("modelspec.") for k in header) else "diffusers"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith("lycoris_") for k in keys):
        return "LyCORIS"
    return "unknown"


def _kohya_text(prefix: str, name: str) -> str:
    """A text encoder's kohya name with `text_model_` where the writer's CLIP had no such level (transformers 5)."""
    if prefix == "lora_unet_" or name.startswith(TEXT_ROOTS):
        return prefix + name
    return f"{prefix}text_model_{name}"


def _as_kohya(key: str, denoiser: str, clip_l: str) -> str | None:
    """(K) spelling of a kohya, LyCORIS or ComfyUI key (`clip_l`: the kohya prefix ComfyUI's clip_l stands for);
    None when `key` is none of them."""
    if key.startswith(("diffusion_model.", "text_encoders.")):
        return _comfy(key, clip_l)
    suffix = _suffix(key, K_SUFFIXES)
    if suffix is None:
        return None
    name = key[: -len(suffix)]
    if name.startswith("lycoris_"):  # LyCORIS's own wrapper (lycoris/wrapper.py LORA_PREFIX), over the denoiser
        if denoiser != "unet":
            raise ValueError(f"{key}: LyCORIS keys over a transformer's split q/k/v have no kohya name to map to")
        return "lora_unet_" + name.removeprefix("lycoris_") + suffix
    prefix = next((p for p in K_PREFIXES if name.startswith(p)), None)
    return None if prefix is None else _kohya_text(prefix, name.removeprefix(prefix)) + suffix


def _comfy(key: str, clip_l: str) -> str | None:
    """ComfyUI's own names (comfy/lora.py: `diffusion_model.<checkpoint name>`, `text_encoders.<clip>.transformer.
    <name>`, with lora_A/lora_B or lora_down/lora_up, .alpha, .dora_scale, LyCORIS factors) -> (K)."""
    suffix = _suffix(key, (*K_SUFFIXES, ".lora_A.weight", ".lora_B.weight"))
    if suffix is None:
        return None
    name = key[: -len(suffix)]
    suffix = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}.get(suffix, suffix)
    if name.startswith("diffusion_model."):
        return "lora_unet_" + name.removeprefix("diffusion_model.").replace(".", "_") + suffix
    clip, _, rest = name.removeprefix("text_encoders.").partition(".")
    if clip not in COMFY_CLIPS or not rest.startswith("transformer."):
        return None
    prefix = clip_l if clip == "clip_l" else COMFY_CLIPS[clip]
    return _kohya_text(prefix, rest.removeprefix("transformer.").replace(".", "_")) + suffix


def _as_diffusers(key: str, denoiser: str) -> str | None:
    """(D) spelling of a diffusers, peft or older diffusers key; None when `key` is none of them."""
    if key.startswith("base_model.model."):  # PeftModel.save_pretrained over the denoiser itself
        key = f"{denoiser}.{key.removeprefix('base_model.model.')}"
    for old, new in D_RENAMES.items():
        if key.endswith(old):
            key = key[: -len(old)] + new
    if ".processor." in key:
        head, _, tail = key.partition(".processor.")
        proj, _, rest = tail.partition("_lora.")
        if proj not in PROCESSOR or rest not in ("down.weight", "up.weight"):
            return None
        key = f"{head}.{PROCESSOR[proj]}.lora_{'A' if rest == 'down.weight' else 'B'}.weight"
        if not key.startswith(D_PARTS):
            key = f"{denoiser}.{key}"  # ComfyUI takes these without `unet.` too (model_lora_keys_unet)
    suffix = _suffix(key, D_SUFFIXES)
    part, _, module = key.partition(".")
    if suffix is None or part not in D_PARTS or not module:
        return None
    if part.startswith("text_encoder") and not module.startswith(TEXT_ROOTS):
        key = f"{part}.text_model.{module}"
    return key


@functools.lru_cache(maxsize=8)
def _dotted(part: str) -> dict[str, str]:
    """{module path with `.`→`_`: module path} of `part` in every family's reference model that has it (text-encoder
    paths without `text_model.`): how a flattened diffusers name is read back without a module table."""
    from trainer.families import FAMILIES

    names: dict[str, str] = {}
    for family in FAMILIES:
        if part in (family.DENOISER, *family.TEXT_ENCODERS):
            model = family.reference_models().get(part)
            for name, module in model.named_modules() if model is not None else ():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    name = name.removeprefix("text_model.")
                    names[name.replace(".", "_")] = name
    return names


MIXTURE = {"lora_transformer_": "transformer", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def _mixture_key(key: str) -> tuple[str, str, str]:
    """(part, module path, suffix) of a key of OneTrainer's "mixture" layout; ValueError when none fits."""
    suffix = _suffix(key, (".lora_down.weight", ".lora_up.weight", ".alpha"))
    prefix = next((p for p in MIXTURE if key.startswith(p)), None)
    if suffix is None or prefix is None:
        raise ValueError(f"{key}: not a key of OneTrainer's lora_transformer_ layout (known: {', '.join(LAYOUTS)})")
    part = MIXTURE[prefix]
    flat = key[len(prefix): -len(suffix)]
    if part != "transformer":
        flat = flat.removeprefix("text_model_")
    module = _dotted(part).get(flat)
    if module is None:
        raise ValueError(f"{key}: no module of a known {part} is spelled {flat!r}")
    if part != "transformer" and not module.startswith("text_projection"):
        module = "text_model." + module
    return part, module, suffix


def _onetrainer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OneTrainer's "mixture" keys (`lora_transformer_<diffusers name>`, split q/k/v, `lora_te1_`/`lora_te2_`:
    modules/util/convert_lora_util.py convert_to_mixture) -> (D). (D) has no per-module alpha, so alpha/rank is
    folded into lora_B, as OneTrainer's own DIFFUSERS format does (lora_fold_alpha): up·scale·down is unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        part, module, suffix = _mixture_key(key)
        if suffix == ".alpha":
            continue
        stem = key[: -len(suffix)]
        alpha = state.get(stem + ".alpha")
        if suffix == ".lora_up.weight" and alpha is not None:
            rank = state[stem + ".lora_down.weight"].shape[0]
            value = (value.float() * (float(alpha) / rank)).to(value.dtype)
        out[f"{part}.{module}.lora_{'A' if suffix == '.lora_down.weight' else 'B'}.weight"] = value
    return out


def normalize(state: dict[str, torch.Tensor], header: dict[str, str],
              denoiser: str) -> tuple[dict[str, torch.Tensor], str]:
    """`state` with every key renamed to form (K) or (D) (the module docstring), and which ("K" or "D").

    Tensors are kept as they are, except OneTrainer's `lora_transformer_` files, whose alpha/rank goes into lora_B
    ((D) has no per-module alpha; the product is the same ΔW). `denoiser` ("unet" or "transformer") is the part
    prefixes that do not name one stand for (peft's `base_model.model.`, ComfyUI's `diffusion_model.`, LyCORIS's
    `lycoris_`, unprefixed attention-processor keys). ValueError names the first key of no known layout, or a file
    that mixes the two forms."""
    if any(k.startswith("lora_transformer_") for k in state):
        return _onetrainer(state), "D"
    two_clips = denoiser != "unet" or any(k.startswith("text_encoders.clip_g.") for k in state)
    clip_l = "lora_te1_" if two_clips else "lora_te_"  # clip_l beside clip_g is the first of two encoders
    out: dict[str, torch.Tensor] = {}
    forms = set()
    for key, value in state.items():
        new = _as_kohya(key, denoiser, clip_l)
        if new is not None:
            forms.add("K")
        else:
            new = _as_diffusers(key, denoiser)
            forms.add("D")
        if new is None:
            raise ValueError(f"{key}: a key of no LoRA layout this toolbox reads (known: {', '.join(LAYOUTS)})")
        if new in out:
            raise ValueError(f"{key}: names the same module and factor as another key ({new})")
        out[new] = value
    if len(forms) > 1:
        raise ValueError("the file mixes kohya-spelled and diffusers-spelled keys")
    return out, forms.pop() if forms else "K"


def sidecar_header(path: Path, denoiser: str) -> dict[str, str]:
    """The `lora_adapter_metadata` header entry a peft save_pretrained folder's adapter_config.json (beside the file,
    where peft keeps r, lora_alpha, rank_pattern, alpha_pattern) stands for, its entries prefixed with `denoiser` as
    diffusers packs them; {} without one."""
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return {}
    entries = json.loads(config.read_text(encoding="utf-8"))
    return {"lora_adapter_metadata": json.dumps({f"{denoiser}.{k}": v for k, v in entries.items()}, sort_keys=True)}


def guess_denoiser(keys: set[str]) -> str:
    """"transformer" when a file's denoiser keys name MMDiT modules (diffusers' transformer_blocks, Stability's
    joint_blocks) under prefixes that do not say which part they are, else "unet"."""
    bare = (k.removeprefix("base_model.model.").removeprefix("diffusion_model.").removeprefix("lycoris_") for k in keys)
    return "transformer" if any(k.startswith(("transformer_blocks", "joint_blocks", "context_embedder", "x_embedder"))
                                for k in bare) else "unet"
