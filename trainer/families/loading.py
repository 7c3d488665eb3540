"""Load a Stable Diffusion base (diffusers folder, hub id, single .safetensors file) and attach LoRA with peft."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import LoraConfig, ModelConfig

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """The base model cannot be found or loaded; the message names the path and the reason."""


@dataclass
class Base:
    """The parts of a Stable Diffusion pipeline the trainer uses."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler with the base's beta schedule, used for training
    sample_scheduler: Any  # the base's own inference scheduler, for sample images
    prediction_type: str
    kind: str  # "sd1" | "sd2" | "sdxl", detected from the loaded model (trainer.families)
    source: str
    text_encoder_2: Any = None  # SDXL's second (OpenCLIP bigG, with projection) text encoder
    tokenizer_2: Any = None

    def text_encoders(self) -> dict[str, Any]:
        """{"text_encoder": ..., "text_encoder_2": ...} as the pipeline and LoRA files name them."""
        return {n: m for n, m in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)) if m is not None}

    def pipeline(self, unet=None, text_encoders: dict[str, Any] | None = None):
        """A diffusers inference pipeline of this base's family over these parts (trained ones where given)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        tes = {**self.text_encoders(), **(text_encoders or {})}
        parts = dict(vae=self.vae, unet=unet or self.unet, scheduler=self.sample_scheduler, tokenizer=self.tokenizer)
        if self.kind == "sdxl":
            return StableDiffusionXLPipeline(**parts, tokenizer_2=self.tokenizer_2, **tes)
        return StableDiffusionPipeline(**parts, **tes, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


def _load_quantized_unet(kind: str, where: str, cfg: ModelConfig, bits: int):
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    check_qlora_available()
    quant = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    if kind == "file":
        return UNet2DConditionModel.from_single_file(where, config=cfg.single_file_config, subfolder="unet",
                                                     quantization_config=quant, dtype=torch.bfloat16)
    return UNet2DConditionModel.from_pretrained(where, subfolder="unet", revision=cfg.revision, variant=cfg.variant,
                                                use_safetensors=True,
                                                quantization_config=quant, dtype=torch.bfloat16)


def resolve_source(path: str) -> tuple[str, str]:
    """Classify model.path: ('folder'|'file'|'hub', resolved path or id). Raises ModelError with a clear reason."""
    if path.startswith("builtin:"):
        from trainer.families.tiny import builtin_model_path

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
        if not (p / "model_index.json").is_file() and not (p / "unet").is_dir():
            raise ModelError(f"model.path {path!r}: folder is not a diffusers pipeline (no model_index.json)")
        return "folder", str(p)
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise ModelError(f"model.path {path!r}: expected a .safetensors checkpoint or a diffusers folder")
        return "file", str(p)
    if p.suffix.lower() == ".safetensors" or path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise ModelError(f"model.path {path!r}: no such file or folder")
    return "hub", path


def check_qlora_available() -> None:
    """QLoRA needs bitsandbytes kernels, which need CUDA: refuse before anything is loaded."""
    if not torch.cuda.is_available():
        raise ModelError("lora.variant = qlora needs a CUDA GPU (bitsandbytes 4/8-bit kernels); this machine has none. "
                         "Use variant lora (or lorafa for lower memory) here.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("lora.variant = qlora needs the bitsandbytes package: pip install bitsandbytes") from None


def _pipeline_class(kind: str, where: str, cfg: ModelConfig):
    """StableDiffusionXLPipeline or StableDiffusionPipeline, from model_index.json (folder, hub) or the keys of a
    single-file checkpoint (SDXL's has a second text encoder under conditioner.embedders.1)."""
    import diffusers

    if kind == "file":
        from safetensors import safe_open

        from trainer.families import kind_from_checkpoint_keys

        with safe_open(where, framework="pt") as f:
            xl = kind_from_checkpoint_keys(f.keys()) == "sdxl"
        return diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    name = diffusers.DiffusionPipeline.load_config(where, revision=cfg.revision).get("_class_name", "")
    if name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ValueError(f"{name or 'an unknown pipeline'} is not a Stable Diffusion 1.x/2.x/XL text-to-image base")
    return getattr(diffusers, name)


def load_base(cfg: ModelConfig, quantize_bits: int | None = None) -> Base:
    """Load the base pipeline in fp32 on CPU (the trainer moves and casts it); QLoRA: UNet quantized on CUDA."""
    from diffusers import DDPMScheduler

    from trainer.families import kind_from_configs

    kind, where = resolve_source(cfg.path)
    common = dict(dtype=torch.float32)
    if quantize_bits:
        common["unet"] = _load_quantized_unet(kind, where, cfg, quantize_bits)
    try:
        pipeline_class = _pipeline_class(kind, where, cfg)
        if pipeline_class.__name__ == "StableDiffusionPipeline":
            common.update(safety_checker=None, requires_safety_checker=False)
        if kind == "file":
            pipe = pipeline_class.from_single_file(where, config=cfg.single_file_config, **common)
        else:
            # use_safetensors: never fall back to unpickling *.bin weights of a folder or repo
            pipe = pipeline_class.from_pretrained(where, revision=cfg.revision, variant=cfg.variant,
                                                  use_safetensors=True, **common)
        te2 = getattr(pipe, "text_encoder_2", None)
        family = kind_from_configs(pipe.unet.config, pipe.text_encoder is not None, te2 is not None)
    except Exception as err:  # diffusers raises many types (OSError, ValueError, SingleFileComponentError...)
        text = str(err).strip()
        first_line = text.splitlines()[0] if text else type(err).__name__
        from huggingface_hub.constants import HF_HUB_OFFLINE

        offline = HF_HUB_OFFLINE or any(w in text for w in ("offline", "cached", "connect", "Hub"))
        hint = ""
        if offline and kind == "hub":
            hint = " (no hub access here? pass a local diffusers folder or .safetensors file)"
        elif offline and kind == "file":
            hint = " (offline, a single-file checkpoint needs model.single_file_config: a local diffusers folder of the same architecture)"
        elif kind == "file":
            hint = " (is it a full Stable Diffusion checkpoint, not a LoRA or a VAE?)"
        raise ModelError(f"model.path {cfg.path!r}: cannot load: {first_line}{hint}") from None

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = cfg.prediction_type
    if prediction_type == "auto":
        prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    noise_scheduler.register_to_config(prediction_type=prediction_type)
    return Base(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=noise_scheduler,
        sample_scheduler=pipe.scheduler,
        prediction_type=prediction_type,
        kind=family,
        source=cfg.path,
        text_encoder_2=te2,
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )


def attach_lora(base: Base, cfg: LoraConfig, total_steps: int = 1000) -> dict[str, object]:
    """Freeze the base and add the trainable adapter 'default' (of cfg.variant) to the UNet and/or text encoder.

    Returns the peft tuners of variants that need per-step calls (AdaLoRA), keyed "unet"/"text_encoder"(_2).
    """
    from trainer.adapters.variants import add_adapter, peft_config

    for module in (base.unet, base.vae, *base.text_encoders().values()):
        module.requires_grad_(False)
    tuners = {}
    parts = [("unet", base.unet, cfg.train_unet, cfg.unet_targets)]
    for name, text_encoder in base.text_encoders().items():  # SDXL: both encoders, same targets
        parts.append((name, text_encoder, cfg.train_text_encoder, cfg.text_encoder_targets))
    for name, module, wanted, targets in parts:
        if not wanted:
            continue
        config = peft_config(cfg, targets, total_steps)
        if name == "unet" and cfg.conv_rank:
            from trainer.adapters.lycoris import add_locon

            config = add_locon(config, module, cfg)
        try:
            tuner = add_adapter(module, config)
        except ValueError as err:
            raise ModelError(attach_error(name, targets, err)) from None
        if tuner is not None:
            tuners[name] = tuner
    return tuners


def attach_error(part: str, targets: list[str], err: Exception) -> str:
    """What to tell the user when peft (or transformers under it) refuses to attach LoRA to `part`."""
    part = part.replace("_", " ")
    if "not found in the base model" in str(err) or "did not match" in str(err):  # peft: a real target mismatch
        return f"lora: the {part} has no module matching {targets}: {err}"
    from trainer.versions import incompatible_versions

    # anything else is the library's own reason (e.g. a peft too old for this transformers): pass it on as it is
    return f"lora: peft could not attach LoRA to the {part}: {err}" + (f" ({incompatible_versions()})"
                                                                       if incompatible_versions() else "")


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
