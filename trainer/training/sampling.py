"""Sample images during training: fixed prompts and seeds, so grids are comparable across steps."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import Config
from trainer.preview.render import draw, sample_settings


def sample_prompts(cfg: Config) -> list[str]:
    return [p.replace("{trigger}", cfg.data.trigger).strip(" ,") for p in cfg.sample.prompts]


@torch.no_grad()
def render_samples(base, unet, text_encoders: dict, cfg: Config, step: int, out_dir: Path,
                   weight_dtype: torch.dtype) -> list[Path]:
    """Render one image per sample prompt with the adapter as it is now; returns the written PNG paths.
    `text_encoders`: {"text_encoder"(, "text_encoder_2"): module} as trained (the base's own where omitted)."""
    pipe = base.pipeline(unet, text_encoders)
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    models = [unet, *text_encoders.values()]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            for j, prompt in enumerate(sample_prompts(cfg)):
                image = draw(pipe, prompt, seed=cfg.sample.seed + j, **sample_settings(cfg))
                path = out_dir / f"step-{step:06d}-{j:02d}.png"
                image.save(path)
                paths.append(path)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    return paths
