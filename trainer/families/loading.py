"""Load a base (diffusers folder, hub id, single .safetensors file) as its family's pipeline: `load_base` -> `Base`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import ModelConfig

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """The base model cannot be found or loaded; the message names the path and the reason."""


@dataclass
class Base:
    """The parts of a Stable Diffusion pipeline the trainer uses, and the family (trainer.families) they belong to.
    `unet` is the denoiser whatever its class (SD3's MMDiT transformer too): the trainer's name for that part; files
    and pipelines call it `family.DENOISER`."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # the family's training scheduler with the base's schedule (DDPM for the UNet families)
    sample_scheduler: Any  # the base's own inference scheduler, for sample images
    prediction_type: str
    family: Any  # the base's family module (trainer.families.Family), detected from the loaded model
    source: str
    text_encoder_2: Any = None  # a second text encoder where the family has one (SDXL's OpenCLIP bigG)
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # a third, frozen one (SD3's T5; None when model.t5 = "off")
    tokenizer_3: Any = None
    frozen_text_cache: dict = field(default_factory=dict)  # caption -> output of a frozen encoder (SD3's T5)

    @property
    def kind(self) -> str:
        """The family's name, as events and file metadata record it."""
        return self.family.NAME

    def text_encoders(self) -> dict[str, Any]:
        """{"text_encoder": ..., "text_encoder_2": ...}: the LoRA-able ones, as the pipeline and LoRA files name them."""
        return {n: getattr(self, n) for n in self.family.TEXT_ENCODERS if getattr(self, n) is not None}

    def frozen_text_encoders(self) -> list[Any]:
        """The loaded text encoders that condition but never get LoRA (SD3's T5)."""
        return [getattr(self, n) for n in self.family.FROZEN_TEXT_ENCODERS if getattr(self, n) is not None]

    def parts(self, unet=None) -> dict[str, Any]:
        """{family.DENOISER: the denoiser (or `unet`), text encoder name: module}: the LoRA-able parts as files name
        them."""
        return {self.family.DENOISER: unet if unet is not None else self.unet, **self.text_encoders()}

    def pipeline(self, unet=None, text_encoders: dict[str, Any] | None = None):
        """A diffusers inference pipeline of this base's family over these parts (trained ones where given)."""
        return self.family.pipeline(self, unet or self.unet, {**self.text_encoders(), **(text_encoders or {})})


def _load_quantized_unet(family, kind: str, where: str, cfg: ModelConfig, bits: int):
    import diffusers
    from diffusers import BitsAndBytesConfig

    check_qlora_available()
    denoiser_class = getattr(diffusers, family.DENOISER_CLASS)
    quant = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    if kind == "file":
        return denoiser_class.from_single_file(where, config=cfg.single_file_config, subfolder=family.DENOISER,
                                               quantization_config=quant, dtype=torch.bfloat16)
    return denoiser_class.from_pretrained(where, subfolder=family.DENOISER, revision=cfg.revision, variant=cfg.variant,
                                          use_safetensors=True, quantization_config=quant, dtype=torch.bfloat16)


def resolve_source(path: str) -> tuple[str, str]:
    """Classify model.path: ('folder'|'file'|'hub', resolved path or id). Raises ModelError with a clear reason."""
    if path.startswith("builtin:"):
        try:
            return "folder", str(builtin_model_path(path.removeprefix("builtin:")))
        except ValueError as err:
            raise ModelError(f"model.path {path!r}: {err}") from None
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"model.path {path!r}: {p.suffix} files are Python pickles, which can run arbitrary code when loaded; "
            "only .safetensors checkpoints and diffusers folders are accepted"
        )
    if p.is_dir():
        from trainer.families import DENOISERS

        if not (p / "model_index.json").is_file() and not any((p / d).is_dir() for d in DENOISERS):
            raise ModelError(f"model.path {path!r}: folder is not a diffusers pipeline (no model_index.json)")
        return "folder", str(p)
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise ModelError(f"model.path {path!r}: expected a .safetensors checkpoint or a diffusers folder")
        return "file", str(p)
    if p.suffix.lower() == ".safetensors" or path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise ModelError(f"model.path {path!r}: no such file or folder")
    return "hub", path


def builtin_model_path(name: str) -> Path:
    """Resolve builtin:NAME to a folder: demo-sd is the shipped demo base; the tiny ones (families.BUILTIN_KINDS) are
    built by their family on first use."""
    from trainer import families
    from trainer.families.tiny import BUILTIN_CACHE, DEMO_SD

    if name == "demo-sd":
        if not (DEMO_SD / "model_index.json").is_file():
            raise ValueError(f"the demo base is missing from {DEMO_SD}; re-create it with scripts/train_demo_base.py")
        return DEMO_SD
    if name not in families.BUILTIN_KINDS:
        raise ValueError(f"unknown builtin model {name!r} (available: {', '.join(families.BUILTIN_KINDS)})")
    folder = BUILTIN_CACHE / name
    if not (folder / "model_index.json").is_file():
        families.get(families.BUILTIN_KINDS[name]).build_tiny(folder)
    return folder


def check_qlora_available() -> None:
    """QLoRA needs bitsandbytes kernels, which need CUDA: refuse before anything is loaded."""
    if not torch.cuda.is_available():
        raise ModelError("lora.variant = qlora needs a CUDA GPU (bitsandbytes 4/8-bit kernels); this machine has none. "
                         "Use variant lora (or lorafa for lower memory) here.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("lora.variant = qlora needs the bitsandbytes package: pip install bitsandbytes") from None


def source_family(kind: str, where: str, cfg: ModelConfig):
    """The family whose pipeline class loads this source: from model_index.json (folder, hub) or from the keys of a
    single-file checkpoint. Families that share a pipeline class (SD1/SD2) are told apart after loading."""
    import diffusers

    from trainer import families

    if kind == "file":
        from safetensors import safe_open

        with safe_open(where, framework="pt") as f:
            return families.from_checkpoint_keys(f.keys())
    return families.from_pipeline_class(diffusers.DiffusionPipeline.load_config(where, revision=cfg.revision)
                                        .get("_class_name", ""))


def parts_missing_from_file(where: str, config: str | None, passed: dict) -> dict:
    """{name: model} for the text encoders (transformers models) the single file at `where` lacks, loaded from the
    local diffusers folder `config` where it has their weights. diffusers' from_single_file takes such a part from
    the config folder itself, but looks for its weights under diffusers' file names only (diffusion_pytorch_model.*),
    never a transformers model's model*.safetensors, so it refuses every one (an SD3.5 file without T5 or without
    its CLIPs); passed in, the part is used as it is, which is what diffusers' own error message advises."""
    if not config or not Path(config).is_dir():
        return {}
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import is_clip_model_in_single_file, is_t5_in_single_file
    from safetensors import safe_open

    with safe_open(where, framework="pt") as f:
        keys = dict.fromkeys(f.keys())  # diffusers' checks only test names (`in`) here
    found = {}
    for name, spec in diffusers.DiffusionPipeline.load_config(config).items():
        if name in passed or not isinstance(spec, list) or len(spec) != 2 or spec[0] != "transformers":
            continue
        cls = getattr(transformers, spec[1], None)
        if cls is None or not issubclass(cls, transformers.PreTrainedModel):
            continue
        # the dispatch of diffusers' load_single_file_sub_model: a CLIP class from the file's CLIP keys, others (T5)
        # from its T5 keys
        clip = cls.__name__.startswith("CLIP")
        in_file = is_clip_model_in_single_file(cls, keys) if clip else is_t5_in_single_file(keys)
        if not in_file and any((Path(config) / name).glob("*.safetensors")):
            found[name] = cls.from_pretrained(config, subfolder=name, dtype=passed.get("dtype"), use_safetensors=True)
    return found


def load_base(cfg: ModelConfig, quantize_bits: int | None = None) -> Base:
    """Load the base pipeline in fp32 on CPU (the trainer moves and casts it); QLoRA: UNet quantized on CUDA."""
    import diffusers

    from trainer import families

    kind, where = resolve_source(cfg.path)
    common = dict(dtype=torch.float32)
    if quantize_bits:
        check_qlora_available()  # before anything loads: the reason is the machine, not the model
    try:
        family = source_family(kind, where, cfg)
        if quantize_bits:
            common[family.DENOISER] = _load_quantized_unet(family, kind, where, cfg, quantize_bits)
        pipeline_class = getattr(diffusers, family.PIPELINE_CLASS)
        common.update(family.pipeline_kwargs(cfg))
        if kind == "file":
            common.update(parts_missing_from_file(where, cfg.single_file_config, common))
            pipe = pipeline_class.from_single_file(where, config=cfg.single_file_config, **common)
        else:
            # use_safetensors: never fall back to unpickling *.bin weights of a folder or repo
            pipe = pipeline_class.from_pretrained(where, revision=cfg.revision, variant=cfg.variant,
                                                  use_safetensors=True, **common)
        family = families.of_pipeline(pipe)
    except ModelError:
        raise
    except Exception as err:  # diffusers raises many types (OSError, ValueError, SingleFileComponentError...)
        raise ModelError(load_error(cfg.path, kind, err)) from None
    for part in pipe.components.values():  # from_pretrained gives eval mode; from_single_file leaves SD3's T5 in
        if hasattr(part, "eval"):           # training mode, whose dropout would noise every caption's conditioning
            part.eval()
    noise_scheduler, prediction_type = family.training_scheduler(pipe.scheduler, cfg.prediction_type)
    return Base(
        unet=getattr(pipe, family.DENOISER),
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=noise_scheduler,
        sample_scheduler=pipe.scheduler,
        prediction_type=prediction_type,
        family=family,
        source=cfg.path,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_3=getattr(pipe, "text_encoder_3", None),
        tokenizer_3=getattr(pipe, "tokenizer_3", None),
    )


def load_error(path: str, kind: str, err: Exception) -> str:
    """One line: why the base at `path` did not load, with a hint where the cause is likely the offline machine."""
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    from huggingface_hub.constants import HF_HUB_OFFLINE

    offline = HF_HUB_OFFLINE or any(w in text for w in ("offline", "cached", "connect", "Hub"))
    hint = ""
    if kind == "file" and "missing in the checkpoint" in text:  # diffusers' SingleFileComponentError
        # the file lacks a part (SD3.5 files often ship without T5) and the config folder has no weights for it
        hint = (" (the file lacks this part and model.single_file_config has no weights for it: point it at a folder "
                "that has them, or leave the part out where the base allows it, e.g. model.t5 = \"off\")")
    elif offline and kind == "hub":
        hint = " (no hub access here? pass a local diffusers folder or .safetensors file)"
    elif offline and kind == "file":
        hint = " (offline, a single-file checkpoint needs model.single_file_config: a local diffusers folder of the same architecture)"
    elif kind == "file":
        hint = " (is it a full Stable Diffusion checkpoint, not a LoRA or a VAE?)"
    return f"model.path {path!r}: cannot load: {first_line}{hint}"
