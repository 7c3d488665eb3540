"""Time the LoRA toolbox on a full-size LoRA: random rank-R factors on every attention Linear of a family's real
denoiser and text encoders (shapes from the family's reference models on the meta device), written as a kohya file,
then `lora info`, `resize` (fixed and dynamic) and `merge` (exact and SVD) on it. CPU; prints one line per command.

  python scripts/lora_tools_sizes.py --family sdxl --rank 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from trainer import families
from trainer.lora_tools.deltas import Delta, module_shapes
from trainer.lora_tools.write import write_lora

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def random_lora(family: str, rank: int) -> dict[str, Delta]:
    shapes = module_shapes(families.get(family).reference_models())
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(TARGETS) and len(shape) == 2:
            out[key] = Delta(shape, torch.randn(rank, shape[1], generator=g) * 0.01,
                             torch.randn(shape[0], rank, generator=g) * 0.01, 0.5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sdxl", choices=families.NAMES)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    from trainer.lora_tools.info import describe_file
    from trainer.lora_tools.merge import merge_files
    from trainer.lora_tools.resize import resize_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deltas = random_lora(args.family, args.rank)
        src = write_lora(tmp / "full.safetensors", deltas, args.family, "kohya", {})
        print(f"{args.family}: {len(deltas)} modules at rank {args.rank}, {src.stat().st_size / 2**20:.1f} MB")
        steps = [("info", lambda: describe_file(src)),
                 ("resize --rank 8", lambda: resize_file(src, tmp / "r8.safetensors", rank=8)),
                 ("resize --dynamic sv_fro 0.9", lambda: resize_file(src, tmp / "d.safetensors", dynamic="sv_fro",
                                                                      param=0.9, rank=args.rank)),
                 ("merge A:0.5 A:0.5 (exact)", lambda: merge_files([(src, 0.5), (src, 0.5)], tmp / "m.safetensors")),
                 ("merge A:0.7 B:0.3 --rank 16", lambda: merge_files([(src, 0.7), (tmp / "r8.safetensors", 0.3)],
                                                                      tmp / "m16.safetensors", rank=16))]
        for name, step in steps:
            start = time.perf_counter()
            result = step()
            extra = f", error {result['error']:.3e}" if "error" in result else ""
            print(f"  {name}: {time.perf_counter() - start:.1f} s{extra}")


if __name__ == "__main__":
    main()
