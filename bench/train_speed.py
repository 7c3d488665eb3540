"""Training speed of the real trainer (trainer.training.loop.train: data, text encoders, LoRA on UNet+TE, optimizer) on
random-weight SD1.5 / SDXL / SD3.5 Medium (sd35m) / SD3.5 Large (sd35l) architectures built on the fly (no
downloads): steps/s, images/s, peak memory and achieved TFLOP/s, for each batch size, eager path vs fast path
(train.fast).

  python bench/train_speed.py --arch sd15 sdxl --batch 1 4 16            # GPU, full size (512 / 1024 px)
  python bench/train_speed.py --arch sd35m --batch 1 --t5 on --gradient-checkpointing   # GPU, SD3.5 Medium 1024 px
  python bench/train_speed.py --tiny --arch sd15 sdxl --batch 1 --paths eager --warmup 1 --steps 2   # CPU smoke

SD3.5: LoRA on the family's default targets (trainer.families.sd3.DEFAULT_TARGETS, the MMDiT's joint attention);
`--t5 off` (default: T5-XXL is 4.8B parameters) loads no T5 and conditions on zeros as model.t5 = "off" does, `--t5 on`
builds a random T5-XXL-sized encoder (frozen; its outputs are cached, so with static captions it waits on the CPU
during the steps like the other frozen encoders).

Each configuration runs in its own process (clean compile caches and peak-memory counters) and prints one JSON
line; the driver prints a Markdown table and appends the rows to --out. Timing: the wall time between the step
events of step `warmup` and the last step, so model loading, latent caching and compilation are excluded.
FLOPs per image: torch's FlopCounterMode over one eager forward+backward of the LoRA'd UNet and text encoder(s)
at batch 1 (what a training step computes; the optimizer and VAE are not counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35m": 1024, "sd35l": 1024}
ARCHES = list(RESOLUTION)
# T5 v1.1 XXL's encoder (google/t5-v1_1-xxl, the text_encoder_3 of the SD3.5 repos), 4.76B parameters.
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=32128)


def sd35_mmdit(arch: str) -> dict:
    """SD3.5 Medium's MMDiT-X (dual attention in blocks 0..12) or Large's transformer config, as the
    stabilityai/stable-diffusion-3.5-{medium,large} repos ship them."""
    from trainer.families.sd3 import REFERENCE_MMDIT

    if arch == "sd35l":
        return {**REFERENCE_MMDIT, "dual_attention_layers": ()}
    return {**REFERENCE_MMDIT, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
            "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13))}


def sd35_base(arch: str, tiny: bool, folder: Path, device: str | None = None, t5: str = "off"):
    """A random-weight SD3.5 Medium / Large Base: the tiny pipelines of trainer.families.tiny_sd3 loaded like a user's
    folder, or the full-size parts built in memory on `device` (bf16 there on CUDA, the trainer's weight dtype, so
    the fp32 copies never sit in the peak-memory counters), put together as load_base would."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from trainer import families
    from trainer.config import ModelConfig
    from trainer.families.clip import CLIP_L, OPENCLIP_BIGG
    from trainer.families.loading import Base, load_base
    from trainer.families.tiny_sd3 import (SCHEDULER_SHIFT, VAE_SCALE, VAE_SHIFT, build_t5_tokenizer,
                                           build_tiny_sd35)
    from trainer.families.tiny_xl import _tokenizer

    if tiny:
        path = build_tiny_sd35(folder / arch, medium=arch == "sd35m")
        return load_base(ModelConfig(path=str(path), t5=t5))
    family = families.get("sd3")
    tokenizer, tokenizer_3 = _tokenizer(), build_t5_tokenizer()  # small vocabularies: same compute per token
    special = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        transformer = SD3Transformer2DModel(**sd35_mmdit(arch)).to(dtype)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            shift_factor=VAE_SHIFT, scaling_factor=VAE_SCALE, use_quant_conv=False,
                            use_post_quant_conv=False)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **special, projection_dim=768)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**OPENCLIP_BIGG, **special, hidden_act="gelu")).to(dtype)
        text_encoder_3 = None
        if t5 == "on":
            text_encoder_3 = T5EncoderModel(T5Config(
                **T5_XXL, is_encoder_decoder=False, pad_token_id=tokenizer_3.pad_token_id,
                eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id)).to(dtype)
    sampler = FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT)
    noise_scheduler, prediction_type = family.training_scheduler(sampler, "auto")
    return Base(unet=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                noise_scheduler=noise_scheduler, sample_scheduler=sampler, prediction_type=prediction_type,
                family=family, source=f"random {arch}", text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3 if t5 == "on" else None)


def random_base(arch: str, tiny: bool, folder: Path, device: str | None = None, t5: str = "off"):
    """A trainer.families.loading.Base with random weights: the tiny test pipelines (loaded like a user's folder), or the
    full-size SD1.5 / SDXL / SD3.5 architectures built in memory on `device` (default: the GPU when there is one).
    bench/preview_swap.py builds its pipeline here too (`.pipeline()`). `t5`: SD3.5 only (see sd35_base)."""
    if arch.startswith("sd35"):
        return sd35_base(arch, tiny, folder, device, t5)
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.config import ModelConfig
    from trainer import families
    from trainer.families.clip import CLIP_L, OPENCLIP_BIGG
    from trainer.families.sd1 import REFERENCE_UNET as SD15_UNET
    from trainer.families.sdxl import REFERENCE_UNET as SDXL_UNET
    from trainer.families.loading import Base, load_base
    from trainer.families.tiny import build_tiny_sd15, write_tiny_tokenizer
    from trainer.families.tiny_xl import build_tiny_sdxl

    if tiny:
        build = build_tiny_sdxl if arch == "sdxl" else build_tiny_sd15
        return load_base(ModelConfig(path=str(build(folder / arch))))
    write_tiny_tokenizer(folder / "tokenizer")  # a small vocabulary: same compute per token as the real one
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    special = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=0.13025 if arch == "sdxl" else 0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **special))
        if arch == "sdxl":
            unet = UNet2DConditionModel(**SDXL_UNET)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **special, hidden_act="gelu"))
        else:
            unet, text_encoder_2 = UNet2DConditionModel(**SD15_UNET), None
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # the schedulers the real bases ship: Euler for SDXL, DDIM for SD1.5
    sampler = (EulerDiscreteScheduler(**betas, steps_offset=1) if arch == "sdxl"
               else DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False))
    return Base(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                noise_scheduler=DDPMScheduler(**betas), sample_scheduler=sampler, prediction_type="epsilon",
                family=families.get("sdxl" if arch == "sdxl" else "sd1"), source=f"random {arch}", text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer if arch == "sdxl" else None)


def write_dataset(folder: Path, resolution: int, count: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution // 8, resolution // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((resolution, resolution)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a red circle on a blue background, image {i}")
    return folder


def flops_per_image(base, resolution: int) -> float:
    """FLOPs of one forward+backward of the LoRA'd UNet and text encoder(s) for one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = next(base.unet.parameters()).device
    dtype = next(base.unet.parameters()).dtype
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)  # 8 for the real VAEs, 2 for the tiny ones
    channels = base.unet.config.in_channels  # 4, or SD3's 16
    latent = torch.randn(1, channels, resolution // factor, resolution // factor, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        hidden, pooled = base.family.encode_text(base, base.text_encoders(), ["a red circle on a blue background"],
                                                 device)
        size = ((resolution, resolution), (resolution, resolution), False)
        out = base.family.predict(base.unet, latent, torch.tensor([500], device=device), hidden, pooled, [size], dtype)
        out.float().square().mean().backward()
    return float(counter.get_total_flops())


def quantized_unet(unet, folder: Path, bits: int):
    """The random UNet saved and loaded back through the trainer's QLoRA loader (bitsandbytes nf4/int8), as a
    user's base would be."""
    import torch

    from trainer import families
    from trainer.config import ModelConfig
    from trainer.families.loading import _load_quantized_unet

    family = families.from_configs(unet.config, {"text_encoder", "text_encoder_2"})
    unet.to(dtype=torch.bfloat16).save_pretrained(folder / family.DENOISER)
    return _load_quantized_unet(family, "folder", str(folder), ModelConfig(path=str(folder)), bits)


def train_config(arch: str, batch: int, path: str, tiny: bool, warmup: int, steps: int, text_encoder: bool,
                 variant: str, folder: Path, t5: str = "off", checkpointing: bool = False):
    from trainer.config import load_config

    resolution = 64 if tiny else RESOLUTION[arch]
    data = write_dataset(folder / "data", resolution, count=max(32, batch * 2))
    return load_config(ROOT / "presets" / "sd15-style.toml", [
        f'data.path="{data}"', f"data.resolution={resolution}", "data.bucket=false", "data.flip=false",
        "data.shuffle_captions=false", "data.caption_dropout=0.0", f"data.min_image_size={min(resolution, 64)}",
        "lora.rank=16", "lora.alpha=16.0", "lora.train_unet=true", f"lora.train_text_encoder={str(text_encoder).lower()}",
        f'lora.variant="{variant}"', f"train.batch_size={batch}", f"train.steps={warmup + steps}", "train.warmup_steps=0",
        f'train.fast="{"on" if path == "fast" else "off"}"', "train.save_every=0", "train.checkpoint_every=0",
        "sample.every=0", "sample.prompts=[]", f'output.dir="{folder / "out"}"', f'model.t5="{t5}"',
        f"train.gradient_checkpointing={str(checkpointing).lower()}"])


def run_one(arch: str, batch: int, path: str, tiny: bool, warmup: int, steps: int, text_encoder: bool = True,
            variant: str = "lora", t5: str = "off", checkpointing: bool = False) -> dict:
    import gc

    import torch

    from trainer.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = train_config(arch, batch, path, tiny, warmup, steps, text_encoder, variant, tmp, t5, checkpointing)
        base = random_base(arch, tiny, tmp, t5=t5)
        if variant == "qlora":
            base.unet = quantized_unet(base.unet, tmp / "quantized", cfg.lora.qlora_bits)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        train(cfg, tmp / "out" / "run", base=base)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        events = [json.loads(line) for line in (tmp / "out" / "run" / "events.jsonl").read_text().splitlines()]
        flops = None
        if variant != "qlora":  # FlopCounterMode does not know the 4-bit kernels: the bf16 row has the count
            base.unet.train(False)
            flops = flops_per_image(base, cfg.data.resolution)
        del base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    step_events = {e["step"]: e for e in events if e["type"] == "step"}
    seconds = step_events[warmup + steps]["time"] - step_events[warmup]["time"]
    steps_s = steps / seconds
    fast_check = next((e for e in events if e["type"] == "fast_path"), {})
    return {
        "arch": arch, "size": "tiny" if tiny else "full", "resolution": cfg.data.resolution, "batch": batch,
        "path": path, "variant": variant, "text_encoder": text_encoder,
        "t5": t5 if arch.startswith("sd35") else None, "gradient_checkpointing": checkpointing,
        "steps_s": round(steps_s, 3), "images_s": round(steps_s * batch, 2),
        "peak_mem_gib": round(peak, 2) if peak is not None else None,
        "train_peak_gib": step_events[warmup + steps].get("gpu_mem_gib") and round(step_events[warmup + steps]["gpu_mem_gib"], 2),
        "fast_path": fast_check.get("enabled"), "grad_error": fast_check.get("grad_error"),
        "compile_s": fast_check.get("compile_s"), "fast_path_reason": fast_check.get("reason"),
        "tflop_per_image": float(f"{flops / 1e12:.4g}") if flops else None,
        "tflop_s": float(f"{flops * steps_s * batch / 1e12:.4g}") if flops else None,
        "precision": next(e for e in events if e["type"] == "start")["precision"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
    }


def table_row(r: dict) -> str:
    def show(value):
        return "-" if value is None else value

    arch = r["arch"] + (" +T5" if r.get("t5") == "on" else "")
    variant = r["variant"] + (" +ckpt" if r.get("gradient_checkpointing") else "")
    return (f"| {arch} | {r['resolution']} | {r['batch']} | {r['path']} | {variant} | {r['steps_s']} | "
            f"{r['images_s']} | {show(r['peak_mem_gib'])} | {show(r['train_peak_gib'])} | {show(r['tflop_s'])} | "
            f"{show(r['fast_path'])} | {r['device']} |")


TABLE_HEAD = ("| arch | px | batch | path | variant | steps/s | images/s | peak GiB | train peak GiB | TFLOP/s | "
              "compiled | device |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sd15"], choices=ARCHES)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=["eager", "fast"])
    parser.add_argument("--variant", default="lora", choices=["lora", "qlora"])
    parser.add_argument("--text-encoder", default="auto", choices=["auto", "on", "off"],
                        help="train LoRA on the text encoder too (auto: SD1.5 yes, SDXL and SD3.5 no, as the targets say)")
    parser.add_argument("--t5", default="off", choices=["on", "off"],
                        help="SD3.5: build a random T5-XXL-sized encoder (on) or none, zeros in its place (off)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing = true")
    parser.add_argument("--tiny", action="store_true", help="tiny random models at 64 px (CPU smoke test)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation happens here)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one configuration may take")
    parser.add_argument("--code", type=Path, default=None,
                        help="train with the trainer package of another checkout (e.g. the code before a change)")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON rows to this file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one config, in this process
    args = parser.parse_args()
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))
    if args.one:
        arch = args.arch[0]
        text_encoder = args.text_encoder == "on" or (args.text_encoder == "auto" and arch == "sd15")
        row = run_one(arch, args.batch[0], args.paths[0], args.tiny, args.warmup, args.steps, text_encoder, args.variant,
                      args.t5, args.gradient_checkpointing)
        row["code"] = str(args.code) if args.code else "this checkout"
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows, failures = [], 0
    print(TABLE_HEAD)
    for arch in args.arch:
        for batch in args.batch:
            for path in args.paths:
                cmd = [sys.executable, __file__, "--one", "--arch", arch, "--batch", str(batch), "--paths", path,
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--variant", args.variant,
                       "--text-encoder", args.text_encoder, "--t5", args.t5] + (["--tiny"] if args.tiny else [])
                cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                cmd += ["--code", str(args.code)] if args.code else []
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    output, code = proc.stdout, proc.returncode
                except subprocess.TimeoutExpired as err:
                    output, code = f"timed out after {args.timeout} s\n{err.stdout or ''}", 124
                line = next((text for text in output.splitlines() if text.startswith("RESULT ")), None)
                if code or line is None:
                    failures += 1
                    tail = ((proc.stderr if code != 124 else "") or output).strip().splitlines()[-3:]
                    print(f"| {arch} | | {batch} | {path} | {args.variant} | failed: {' / '.join(tail)[:400]} |",
                          flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps({"arch": arch, "batch": batch, "path": path, "variant": args.variant,
                                                "failed": " / ".join(tail)[:2000]}) + "\n")
                    continue
                r = json.loads(line.removeprefix("RESULT "))
                rows.append(r)
                print(table_row(r), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
