"""The training form: an explicit list of config fields and their widgets, and conversions both ways.

Labels are short; help text is the pydantic Field description, so the UI and the config cannot drift. No gradio
here: ui.py turns each FieldSpec into a component.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import families
from trainer.config import PRESETS_DIR, Config, ConfigError, apply_override, list_presets, load_config, parse_override

DEFAULT_PRESET = "demo-style"  # trains on BUILTIN_BASE: the whole flow works offline and shows a real result
BUILTIN_BASE = "builtin:demo-sd"
BASE_CHOICES = [  # (label, value); any other text is accepted too (hub id, diffusers folder, .safetensors)
    ("builtin:demo-sd (demo: tiny model trained on procedural shapes — not a real SD base)", BUILTIN_BASE),
    ("builtin:tiny-sd15 (test: random tiny model, proves the pipeline; samples are noise)", "builtin:tiny-sd15"),
    (f"builtin:tiny-sd35 (test: random tiny {families.get(families.BUILTIN_KINDS['tiny-sd35']).LABEL} model; samples "
     "are noise)", "builtin:tiny-sd35"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5 (hub id)", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
]

# (config field path, widget kind, label). Kinds: text, lines (list[str], one per line), int, float, bool,
# choice (Literal), optional (str | None; empty = None), base (the base-model picker).
BASIC: list[tuple[str, str, str]] = [
    ("data.trigger", "text", "Trigger word"),
    ("model.path", "base", "Base model"),
    ("train.steps", "int", "Steps"),
    ("train.epochs", "int", "Epochs (0 = use steps)"),
    ("lora.rank", "int", "Rank"),
    ("lora.alpha", "float", "Alpha"),
    ("train.lr_unet", "float", "Learning rate (UNet / transformer)"),
    ("data.resolution", "int", "Resolution"),
    ("lora.train_text_encoder", "bool", "Train the text encoder"),
]
ADVANCED: list[tuple[str, str, str]] = [
    ("train.lr_text_encoder", "float", "Learning rate (text encoder)"),
    ("train.batch_size", "int", "Batch size"),
    ("train.grad_accum", "int", "Gradient accumulation"),
    ("train.optimizer", "choice", "Optimizer"),
    ("train.weight_decay", "float", "Weight decay"),
    ("train.prodigy_d_coef", "float", "Prodigy: d coefficient"),
    ("train.lion_beta2", "float", "Lion: β2"),
    ("train.lr_scheduler", "choice", "LR schedule"),
    ("train.warmup_steps", "int", "Warmup steps"),
    ("train.mixed_precision", "choice", "Mixed precision"),
    ("train.gradient_checkpointing", "bool", "Gradient checkpointing"),
    ("train.min_snr_gamma", "float", "Min-SNR gamma"),
    ("train.noise_offset", "float", "Noise offset"),
    ("train.ema", "bool", "EMA of the adapter weights"),
    ("train.ema_decay", "float", "EMA: decay"),
    ("train.ema_warmup", "bool", "EMA: warmup"),
    ("train.seed", "int", "Seed"),
    ("data.masked_loss", "bool", "Masked loss (name.mask.png or alpha)"),
    ("data.validation_split", "float", "Validation: held-out fraction"),
    ("data.validation_path", "text", "Validation: held-out folder"),
    ("train.validation_every", "int", "Validation loss every N steps"),
    ("train.validation_timesteps", "int", "Validation: timesteps per image"),
    ("train.keep_best", "bool", "Keep the best adapter (lowest validation loss)"),
    ("train.log_with", "choice", "Also log to"),
    ("train.save_every", "int", "Save adapter every N steps"),
    ("train.checkpoint_every", "int", "Checkpoint every N steps"),
    ("data.repeats", "int", "Repeats"),
    ("data.flip", "bool", "Horizontal flip"),
    ("data.shuffle_captions", "bool", "Shuffle caption tags"),
    ("data.keep_tokens", "int", "Keep first N tags"),
    ("data.caption_dropout", "float", "Caption dropout"),
    ("data.default_caption", "text", "Default caption"),
    ("data.bucket", "bool", "Aspect-ratio buckets"),
    ("data.bucket_step", "int", "Bucket step"),
    ("data.min_bucket", "int", "Min bucket side"),
    ("data.max_bucket", "int", "Max bucket side"),
    ("data.upscale", "bool", "Upscale small images"),
    ("data.min_image_size", "int", "Min image size"),
    ("data.reg_path", "text", "Regularisation folder (on the server)"),
    ("data.reg_weight", "float", "Regularisation loss weight"),
    ("lora.variant", "choice", "LoRA variant"),
    ("lora.conv_rank", "int", "LoCon: conv rank (0 = off)"),
    ("lora.conv_alpha", "float", "LoCon: conv alpha"),
    ("lora.lokr_factor", "int", "LoKr: factor (-1 = √dim)"),
    ("lora.loraplus_ratio", "float", "LoRA+: B/A learning-rate ratio"),
    ("lora.vera_rank", "int", "VeRA: shared projection rank"),
    ("lora.adalora_init_rank", "int", "AdaLoRA: initial rank"),
    ("lora.loradrop_threshold", "float", "LoRA-drop: importance kept"),
    ("lora.deltalora_lambda", "float", "Delta-LoRA: λ"),
    ("lora.deltalora_start", "int", "Delta-LoRA: start step"),
    ("output.plain_lora_rank", "int", "DoRA: rank of the plain-LoRA file (0 = 2 × rank)"),
    ("lora.dropout", "float", "LoRA dropout"),
    ("lora.rslora", "bool", "rsLoRA"),
    ("lora.train_unet", "bool", "Train the UNet / transformer"),
    ("sample.every", "int", "Samples every N steps"),
    ("sample.prompts", "lines", "Sample prompts (one per line)"),
    ("sample.negative_prompt", "text", "Sample negative prompt"),
    ("sample.steps", "int", "Sample steps"),
    ("sample.guidance", "float", "Sample guidance"),
    ("sample.seed", "int", "Sample seed"),
    ("model.prediction_type", "choice", "Prediction type"),
    ("model.t5", "choice", "T5 text encoder (bases with one; off: ~9 GB less)"),
    ("train.timestep_sampling", "choice", "Flow matching: timestep sampling"),
    ("model.revision", "optional", "Hub revision"),
    ("model.variant", "optional", "Weight variant"),
    ("model.single_file_config", "optional", "Single-file config"),
]
EXTRA_LABEL = "Extra settings"
EXTRA_HELP = "One section.key=value per line, applied last (e.g. train.warmup_steps=10). Any config field."


@dataclass(frozen=True)
class FieldSpec:
    path: str  # "train.steps"
    kind: str
    label: str
    help: str
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> str:  # a python identifier: the gradio_client parameter name hint
        return self.path.replace(".", "_")


def _field(path: str):
    section, name = path.split(".")
    return Config.model_fields[section].annotation.model_fields[name]


def _spec(path: str, kind: str, label: str) -> FieldSpec:
    info = _field(path)
    choices: tuple[str, ...] = ()
    if kind == "choice":
        choices = tuple(typing.get_args(info.annotation))
    elif kind == "base":
        choices = tuple(v for _, v in BASE_CHOICES)
    return FieldSpec(path, kind, label, info.description or "", choices)


BASIC_SPECS = [_spec(*row) for row in BASIC]
ADVANCED_SPECS = [_spec(*row) for row in ADVANCED]
ALL_SPECS = BASIC_SPECS + ADVANCED_SPECS


def _check_kinds() -> None:
    """Fail at import if a spec's kind does not fit its field's type (catches config changes early)."""
    expected = {bool: "bool", int: "int", float: "float", str: "text"}
    for spec in ALL_SPECS:
        ann = _field(spec.path).annotation
        if spec.kind in ("base", "text"):
            ok = ann is str
        elif spec.kind == "optional":
            ok = isinstance(ann, types.UnionType) and set(typing.get_args(ann)) == {str, type(None)}
        elif spec.kind == "choice":
            ok = typing.get_origin(ann) is typing.Literal
        elif spec.kind == "lines":
            ok = ann == list[str]
        else:
            ok = expected.get(ann) == spec.kind
        if not ok:
            raise TypeError(f"form field {spec.path}: kind {spec.kind!r} does not fit type {ann}")


_check_kinds()


def config_to_values(cfg: Config) -> dict[str, Any]:
    """{field path: widget value} for every form field."""
    dumped = cfg.model_dump(mode="json")
    values: dict[str, Any] = {}
    for spec in ALL_SPECS:
        section, name = spec.path.split(".")
        value = dumped[section][name]
        if spec.kind == "lines":
            value = "\n".join(value)
        elif spec.kind == "optional":
            value = value or ""
        values[spec.path] = value
    return values


def preset_values(preset: str) -> dict[str, Any]:
    return config_to_values(load_preset_config(preset))


def load_preset_config(preset: str | None) -> Config:
    if preset and preset not in list_presets():
        raise ConfigError(f"unknown preset {preset!r}")
    return load_config(PRESETS_DIR / f"{preset}.toml" if preset else None)


def _coerce(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if spec.kind == "optional":
        return str(value).strip() or None if value is not None else None
    if spec.kind == "int":
        if value is None or value == "":
            raise ConfigError(f"{spec.label} ({spec.path}): a whole number is required")
        if float(value) != int(float(value)):
            raise ConfigError(f"{spec.label} ({spec.path}): {value} is not a whole number")
        return int(float(value))
    if spec.kind == "float":
        if value is None or value == "":
            raise ConfigError(f"{spec.label} ({spec.path}): a number is required")
        return float(value)
    if spec.kind == "bool":
        return bool(value)
    return "" if value is None else str(value).strip()


LEARNING_RATES = ("train.lr_unet", "train.lr_text_encoder")
PRODIGY_LR = 1.0  # Prodigy's lr multiplies its own step-size estimate: 1.0 is the estimate itself


def _preset_rates(preset: str | None) -> tuple[tuple[float, float], str]:
    values = config_to_values(load_preset_config(preset))
    return (float(values[LEARNING_RATES[0]]), float(values[LEARNING_RATES[1]])), values["train.optimizer"]


def learning_rates_for(optimizer: str, preset: str | None, lr_unet: float | None,
                       lr_text_encoder: float | None) -> tuple[float | None, float | None]:
    """The learning-rate widgets after the optimizer widget changes. Choosing Prodigy sets both to 1.0 when they
    still hold the preset's values, i.e. the user did not set them (as the CLI does, trainer/config.py load_config);
    leaving Prodigy with both at 1.0 brings the preset's back. Rates the user set are kept (and a conflict is still
    refused when training starts)."""
    if lr_unet is None or lr_text_encoder is None:
        return lr_unet, lr_text_encoder
    (preset_unet, preset_te), preset_optimizer = _preset_rates(preset)
    rates = (float(lr_unet), float(lr_text_encoder))
    if optimizer == "prodigy" and rates == (preset_unet, preset_te):
        return PRODIGY_LR, PRODIGY_LR
    if optimizer != "prodigy" and preset_optimizer != "prodigy" and rates == (PRODIGY_LR, PRODIGY_LR):
        return preset_unet, preset_te
    return rates


def values_to_config(preset: str | None, values: dict[str, Any], extra_lines: str = "") -> Config:
    """defaults <- preset <- form values <- extra 'section.key=value' lines. Raises ConfigError with field names."""
    ui: dict[str, Any] = {}
    by_path = {s.path: s for s in ALL_SPECS}
    for path, value in values.items():
        if path not in by_path:
            raise ConfigError(f"unknown form field {path!r}")
        apply_override(ui, path.split("."), _coerce(by_path[path], value))
    overrides = [line.strip() for line in (extra_lines or "").splitlines() if line.strip() and not line.startswith("#")]
    for line in overrides:
        parse_override(line)  # raises a clear ConfigError for a malformed line
    path = PRESETS_DIR / f"{preset}.toml" if preset else None
    if preset and preset not in list_presets():
        raise ConfigError(f"unknown preset {preset!r}")
    train = ui.get("train", {})
    if train.get("optimizer") == "prodigy" and all(k.split(".")[1] in train for k in LEARNING_RATES) and \
            (train["lr_unet"], train["lr_text_encoder"]) == _preset_rates(preset)[0]:
        del train["lr_unet"], train["lr_text_encoder"]  # the preset's, not the user's: load_config gives Prodigy 1.0
    return load_config(path, overrides, extra=ui)


def help_markdown(spec: FieldSpec) -> str:
    return f"{spec.help} (`{spec.path}`)"


def _single_file_kind(path) -> str:
    """The family of a single-file checkpoint from its tensor names (safetensors header only; no torch)."""
    from trainer.io import read_safetensors_header

    return families.from_checkpoint_keys(read_safetensors_header(path)).NAME


def base_roots(outputs: Path) -> list[Path]:
    """Where a logged-in user's base model paths are looked at: outputs/, the Hugging Face cache and the folders in
    STYLE_LORA_BASE_DIRS (os.pathsep-separated), all resolved."""
    from huggingface_hub import constants

    extra = [d for d in os.environ.get("STYLE_LORA_BASE_DIRS", "").split(os.pathsep) if d.strip()]
    return [Path(d).expanduser().resolve() for d in [outputs, constants.HF_HUB_CACHE, *extra]]


def describe_base(path: str | None, user: str | None = None, outputs: Path | None = None) -> str:
    """What the UI shows under the base picker: the detected family (e.g. SD 2.x, SD 3.5 Medium) without loading it.
    With a logged-in `user` a server path outside base_roots(outputs) gets the same answer as a path that does
    not exist, so the picker cannot be used to find out which files the server has."""
    path = (path or "").strip()
    if not path:
        return "Base: none chosen."
    builtin = families.BUILTIN_KINDS.get(path.removeprefix("builtin:")) if path.startswith("builtin:") else None
    if path == BUILTIN_BASE:
        return (f"Base: **{families.get(builtin).LABEL}** layout — demo: a tiny model trained on procedural shapes "
                "(32 px), not a real SD base (docs/demo-base.md).")
    if builtin:
        return f"Base: **{families.get(builtin).LABEL}** layout (built-in tiny model, offline)."
    known = " / ".join(families.get(name).LABEL for name in families.NAMES)
    unknown = f"Base: hub id or path not found here; its family ({known}) is detected when the run loads it."
    if user is not None:
        p = Path(path).expanduser().resolve()  # resolved: neither '..' nor a link leads outside the roots
        if not any(p.is_relative_to(root) for root in base_roots(Path(outputs or "outputs"))):
            return unknown
    else:
        p = Path(path).expanduser()
    if p.is_dir():
        found = families.describe_folder(p)
        if "error" in found:
            return f"Base: {found['error']}"
        return (f"Base: **{families.describe(found['kind'], found['prediction_type'], found['label'])}** (detected "
                "from the model's configs).")
    if p.is_file() and p.suffix.lower() == ".safetensors":
        try:
            kind = _single_file_kind(p)
        except (OSError, ValueError) as err:
            return f"Base: {p.name}: not a readable .safetensors checkpoint ({err})."
        return f"Base: **{families.get(kind).LABEL}** (from the checkpoint's tensor names; v-prediction is read when loading)."
    return unknown
