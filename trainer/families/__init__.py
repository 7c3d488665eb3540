"""Base families: everything that differs between Stable Diffusion bases, one module per family.

  sd1.py     SD 1.x, the worked example (docs/adding-a-base.md)      clip.py     CLIP tokenising, file spellings
  sd2.py     SD 2.x: SD1's parts, OpenCLIP-H, v-prediction            ddpm.py     the UNet families' noise rule
  sdxl.py    SDXL: two encoders, pooled text + time ids, SGM names   flow.py     flow matching (SD3.5's noise rule)
  sd3.py     SD3/3.5: MMDiT transformer, CLIP-L/G + T5, MMDiT names   loading.py  load_base / Base: a loaded base
  tiny.py, tiny_xl.py, tiny_sd3.py   tiny random pipelines for tests, the builtin: bases

A family module provides the names of `Family` below (a module satisfies the protocol). The trainer, the files, the
preview, the report and the UI ask the family of a base instead of testing which base it is; a new base is one new
module here and its line in FAMILIES.

This package imports no torch at module level: the web UI uses it to describe a base before anything loads.
May import: trainer.config, trainer.io, trainer.data
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from trainer.families import sd1, sd2, sd3, sdxl

# Detection asks the most specific family first; SD1.x claims what no other family does, so it comes last.
FAMILIES = (sd3, sdxl, sd2, sd1)
FALLBACK = FAMILIES[-1]  # what a file whose keys and metadata name no family is taken for


class Family(Protocol):
    """What a family module provides (sd1.py documents each name)."""

    NAME: str  # "sd1": in events (base_kind), metadata, `convert --base`, `build-tiny --kind`
    LABEL: str  # "SD 1.x": what the UI shows
    PIPELINE_CLASS: str  # the diffusers pipeline class name
    DENOISER: str  # "unet" | "transformer": pipeline attribute, folder and LoRA-file part name of the denoiser
    DENOISER_CLASS: str  # the diffusers class of the denoiser, for QLoRA's quantized load
    TEXT_ENCODERS: tuple[str, ...]  # pipeline attributes and LoRA-file part names of the text encoders
    TOKENIZERS: tuple[str, ...]
    FROZEN_TEXT_ENCODERS: tuple[str, ...]  # text encoders that condition but never get LoRA (SD3's T5)
    DEFAULT_TARGETS: tuple[str, ...]  # the denoiser's LoRA targets when lora.unet_targets is unset
    BLOCKS_HELP: str  # what lora.blocks names mean for this denoiser
    KOHYA_PREFIXES: dict[str, str]  # part -> kohya key prefix
    KOHYA_LAYOUT: str  # families with the same kohya key spelling share it
    KOHYA_VERSION: str  # ss_base_model_version
    KOHYA_TOOLS: str  # the tools that load the kohya file exactly (the Runs panel's which-file-where lines)
    DIFFUSERS_TOOLS: str  # ... and the diffusers file
    KOHYA_NOTE: str  # how exactly, and what to use elsewhere
    DIFFUSERS_NOTE: str
    V2: bool  # ss_v2

    def matches_configs(self, unet_config: dict, components: set[str]) -> bool: ...
    def matches_checkpoint_keys(self, keys: set[str]) -> bool: ...
    def matches_version(self, version: str) -> bool: ...
    def matches_kohya_keys(self, keys: set[str]) -> bool: ...
    def matches_diffusers_keys(self, keys: set[str]) -> bool: ...
    def label(self, unet_config: dict) -> str: ...
    def pipeline_kwargs(self, model_cfg) -> dict: ...
    def pipeline(self, base, unet, text_encoders: dict) -> Any: ...
    def encode_text(self, base, text_encoders: dict, captions: list[str], device) -> tuple: ...
    def predict(self, unet, noisy, timesteps, hidden, pooled, image_sizes: list, dtype) -> Any: ...
    def scale_latents(self, vae, sample) -> Any: ...
    def training_scheduler(self, inference_scheduler, prediction_type: str) -> tuple: ...
    def draw_timesteps(self, base, train, count: int, generator, device) -> Any: ...
    def validation_timesteps(self, base, train, count: int, device) -> Any: ...
    def add_noise(self, base, latents, noise, timesteps) -> Any: ...
    def target(self, base, latents, noise, timesteps) -> Any: ...
    def loss_weight(self, base, timesteps, min_snr_gamma: float) -> Any: ...
    def block_names(self, unet_config) -> tuple[str, ...]: ...
    def block_of(self, module: str) -> str | None: ...
    def kohya_name(self, part: str, module: str, unet_config=None) -> str: ...
    def kohya_slot(self, part: str, module: str) -> tuple[int, int] | None: ...
    def kohya_version(self, unet_config=None) -> str: ...
    def reference_models(self) -> dict: ...
    def modelspec_architecture(self, v_prediction: bool, unet_config=None) -> str: ...
    def default_resolution(self, v_prediction: bool) -> int: ...
    def native_size(self, unet_config: dict, vae_config: dict) -> int: ...
    def build_tiny(self, folder, seed: int = 0) -> Path: ...


NAMES = tuple(f.NAME for f in reversed(FAMILIES))  # "sd1", "sd2", "sdxl", "sd3"
DENOISERS = tuple(dict.fromkeys(f.DENOISER for f in FAMILIES))  # "transformer", "unet"
# the family of each builtin: base (trainer.families.tiny)
BUILTIN_KINDS = {"demo-sd": "sd1", "tiny-sd15": "sd1", "tiny-sd35": "sd3"}


def get(name: str) -> Family:
    """The family called `name`; ValueError for an unknown one."""
    for family in FAMILIES:
        if family.NAME == name:
            return family
    raise ValueError(f"unknown base kind {name!r} (expected one of {', '.join(NAMES)})")


def from_configs(unet_config: dict, components: set[str]) -> Family:
    """The family of a diffusers pipeline: its UNet config and the names of its present components."""
    return next(f for f in FAMILIES if f.matches_configs(unet_config, components))


def kind_from_configs(unet_config: dict, has_text_encoder: bool = True, has_text_encoder_2: bool = False) -> str:
    """The family name from a UNet config (dict or diffusers FrozenDict) and which text encoders exist."""
    components = {name for name, present in (("text_encoder", has_text_encoder),
                                             ("text_encoder_2", has_text_encoder_2)) if present}
    return from_configs(unet_config, components).NAME


def of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline."""
    components = {name for name, part in pipe.components.items() if part is not None}
    return from_configs(denoiser_of(pipe).config, components)


def denoiser_of(pipe):
    """The pipeline's denoiser (its `unet` or `transformer`)."""
    return next(getattr(pipe, name) for name in DENOISERS if getattr(pipe, name, None) is not None)


def denoiser_config(folder: Path) -> dict:
    """The denoiser's config.json of a diffusers folder (unet/ or transformer/); OSError when neither is there."""
    for name in DENOISERS:
        if (folder / name / "config.json").is_file():
            return json.loads((folder / name / "config.json").read_text())
    raise FileNotFoundError(f"no {' or '.join(f'{n}/config.json' for n in DENOISERS)}")


def from_checkpoint_keys(keys) -> Family:
    """The family of a single-file (original LDM/SGM layout) checkpoint from its tensor names."""
    keys = set(keys)
    return next(f for f in FAMILIES if f.matches_checkpoint_keys(keys))


def from_pipeline_class(name: str) -> Family:
    """The first family whose pipeline class is `name` (model_index.json's _class_name); the loaded configs tell
    families with one pipeline class apart (SD1/SD2)."""
    for family in FAMILIES:
        if family.PIPELINE_CLASS == name:
            return family
    known = ", ".join(dict.fromkeys(f.LABEL for f in reversed(FAMILIES)))
    raise ValueError(f"{name or 'an unknown pipeline'} is not a text-to-image base this trainer knows ({known})")


def kohya_file_family(keys) -> Family:
    """The family whose kohya key spelling these keys use (SD1 stands for SD2 too: they are spelled alike)."""
    keys = set(keys)
    return next(f for f in FAMILIES if f.matches_kohya_keys(keys))


def kohya_layout_label(family: Family) -> str:
    """'SD1.x/SD2.x': the families whose kohya files are spelled like `family`'s."""
    return "/".join(f.LABEL.replace(" ", "") for f in reversed(FAMILIES) if f.KOHYA_LAYOUT == family.KOHYA_LAYOUT)


def diffusers_file_family(keys, header: dict) -> Family:
    """The family of a diffusers-layout LoRA: from its ss_base_model_version, else from its keys."""
    version = header.get("ss_base_model_version", "")
    for family in FAMILIES:
        if version and family.matches_version(version):
            return family
    keys = set(keys)
    for family in FAMILIES:
        if family.matches_diffusers_keys(keys):
            return family
    if any(k.startswith(tuple(f"{d}." for d in DENOISERS)) for k in keys):
        raise ValueError("cannot tell which base this denoiser LoRA is for (no ss_base_model_version metadata); pass "
                         f"--base with one of {', '.join(NAMES)}")
    return FALLBACK


def version_family(version: str) -> Family | None:
    """The family a file's ss_base_model_version names, None when it names none."""
    return next((f for f in FAMILIES if version and f.matches_version(version)), None)


def describe_folder(path: str | Path) -> dict:
    """{'kind', 'label', 'prediction_type'} of a diffusers folder from its JSON configs, or {'error': why}."""
    folder = Path(path).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = denoiser_config(folder)
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as err:
        return {"error": f"{folder}: not a readable diffusers pipeline folder ({err})"}
    present = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    try:
        family = from_configs(unet, present)
    except ValueError as err:
        return {"error": f"{folder}: {err}"}
    prediction = "flow" if "FlowMatch" in scheduler.get("_class_name", "") else scheduler.get("prediction_type", "epsilon")
    return {"kind": family.NAME, "label": family.label(unet), "prediction_type": prediction}


PREDICTIONS = {"v_prediction": "v-prediction", "flow": "flow matching", "epsilon": "epsilon-prediction"}


def describe(kind: str, prediction_type: str, label: str | None = None) -> str:
    """One line for the UI and logs, e.g. 'SD 2.x, v-prediction' (`label`: the family's for this base's size)."""
    label = label or next((f.LABEL for f in FAMILIES if f.NAME == kind), kind)
    return f"{label}, {PREDICTIONS.get(prediction_type, PREDICTIONS['epsilon'])}"


def native_size(folder: str | Path) -> int | None:
    """The image side a diffusers folder's base was built for, e.g. 512 for SD1.5, 1024 for SDXL, 32 for the demo
    base; None when the configs cannot be read."""
    folder = Path(folder).expanduser()
    try:
        unet = denoiser_config(folder)
        vae = json.loads((folder / "vae" / "config.json").read_text())
        family = from_configs(unet, {"text_encoder", "text_encoder_2"})  # the size needs the family, not the parts
        return family.native_size(unet, vae)
    except (OSError, ValueError, KeyError, TypeError):
        return None
