"""Sample images during training: fixed prompts and seeds, so grids are comparable across steps."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import Config


def sample_prompts(cfg: Config) -> list[str]:
    return [p.replace("{trigger}", cfg.data.trigger).strip(" ,") for p in cfg.sample.prompts]


@torch.no_grad()
def render_samples(base, unet, text_encoder, cfg: Config, step: int, out_dir: Path, weight_dtype: torch.dtype) -> list[Path]:
    """Render one image per sample prompt with the adapter as it is now; returns the written PNG paths."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.sample_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            for j, prompt in enumerate(sample_prompts(cfg)):
                generator = torch.Generator("cpu").manual_seed(cfg.sample.seed + j)
                image = pipe(
                    prompt,
                    negative_prompt=cfg.sample.negative_prompt or None,
                    num_inference_steps=cfg.sample.steps,
                    guidance_scale=cfg.sample.guidance,
                    width=cfg.sample.width or cfg.data.resolution,
                    height=cfg.sample.height or cfg.data.resolution,
                    generator=generator,
                ).images[0]
                path = out_dir / f"step-{step:06d}-{j:02d}.png"
                image.save(path)
                paths.append(path)
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    return paths
