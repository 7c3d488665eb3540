"""Which Stable Diffusion family a base is (sd1 / sd2 / sdxl), told from its configs, and what follows from it.

No torch import: the web UI uses `describe_folder` to show the detected base before anything is loaded.

Detection (no user flag): SDXL's UNet takes pooled text + size/crop time ids (`addition_embed_type = "text_time"`)
and the pipeline has a second text encoder; SD2.x UNets use linear projections in their transformers
(`use_linear_projection`, SD1.x uses 1x1 convs) and OpenCLIP-H's 1024-wide text states. Everything else is SD1.x.
The SDXL refiner (text_time but no first text encoder) is refused: it is an img2img model that style LoRAs skip.
"""

from __future__ import annotations

import json
from pathlib import Path

KINDS = ("sd1", "sd2", "sdxl")
LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# Text encoders per family, as the diffusers pipeline attributes and LoRA-file prefixes name them.
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
# kohya's ss_base_model_version values (sd-scripts library/sdxl_model_util.py, train_network.py).
KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def kind_from_configs(unet_config: dict, has_text_encoder: bool = True, has_text_encoder_2: bool = False) -> str:
    """'sd1' | 'sd2' | 'sdxl' from a UNet config (dict or diffusers FrozenDict) and which text encoders exist."""
    if unet_config.get("addition_embed_type") == "text_time":
        if not has_text_encoder:
            raise ValueError("this is an SDXL refiner (no first text encoder): train style LoRAs on the SDXL base")
        if not has_text_encoder_2:
            raise ValueError("SDXL-type UNet (text_time conditioning) without a second text encoder")
        return "sdxl"
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def kind_from_checkpoint_keys(keys) -> str:
    """The family of a single-file (original LDM/SGM layout) checkpoint from its tensor names."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):  # SDXL's second text encoder
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP-H: SD2.x
        return "sd2"
    return "sd1"


def modelspec_architecture(kind: str, v_prediction: bool) -> str:
    """SAI ModelSpec architecture of a LoRA for this base (kohya library/sai_model_spec.py)."""
    if kind == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if kind == "sd2":
        return "stable-diffusion-v2-768-v/lora" if v_prediction else "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def describe_folder(path: str | Path) -> dict:
    """{'kind', 'label', 'prediction_type'} of a diffusers folder from its JSON configs, or {'error': why}."""
    folder = Path(path).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as err:
        return {"error": f"{folder}: not a readable diffusers pipeline folder ({err})"}
    present = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    try:
        kind = kind_from_configs(unet, "text_encoder" in present, "text_encoder_2" in present)
    except ValueError as err:
        return {"error": f"{folder}: {err}"}
    prediction = scheduler.get("prediction_type", "epsilon")
    return {"kind": kind, "label": LABELS[kind], "prediction_type": prediction}


def describe(kind: str, prediction_type: str) -> str:
    """One line for the UI and logs, e.g. 'SD 2.x, v-prediction'."""
    return f"{LABELS.get(kind, kind)}, {'v-prediction' if prediction_type == 'v_prediction' else 'epsilon-prediction'}"


def native_size(folder: str | Path) -> int | None:
    """The image side a diffusers folder's UNet was built for (sample_size x the VAE's downsampling), e.g. 512 for
    SD1.5, 1024 for SDXL, 32 for the demo base; None when the configs cannot be read."""
    folder = Path(folder).expanduser()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
