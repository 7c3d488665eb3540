"""The one place an image is drawn with a diffusers pipeline: training samples, the style report and the preview
all call `draw`, so the same settings give the same image everywhere (the seed drives a CPU generator, as
diffusers' own examples do, so a seed means the same noise on any device)."""

from __future__ import annotations

import torch


@torch.no_grad()
def draw(pipe, prompt: str, *, negative: str = "", steps: int, guidance: float, width: int, height: int,
         seed: int):
    """One PIL image of `prompt` from `pipe` (any SD1/SD2/SDXL pipeline, adapters as they are set)."""
    return pipe(prompt, negative_prompt=negative or None, num_inference_steps=int(steps),
                guidance_scale=float(guidance), width=int(width), height=int(height),
                generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]


def sample_settings(cfg) -> dict:
    """draw()'s settings from a run config's [sample] section (size defaults to the training resolution)."""
    return {"negative": cfg.sample.negative_prompt, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
            "width": cfg.sample.width or cfg.data.resolution, "height": cfg.sample.height or cfg.data.resolution}
