"""Size, write time and measured error of the exports that can outgrow their base (issue 30, major 6), on the
full-size SD1.5 UNet (trainer.families.sd1.REFERENCE_UNET) with RANDOM weights, on the CPU.

Each case attaches the variant as training does, moves every adapter parameter off its init (normal noise: a
LoKr's lokr_w1 starts at zero, DoRA's lora_B too; DoRA's magnitudes ±1 % off the row norms), writes the run's files
with the trainer's own functions and reads their headers back. Random factors have flat spectra, the hardest case
for truncation; a trained adapter's change is usually more compact. The text encoder is left out (UNet only).

    python scripts/export_sizes.py [--cases lokr,lokr-conv,loha,dora] [--out docs/export-sizes.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {  # id: (variant, rank, conv_rank)
    "lokr": ("lokr", 16, 0),
    "lokr-conv": ("lokr", 16, 16),
    "loha": ("loha", 16, 0),
    "dora": ("dora", 16, 0),
}


def adapted_unet(variant: str, rank: int, conv_rank: int):
    """The full-size SD1.5 UNet (random weights) with the variant attached as the trainer does, parameters moved."""
    from diffusers import UNet2DConditionModel

    from trainer.adapters.lycoris import add_locon
    from trainer.adapters.attach import denoiser_targets
    from trainer.adapters.variants import add_adapter, lora_layers, peft_config
    from trainer.families import sd1
    from trainer.config import LoraConfig
    from trainer.families.sd1 import REFERENCE_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**REFERENCE_UNET).requires_grad_(False)
    cfg = LoraConfig(variant=variant, rank=rank, alpha=float(rank), conv_rank=conv_rank, conv_alpha=float(conv_rank or 1))
    config = peft_config(cfg, denoiser_targets(cfg, sd1), 1000)
    if conv_rank:
        config = add_locon(config, unet, cfg)
    add_adapter(unet, config)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            for name, param in layer.named_parameters():
                if "magnitude" in name:
                    param.mul_(1 + 0.01 * torch.randn_like(param))
                elif param.requires_grad:
                    param.normal_(0, 0.02)
    return cfg, unet


def changed_weight_bytes(unet) -> int:
    from trainer.adapters.variants import lora_layers

    return sum(layer.get_base_layer().weight.numel() * 4 for layer in lora_layers(unet).values())


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def measure(case: str, folder: Path) -> list[dict]:
    from safetensors import safe_open

    from trainer.lora_files.export import COMPACT_KEY, LOKR_LAYOUT_KEY, save_diffusers_lora, save_plain_lora
    from trainer.lora_files.kohya import save_kohya_lora
    from trainer.lora_files.lycoris import save_lycoris_kohya

    variant, rank, conv_rank = CASES[case]
    cfg, unet = adapted_unet(variant, rank, conv_rank)
    modules, weights = {"unet": unet}, changed_weight_bytes(unet)
    rows = []
    if variant in ("loha", "lokr"):
        kohya, t = timed(save_lycoris_kohya, folder / f"{case}.safetensors", modules, {}, cfg, "sd1")
        rows.append(dict(file=kohya.name, seconds=t, error="exact (LyCORIS keys)"))
        path, t = timed(save_diffusers_lora, folder / f"{case}.diffusers.safetensors", modules, {}, convert=True)
        key = COMPACT_KEY
    else:
        kohya, t = timed(save_kohya_lora, folder / f"{case}.safetensors", modules, {}, kind="sd1")
        rows.append(dict(file=kohya.name, seconds=t, error="exact in ComfyUI/Forge (dora_scale)"))
        (path, _), t = timed(save_plain_lora, folder / f"{case}.plain.safetensors", modules, {}, 0, "sd1")
        from trainer.lora_files.dora import PLAIN_KEY as key
        for fixed in (rank, 4 * rank):  # what a fixed rank would give (output.plain_lora_rank)
            (p, report), tf = timed(save_plain_lora, folder / f"{case}-r{fixed}.plain.safetensors", modules, {}, fixed,
                                    "sd1")
            rows.append(dict(file=p.name, seconds=tf, report=report))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    row = dict(file=path.name, seconds=t, report=json.loads(meta[key]) if key in meta else None)
    if LOKR_LAYOUT_KEY in meta:  # no plain LoRA came near: peft's own LoKr layout, exact
        plain = json.loads(meta[LOKR_LAYOUT_KEY]).get("plain_lora")
        row["error"] = "exact, peft's LoKr layout" + (f" (the plain LoRA: {describe({'report': plain})})" if plain else "")
    rows.insert(1, row)
    for row in rows:
        row.update(case=f"{variant} r{rank}" + (f", conv r{conv_rank}" if conv_rank else ""),
                   bytes=(folder / row["file"]).stat().st_size, weight_bytes=weights)
    return rows


def describe(row: dict) -> str:
    report = row.get("report")
    if report is None:
        return row.get("error", "exact")
    errors = ", ".join(f"{p} {e:.2%}" for p, e in report["rel_error"].items())
    kept = "exact" if report["exact"] else f"{errors}, worst layer {report['max_layer_rel_error']:.1%}"
    rank = f"rank {report['rank']}: " if "rank" in report else ""
    near = "meets" if all(e <= report["max_error"] for e in report["rel_error"].values()) else "misses"
    return f"{rank}{kept} ({near} the {report['max_error']:.0%} target)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, random weights, UNet only", "",
             "| run | file | size | base weights it changes (fp32) | write time | error of ΔW |",
             "| --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            for row in measure(case, Path(tmp)):
                line = (f"| {row['case']} | `{row['file']}` | {row['bytes'] / 1e6:.1f} MB | "
                        f"{row['weight_bytes'] / 1e6:.0f} MB | {row['seconds']:.1f} s | {describe(row)} |")
                print(line, flush=True)
                lines.append(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
