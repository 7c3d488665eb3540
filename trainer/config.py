"""The one typed config. Settings travel only through it: preset TOML -> UI edits -> CLI --set -> trainer -> file metadata.

Each section is a TOML table ([model], [data], [lora], [train], [sample], [report], [output]). Unknown keys are errors,
so a typo in a preset fails loudly instead of silently training with a default. Field descriptions double as
UI help text.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.config_lora import check_lora

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# Sane upper bounds: a value past them is a typo (an extra zero, 10^12 steps), refused before anything loads instead of
# ending in an out-of-memory error, a full disk or a run that never ends.
VAE_FACTOR = 8  # SD/SDXL pipelines refuse image sides that are not multiples of 8 (the VAE's 8x downsampling)
MAX_SIDE = 4096  # pixels: resolution, buckets, sample and report sizes (SDXL trains at 1024)
MAX_STEPS = 1_000_000
MAX_EPOCHS = 100_000
MAX_REPEATS = 1000  # data.repeats and kohya 'N_name' folders
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    # allow_inf_nan=False: inf/nan (which TOML can spell) are refused for every float setting, not only some.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    path: str = Field("builtin:tiny-sd15", description="Base model: a diffusers folder, a hub id (e.g. "
                      "stable-diffusion-v1-5/stable-diffusion-v1-5), a single-file .safetensors checkpoint, or "
                      "builtin:tiny-sd15 (random tiny model for smoke tests).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when path is a hub id.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. fp16, when the repo has one.")
    single_file_config: str | None = Field(None, description="For a single-file checkpoint: a diffusers folder or hub "
                                           "id whose configs describe it (needed offline; online diffusers finds it "
                                           "from the weights).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field("auto", description="What the UNet predicts; "
        "auto reads it from the base model's scheduler (flow-matching bases take auto only).")
    t5: Literal["on", "off"] = Field("on", description="Bases with a T5 text encoder: off loads none and feeds zeros "
                                     "in its place (about 9 GB less, weaker prompt following).")


class DataConfig(Section):
    path: str = Field("", description="Folder of images with optional same-name .txt captions (subfolders too).")
    trigger: str = Field("", description="Trigger word prepended to every caption, e.g. 'zkstyle'.")
    caption_extension: str = Field(".txt", description="Extension of caption files next to each image.")
    default_caption: str = Field("", description="Caption used for images without a caption file.")
    repeats: int = Field(1, ge=1, le=MAX_REPEATS, description="Times each image is seen per epoch ('N_name' subfolders override).")
    resolution: int = Field(512, ge=32, le=MAX_SIDE, description="Training resolution: buckets hold about resolution² pixels.")
    bucket: bool = Field(True, description="Aspect-ratio bucketing; off = center-crop everything to a square.")
    bucket_step: int = Field(64, ge=8, le=MAX_SIDE, description="Bucket sides are multiples of this many pixels.")
    min_bucket: int = Field(256, ge=8, le=MAX_SIDE, description="Smallest bucket side in pixels.")
    max_bucket: int = Field(1024, ge=8, le=MAX_SIDE, description="Largest bucket side in pixels.")
    upscale: bool = Field(False, description="Allow upscaling small images to the full resolution (off: smaller bucket).")
    min_image_size: int = Field(64, ge=1, le=MAX_SIDE, description="Images with a side below this are skipped with a message.")
    flip: bool = Field(False, description="Random horizontal flip (avoid for styles with text or asymmetry).")
    shuffle_captions: bool = Field(False, description="Shuffle comma-separated caption tags each step.")
    keep_tokens: int = Field(1, ge=0, description="With shuffle: keep the first N tags (after the trigger) in place.")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of training on an empty caption.")
    reg_path: str = Field("", description="Optional folder of regularisation images (kohya's reg images: what the "
                          "base draws for your captions without the style), trained without the trigger word.")
    reg_weight: float = Field(1.0, ge=0.0, le=100.0, description="Loss weight of regularisation images (style images: 1).")
    masked_loss: bool = Field(False, description="Weight the loss by a per-image mask, as kohya's --masked_loss: "
                              "name.mask.png beside the image (white trains, black is ignored) or else the image's "
                              "alpha channel. Images with neither train on their whole area.")
    validation_split: float = Field(0.0, ge=0.0, lt=1.0, description="Hold out this fraction of the images (seeded "
                                    "pick, at least one) for the validation loss; they do not train. 0 = none.")
    validation_path: str = Field("", description="A separate folder of held-out images and captions for the "
                                 "validation loss (instead of validation_split).")

    @model_validator(mode="after")
    def _check_buckets(self) -> "DataConfig":
        if self.min_bucket > self.max_bucket:
            raise ValueError(f"min_bucket ({self.min_bucket}) is larger than max_bucket ({self.max_bucket})")
        if self.resolution % self.bucket_step:
            raise ValueError(f"resolution ({self.resolution}) must be a multiple of bucket_step ({self.bucket_step})")
        return self


class LoraConfig(Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (dim): capacity of the adapter.")
    alpha: float = Field(16.0, gt=0, le=1e6, description="LoRA alpha: the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/sqrt(rank) instead of alpha/rank.")
    train_unet: bool = Field(True, description="Train LoRA on the denoiser (the UNet or the MMDiT transformer).")
    train_text_encoder: bool = Field(True, description="Train LoRA on the text encoder.")
    unet_targets: list[str] | None = Field(None, description="Denoiser modules that get LoRA (names or path suffixes, "
                                           "e.g. ff.net.0.proj). Default: the base family's attention.")
    blocks: dict[str, Annotated[int, Field(ge=0, le=1024)]] | None = Field(
        None, description="Train only these denoiser blocks, each at its own rank (0 = not trained), as kohya's "
        'block_dims: e.g. {"down.1" = 4, "up.1" = 8}. Names: down.N, mid, up.N (a UNet), block.N (a transformer). A '
        "block's alpha keeps lora.alpha/lora.rank (rsLoRA: lora.alpha). Unset: every block at lora.rank.")
    text_encoder_targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "out_proj"], description="Text-encoder module names that get LoRA."
    )
    variant: Literal["lora", "dora", "loraplus", "lorafa", "vera", "adalora", "loradrop", "deltalora", "qlora",
                     "loha", "lokr"] = Field(
        "lora",
        description="LoRA family member. lora: low-rank update B·A. dora: LoRA plus a learned per-column magnitude. "
        "loraplus: B learns loraplus_ratio× faster than A. lorafa: A frozen after init, only B trains (less memory). "
        "vera: one frozen random A/B shared by all layers, only two scaling vectors per layer train (tiny files). "
        "adalora: SVD-form LoRA whose rank budget moves to the layers that need it. loradrop: a short probe run "
        "scores each layer, then only the important layers train. deltalora: the frozen weight also follows the "
        "change of B·A (scaled by deltalora_lambda). qlora: base UNet quantized to 4/8 bit (CUDA only). "
        "loha (LyCORIS): Hadamard product of two rank-r updates, ΔW of rank up to r² for the same size. "
        "lokr (LyCORIS): Kronecker product of two small factors (tiny files). LoHa/LoKr files use LyCORIS keys "
        "(A1111/Forge, ComfyUI); diffusers gets the exact ΔW as a plain LoRA.",
    )
    conv_rank: int = Field(0, ge=0, le=1024, description="LoCon: also train the UNet's resnet and down/upsampler "
                           "layers (kohya's conv_dim), the 3×3 convolutions at this rank (the 1×1 shortcuts and "
                           "time embeddings at lora.rank). 0 = off. With lora/dora/loraplus, loha and lokr.")
    conv_alpha: float = Field(1.0, gt=0, le=1e4, description="LoCon: alpha of the 3×3 convolutions (kohya's conv_alpha): "
                              "their update is scaled by conv_alpha/conv_rank.")
    lokr_factor: int = Field(-1, ge=-1, le=4096, description="LoKr: split each dimension into factors near this size "
                             "(-1 = near the square root, LyCORIS' default).")
    loraplus_ratio: float = Field(16.0, gt=0, le=1e4, description="LoRA+: learning-rate ratio of B to A (paper: 2^4).")
    vera_rank: int = Field(256, ge=1, le=8192, description="VeRA: rank of the shared frozen random projections.")
    vera_d_initial: float = Field(0.1, gt=0, le=100, description="VeRA: initial value of the d scaling vector.")
    adalora_init_rank: int = Field(12, ge=1, le=1024, description="AdaLoRA: starting rank per layer (budget shrinks to lora.rank).")
    adalora_tinit: float = Field(0.1, ge=0, lt=1, description="AdaLoRA: fraction of steps before rank pruning starts.")
    adalora_tfinal: float = Field(0.2, ge=0, lt=1, description="AdaLoRA: fraction of final steps with the budget fixed.")
    adalora_delta_t: int = Field(10, ge=1, description="AdaLoRA: steps between budget re-allocations.")
    adalora_orth_reg: float = Field(0.5, ge=0, le=1e4, description="AdaLoRA: weight of the orthogonality regulariser on P and Q.")
    loradrop_probe_steps: float = Field(0.1, gt=0, le=MAX_STEPS, description="LoRA-drop: length of the probe run, as "
                                        "a fraction of train steps (or steps if >= 1).")
    loradrop_threshold: float = Field(0.9, gt=0, le=1, description="LoRA-drop: keep the most important layers until "
                                      "their share of importance reaches this.")
    deltalora_lambda: float = Field(0.5, ge=0, le=100, description="Delta-LoRA: update ratio λ of the frozen weight (paper: 0.5).")
    deltalora_start: int = Field(500, ge=0, description="Delta-LoRA: step K after which the frozen weight follows B·A (paper: 500).")
    qlora_bits: Literal[4, 8] = Field(4, description="QLoRA: quantize the base UNet to 4-bit NF4 or 8-bit.")

    @model_validator(mode="after")
    def _check_something_trains(self) -> "LoraConfig":
        check_lora(self)  # trainer/config_lora.py
        return self


class TrainConfig(Section):
    steps: int = Field(1000, ge=1, le=MAX_STEPS, description="Total optimizer steps (ignored when epochs > 0).")
    epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="Train this many epochs instead of a fixed step count (0 = use steps).")
    batch_size: int = Field(1, ge=1, le=1024, description="Images per step per GPU.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Gradient accumulation: batches per optimizer step.")
    lr_unet: float = Field(1e-4, ge=0, le=10, description="Learning rate of the UNet LoRA.")
    lr_text_encoder: float = Field(5e-5, ge=0, le=10, description="Learning rate of the text-encoder LoRA.")
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion"] = Field(
        "adamw", description="Optimizer. adamw: AdamW (fused on CUDA). adamw8bit: bitsandbytes' 8-bit AdamW, less "
        "memory (CUDA only). prodigy: learning-rate free (prodigyopt), set both learning rates to 1.0 (the lr "
        "multiplies its estimate); UNet and text encoder must share one lr. adafactor: transformers' Adafactor with a "
        "fixed learning rate (relative step off, as kohya presets use it). lion: sign-based (lion-pytorch), use a "
        "3-10x lower learning rate than AdamW.")
    weight_decay: float = Field(1e-2, ge=0, le=100, description="Weight decay (decoupled for AdamW, Prodigy and Lion).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="β1 of AdamW, Prodigy and Lion.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="β2 of AdamW and Prodigy.")
    prodigy_d_coef: float = Field(1.0, gt=0, le=100, description="Prodigy: multiplier of its step-size estimate d "
                                  "(recipes use 0.5-2; lower = gentler).")
    lion_beta2: float = Field(0.99, ge=0, lt=1, description="Lion: β2 (paper: 0.99).")
    adam_eps: float = Field(1e-8, gt=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm (0 = off).")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"] = Field(
        "cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto = bf16 on a CUDA GPU that supports it, else fp32. Base weights use this dtype; "
        "LoRA weights stay fp32."
    )
    fast: Literal["auto", "on", "off"] = Field(
        "auto", description="The fast path: torch.compile of the trained models with CUDA graphs, one static graph "
        "per bucket shape (the first steps of each bucket compile). auto = on with a CUDA GPU; off = the plain eager "
        "path (debugging); on also compiles on CPU (slow to start, for tests).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in UNet and text encoder.")
    cache_latents: bool = Field(True, description="Encode every image once with the VAE before training.")
    cache_text_embeddings: bool = Field(True, description="Encode captions once when the text encoder is frozen and "
                                        "captions do not change per step.")
    min_snr_gamma: float = Field(5.0, ge=0, le=1e4, description="Min-SNR-γ loss weighting (0 = off; DDPM bases only).")
    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = Field("logit_normal", description="Flow-matching "
        "bases: how σ is drawn. logit_normal: sigmoid(N(logit_mean, logit_std)) (Esser et al. 2024; diffusers' "
        "default); mode: their mode sampling (mode_scale); uniform (sd-scripts' default). Then shifted by flow_shift.")
    logit_mean: float = Field(0.0, ge=-10, le=10, description="logit_normal: mean (Esser et al. 2024: 0).")
    logit_std: float = Field(1.0, gt=0, le=10, description="logit_normal: std (Esser et al. 2024: 1).")
    mode_scale: float = Field(1.29, ge=-1, le=2, description="mode sampling: scale s (Esser et al. 2024: 1.29).")
    flow_shift: float | None = Field(None, gt=0, le=100, description="Flow-matching bases: σ' = sσ/(1 + (s−1)σ) "
                                     "(s > 1: more noise). Default: the base scheduler's shift (3.0 for the 3.5 bases).")
    noise_offset: float = Field(0.0, ge=0, le=10, description="Noise offset (helps very dark/bright images; 0.05 typical).")
    ema: bool = Field(False, description="Keep an exponential moving average (EMA) of the adapter weights: the saved "
                      "adapter, samples and validation use the averaged weights (smoother, often better styles); "
                      "checkpoints keep the raw ones too, so resuming is exact.")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA: the largest decay (closer to 1 = longer memory; "
                             "0.999 ≈ the last 1000 steps).")
    ema_warmup: bool = Field(True, description="EMA: ramp the decay up as 1 − (1 + step)^−2/3 so early weights do not "
                             "dominate the average (diffusers' EMA warmup).")
    validation_every: int = Field(0, ge=0, description="Validation loss on the held-out images every N steps (and at "
                                  "the end): fixed timesteps and noise, so it compares across steps and runs. "
                                  "0 = only at the end (when there is a held-out set).")
    validation_timesteps: int = Field(4, ge=1, le=100, description="Validation: fixed timesteps per image, evenly "
                                      "spread over the noise schedule.")
    keep_best: bool = Field(False, description="Keep the adapter with the lowest validation loss as "
                            "<name>-best.safetensors (and its .diffusers file). Needs a held-out set.")
    log_with: Literal["none", "tensorboard"] = Field(
        "none", description="Also log the training loss, learning rate and validation loss to TensorBoard "
        "(accelerate's tracker) in RUN/tensorboard/: `tensorboard --logdir outputs`. events.jsonl stays the UI's source.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for data order, augmentation, noise and timesteps.")
    save_every: int = Field(0, ge=0, description="Write an adapter file every N steps (0 = only at the end).")
    checkpoint_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0 = off).")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="How many resumable checkpoints to keep.")
    resume: str | None = Field(None, description="Checkpoint folder to resume from, or 'latest' in the run folder.")


class SampleConfig(Section):
    every: int = Field(0, ge=0, description="Render sample images every N steps (0 = off; always at the end if prompts).")
    prompts: list[str] = Field(default_factory=list, description="Prompts for samples; {trigger} is replaced.")
    negative_prompt: str = Field("", description="Negative prompt for samples.")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="Fixed seed so samples are comparable across steps.")
    steps: int = Field(20, ge=1, le=1000, description="Denoising steps per sample.")
    guidance: float = Field(7.0, ge=0, le=100, description="Classifier-free guidance scale.")
    width: int | None = Field(None, ge=VAE_FACTOR, le=MAX_SIDE, description="Sample and report image width, a "
                              f"multiple of {VAE_FACTOR} (default: data.resolution).")
    height: int | None = Field(None, ge=VAE_FACTOR, le=MAX_SIDE, description="Sample and report image height, a "
                               f"multiple of {VAE_FACTOR} (default: data.resolution).")

    @field_validator("width", "height")
    @classmethod
    def _vae_multiple(cls, side: int | None) -> int | None:
        if side is not None and side % VAE_FACTOR:
            below, above = side // VAE_FACTOR * VAE_FACTOR, -(-side // VAE_FACTOR) * VAE_FACTOR
            raise ValueError(f"{side} is not a multiple of {VAE_FACTOR} (the VAE works in {VAE_FACTOR}-pixel blocks); "
                             f"use {below} or {above}")
        return side


class ReportConfig(Section):
    enabled: bool = Field(True, description="After the run, measure whether the style was learned (report.json + "
                          "report.png: base vs LoRA at 0.5 and 1.0 on held-out prompts; see docs/demo-base.md).")
    prompts: list[str] = Field(default_factory=list, description="Held-out prompts for the report ({trigger} is "
                               "replaced); empty = built-in prompts for the base (on the demo base: unseen contents).")
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        [0, 1], min_length=1, max_length=64, description="Seeds: every prompt is rendered once per seed.")
    steps: int | None = Field(None, ge=1, le=1000, description="Denoising steps per report image (default: sample.steps).")
    keep_images: bool = Field(False, description="Also write every report image as RUN/report/<row>_<n>.png (rows: "
                              "base, 0.5, 1.0, ref = the base on training captions, vae = training images through the base's VAE), e.g. to "
                              "measure them yourself.")
    clip_model: str | None = Field(None, description="Local CLIP model folder (CLIPModel, safetensors): image "
                                   "features for style/copying and text-image similarity for prompt fidelity. "
                                   "Without it the report uses download-free colour and texture features.")


class OutputConfig(Section):
    dir: str = Field("outputs", description="Folder that holds run folders.")
    name: str = Field("style-lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="Run and file name.")
    plain_lora_rank: int = Field(
        0, ge=0, le=1024, description="DoRA runs: <name>.plain.safetensors, the whole weight change as a plain LoRA "
        "(truncated SVD) for A1111, kohya's merge_lora.py, diffusers' kohya loader. 0 = the rank export_max_error asks "
        "for, not written when it misses that; > 0 = this rank, always written. Never larger than the weights it changes.")
    export_max_error: float = Field(
        0.01, gt=0, lt=1, description="Files that cannot be exact and no larger than the weights they change (DoRA's "
        "plain LoRA, large LoHa/LoKr diffusers files) keep per layer the least rank with ‖ΔW − ΔW_k‖/‖ΔW‖ ≤ this.")


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    report: ReportConfig = ReportConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _check_image_sizes(self) -> "Config":
        # Samples and the report render at sample.width/height, else at data.resolution: check the size they will use
        # now, not after training (a bad size there used to cost the whole run).
        renders = self.sample.prompts or self.report.enabled
        if renders and (self.sample.width is None or self.sample.height is None) and self.data.resolution % VAE_FACTOR:
            raise ValueError(f"data.resolution ({self.data.resolution}) is also the sample and report image size, which "
                             f"must be a multiple of {VAE_FACTOR}: set sample.width and sample.height, or a resolution "
                             f"that is a multiple of {VAE_FACTOR}")
        return self

    @model_validator(mode="after")
    def _check_across_sections(self) -> "Config":
        tc, lc, dc = self.train, self.lora, self.data
        if dc.validation_split and dc.validation_path:
            raise ValueError("set data.validation_split or data.validation_path, not both")
        held_out = bool(dc.validation_split or dc.validation_path)
        for name, on in (("train.validation_every", tc.validation_every), ("train.keep_best", tc.keep_best)):
            if on and not held_out:
                raise ValueError(f"{name} needs held-out images: set data.validation_split or data.validation_path")
        if tc.optimizer != "adamw" and lc.variant == "lorafa":
            raise ValueError(f"lora.variant = lorafa has its own AdamW update; it cannot use train.optimizer = {tc.optimizer}")
        if tc.optimizer == "prodigy":
            if lc.variant == "loraplus":
                raise ValueError("train.optimizer = prodigy needs one learning rate for every parameter group; "
                                 "lora.variant = loraplus gives B its own")
            if lc.train_text_encoder and lc.train_unet and tc.lr_text_encoder != tc.lr_unet:
                raise ValueError(f"train.optimizer = prodigy needs one learning rate: set train.lr_text_encoder "
                                 f"({tc.lr_text_encoder}) = train.lr_unet ({tc.lr_unet}), usually 1.0")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=200' -> (['train', 'steps'], 200). The value is read as TOML, falling back to a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_override(data: dict, dotted: list[str], value: Any) -> None:
    node = data
    for part in dotted[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(dotted)}: {part} is not a section")
    node[dotted[-1]] = value


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def validate(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}" if where else msg)
        raise ConfigError(f"{source}: invalid settings: " + "; ".join(problems)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), extra: dict | None = None) -> Config:
    """defaults <- TOML file (a sparse preset or a saved run config) <- extra (UI edits) <- CLI overrides."""
    data = read_toml(path) if path else {}
    if extra:
        data = deep_merge(data, extra)
    user = deep_merge({}, extra or {})  # what the user chose here, over the file
    for text in overrides:
        apply_override(data, *parse_override(text))
        apply_override(user, *parse_override(text))
    chosen = user.get("train") if isinstance(user.get("train"), dict) else {}  # `train=...` itself is refused below
    if chosen.get("optimizer") == "prodigy" and not {"lr_unet", "lr_text_encoder"} & chosen.keys():
        data["train"].update(lr_unet=1.0, lr_text_encoder=1.0)  # no lr chosen: Prodigy's lr multiplies its estimate
    return validate(data, str(path) if path else "config")


def load_preset(name: str) -> Config:
    return load_config(PRESETS_DIR / f"{name}.toml")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def to_toml(cfg: Config) -> str:
    # TOML has no null: fields left at None are omitted and come back as None on load.
    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))


def save_config(cfg: Config, path: str | Path) -> None:
    from trainer.io import atomic_write_text

    atomic_write_text(Path(path), to_toml(cfg))
