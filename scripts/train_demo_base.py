"""Train the demo base (builtin:demo-sd): a tiny text-to-image latent diffusion model in the standard diffusers SD
layout, trained from scratch on CPU on procedural captioned shapes (trainer/report/demo_data.py) in a broad random
family of looks (trainer/report/demo_styles.py: colours, palettes, tones, textures, borders, lighting, outlines, blur,
grain), so that a LoRA can teach it a style it was not built for.

    .venv/bin/python scripts/train_demo_base.py [--out assets/demo-sd] [--vae-steps 2500] [--unet-steps 4500]

Three stages, all seeded (same machine and torch version: same weights; docs/demo-base.md has the recipe):
  1. AutoencoderKL 32x32x3 <-> 8x8x4, trained as an autoencoder (L1 + MSE + a tiny KL) on plain demo images, demo
     images in random looks, and random textures, so the codec can represent styles.
  2. Latent scale: scaling_factor = 1 / std of the latents (SD's 0.18215 is the same idea).
  3. UNet2DConditionModel + CLIPTextModel (random init, trained jointly) on the latents of half plain, half
     randomly styled demo images. Captions name the content; a styled image's caption always starts with a look
     tag ("painting, ", "drawing, ", "style, "), a plain one with "photo, ", "picture, " or nothing, so plain
     prompts draw plain images. Epsilon prediction, DDPM scaled-linear betas like SD1.5, min-SNR-5, 10% empty
     captions so classifier-free guidance works, EMA of the weights.
Writes the folder with save_pretrained (safetensors only), a demo.json recipe record and a sample grid.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.report import demo_data, demo_styles  # noqa: E402
from trainer.families.tiny import write_tiny_tokenizer  # noqa: E402

SIZE = 32  # pixels; latents are 8x8x4 (CPU budget: the whole recipe trains in about an hour on one core)
GRID_PROMPTS = [
    "a red circle on a blue background, left", "a yellow square on a purple background, right",
    "a white triangle on a green background, top", "a blue circle on a orange background, bottom",
    "a black square on a white background, center", "a green triangle on a red background, right",
    "a orange circle on a black background, top", "a purple square on a yellow background, left",
]


# Leading tags, so the base learns to find the content wherever it sits in the prompt (a LoRA's trigger word in
# front then does not confuse it), and so that plain prompts draw plain images: every styled image's caption starts
# with a look tag, a plain image's with a plain tag or nothing.
PLAIN_TAGS = ["photo", "picture", "a picture", "photo, picture"]
LOOK_TAGS = ["painting", "drawing", "style", "painting, style", "drawing, style", "a painting", "a drawing"]
STYLED_SHARE = 0.5


def tagged(caption: str, styled: bool, rng: random.Random) -> str:
    if styled:
        return f"{rng.choice(LOOK_TAGS)}, {caption}"
    return f"{rng.choice(PLAIN_TAGS)}, {caption}" if rng.random() < 0.5 else caption


def demo_image(rng: random.Random, styled: bool) -> tuple[object, tuple]:
    """A demo image of random content, in a random look when `styled`, and its content."""
    content = demo_data.random_content(rng)
    image, mask = demo_data.draw_with_mask(*content, size=SIZE, rng=rng)
    return (demo_styles.apply(image, mask, demo_styles.random_look(rng)) if styled else image), content


def autoencoder_image(rng: random.Random):
    """The VAE's training images: plain demo images, demo images in random looks, random textures with a shape."""
    roll = rng.random()
    if roll < 0.9:
        return demo_image(rng, styled=roll >= 0.35)[0]
    return demo_data.texture_with_shape(SIZE, rng)


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def warmup_cosine(opt, steps: int, warmup: int = 100):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def build_models(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return vae, unet, text_encoder


def train_vae(vae, steps: int, batch: int, seed: int) -> None:
    rng = random.Random(seed)
    pool = to_tensor([autoencoder_image(rng) for _ in range(8192)])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        x = pool[torch.randint(0, len(pool), (batch,), generator=gen)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            print(f"vae {step}/{steps} loss {loss.item():.4f} kl {kl.item():.3f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()


@torch.no_grad()
def encode_pool(vae, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    latents, captions = [], []
    for i in range(0, n, 256):
        images = []
        for _ in range(min(256, n - i)):
            styled = rng.random() < STYLED_SHARE
            image, content = demo_image(rng, styled)
            images.append(image)
            captions.append(tagged(demo_data.caption(*content), styled, rng))
        latents.append(vae.encode(to_tensor(images)).latent_dist.mean)
    return torch.cat(latents), captions


def train_unet(unet, text_encoder, tokenizer, latents, captions, steps: int, batch: int, seed: int):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000)
    ids_all = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = warmup_cosine(opt, steps)
    ema = EMAModel(unet.parameters(), decay=0.998, use_ema_warmup=True)
    ema_te = EMAModel(text_encoder.parameters(), decay=0.998, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1
        ids[drop] = empty[0]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        snr = compute_snr(noise_sched, t)
        weight = snr.clamp(max=5.0) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        ema_te.step(text_encoder.parameters())
        if step % 50 == 0 or step == 1:
            print(f"unet {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    ema.copy_to(unet.parameters())
    ema_te.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()


def sample_grid(folder: Path, out_png: Path, seeds=(0, 1)) -> None:
    """Base samples for GRID_PROMPTS (rows: seeds, then the same prompts behind "painting, " at seeds 0 and 1: the
    random looks) with the content check result of the plain rows printed per image."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows = [("", seed) for seed in seeds] + [("painting, ", seed) for seed in seeds]
    grid = Image.new("RGB", (SIZE * len(GRID_PROMPTS), SIZE * len(rows)), "white")
    passed = []
    for r, (tag, seed) in enumerate(rows):
        for c, prompt in enumerate(GRID_PROMPTS):
            image = pipe(tag + prompt, num_inference_steps=25, guidance_scale=4.0, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            if not tag:
                checks = demo_data.content_check(image, *demo_data.parse_caption(prompt))
                passed.append(sum(checks.values()) / len(checks))
                print(f"seed {seed} {prompt!r}: {checks}")
            grid.paste(image, (c * SIZE, r * SIZE))
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(out_png)
    print(f"content checks passed: {np.mean(passed):.2f}; grid: {out_png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "assets" / "demo-sd"))
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--unet-steps", type=int, default=4500)
    parser.add_argument("--pool", type=int, default=32768, help="captioned images the denoiser trains on")
    parser.add_argument("--batch", type=int, default=32)
    # One thread: on a shared 2-core machine two OpenMP threads fighting another process ran 20x slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=str(ROOT / "docs" / "screenshots" / "demo-base.png"))
    args = parser.parse_args()
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    vae, unet, text_encoder = build_models(tokenizer)
    train_vae(vae, args.vae_steps, 16, args.seed)
    vae_s = time.time() - started
    latents, captions = encode_pool(vae, args.pool, args.seed + 1)
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    train_unet(unet, text_encoder, tokenizer, latents * scale, captions, args.unet_steps, args.batch, args.seed + 2)
    total_s = time.time() - started
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    record = {
        "what": "demo base: a tiny model trained on procedural shapes by scripts/train_demo_base.py; not a real SD base",
        "resolution": SIZE, "pool": args.pool, "styled_share": STYLED_SHARE, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "batch": args.batch,
        "seed": args.seed, "threads": args.threads, "scaling_factor": scale, "parameters": params,
        "train_seconds": {"vae": round(vae_s), "total": round(total_s)}, "torch": torch.__version__,
        "vocabulary": {"colours": list(demo_data.COLOURS), "shapes": list(demo_data.SHAPES),
                       "positions": list(demo_data.POSITIONS)},
        "caption": "a {colour} {shape} on a {background} background, {position}",
        "tags": {"plain": PLAIN_TAGS, "styled (a random look)": LOOK_TAGS},
    }
    (out / "demo.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    sample_grid(out, Path(args.grid))


if __name__ == "__main__":
    main()
