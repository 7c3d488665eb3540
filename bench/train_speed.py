"""Training speed of the real trainer (trainer.training.loop.train: data, text encoders, LoRA on UNet+TE, optimizer) on
random-weight SD1.5 / SDXL architectures built on the fly (no downloads): steps/s, images/s, peak memory and
achieved TFLOP/s, for each batch size, eager path vs fast path (train.fast).

  python bench/train_speed.py --arch sd15 sdxl --batch 1 4 16            # GPU, full size (512 / 1024 px)
  python bench/train_speed.py --tiny --arch sd15 sdxl --batch 1 --paths eager --warmup 1 --steps 2   # CPU smoke

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
RESOLUTION = {"sd15": 512, "sdxl": 1024}


def random_base(arch: str, tiny: bool, folder: Path, device: str | None = None):
    """A trainer.families.loading.Base with random weights: the tiny test pipelines (loaded like a user's folder), or the
    full-size SD1.5 / SDXL architectures built in memory on `device` (default: the GPU when there is one).
    bench/preview_swap.py builds its pipeline here too (`.pipeline()`)."""
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
    latent = torch.randn(1, 4, resolution // 8, resolution // 8, device=device, dtype=dtype)
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
    unet.to(dtype=torch.bfloat16).save_pretrained(folder / "unet")
    return _load_quantized_unet(family, "folder", str(folder), ModelConfig(path=str(folder)), bits)


def train_config(arch: str, batch: int, path: str, tiny: bool, warmup: int, steps: int, text_encoder: bool,
                 variant: str, folder: Path):
    from trainer.config import load_config

    resolution = 64 if tiny else RESOLUTION[arch]
    data = write_dataset(folder / "data", resolution, count=max(32, batch * 2))
    return load_config(ROOT / "presets" / "sd15-style.toml", [
        f'data.path="{data}"', f"data.resolution={resolution}", "data.bucket=false", "data.flip=false",
        "data.shuffle_captions=false", "data.caption_dropout=0.0", f"data.min_image_size={min(resolution, 64)}",
        "lora.rank=16", "lora.alpha=16.0", "lora.train_unet=true", f"lora.train_text_encoder={str(text_encoder).lower()}",
        f'lora.variant="{variant}"', f"train.batch_size={batch}", f"train.steps={warmup + steps}", "train.warmup_steps=0",
        f'train.fast="{"on" if path == "fast" else "off"}"', "train.save_every=0", "train.checkpoint_every=0",
        "sample.every=0", "sample.prompts=[]", f'output.dir="{folder / "out"}"'])


def run_one(arch: str, batch: int, path: str, tiny: bool, warmup: int, steps: int, text_encoder: bool = True,
            variant: str = "lora") -> dict:
    import gc

    import torch

    from trainer.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = train_config(arch, batch, path, tiny, warmup, steps, text_encoder, variant, tmp)
        base = random_base(arch, tiny, tmp)
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

    return (f"| {r['arch']} | {r['resolution']} | {r['batch']} | {r['path']} | {r['variant']} | {r['steps_s']} | "
            f"{r['images_s']} | {show(r['peak_mem_gib'])} | {show(r['train_peak_gib'])} | {show(r['tflop_s'])} | "
            f"{show(r['fast_path'])} | {r['device']} |")


TABLE_HEAD = ("| arch | px | batch | path | variant | steps/s | images/s | peak GiB | train peak GiB | TFLOP/s | "
              "compiled | device |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sd15"], choices=["sd15", "sdxl"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=["eager", "fast"])
    parser.add_argument("--variant", default="lora", choices=["lora", "qlora"])
    parser.add_argument("--text-encoder", default="auto", choices=["auto", "on", "off"],
                        help="train LoRA on the text encoder too (auto: SD1.5 yes, SDXL no, as the targets say)")
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
        row = run_one(arch, args.batch[0], args.paths[0], args.tiny, args.warmup, args.steps, text_encoder, args.variant)
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
                       "--text-encoder", args.text_encoder] + (["--tiny"] if args.tiny else [])
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
