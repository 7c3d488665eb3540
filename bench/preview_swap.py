"""Adapter swap time of the preview worker (trainer/preview/previewer.py), with and without torch.compile + hot-swap.

    python bench/preview_swap.py            # full-size random SD1.5 architecture (CUDA for the compiled case)
    python bench/preview_swap.py --tiny     # the tiny test base: proves the script works on a CPU in ~1 min

Builds the model in-process (random weights, no download: speed does not depend on weight values), writes two random
rank-16 UNet adapters (to_q/to_k/to_v/to_out.0, the trainer's targets) and measures, per mode:
  swap_ms  switching A -> B (median of N; multi-adapter = set_adapters, hot-swap = in-place copy into the slot)
  gen_ms   one image after the swap (steps/size below), and for compile whether the swap recompiled anything.
Prints one JSON line per mode and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sd15_pipeline(folder: Path):
    """A full-size SD1.5 pipeline (UNet 860M, CLIP-L, SD VAE) with random weights, built in memory on the CPU."""
    from bench.train_speed import random_base

    return random_base("sd15", tiny=False, folder=folder, device="cpu").pipeline()


def random_adapter(unet, path: Path, rank: int, seed: int) -> Path:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors, targets = {}, []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS) and "lora_" not in name:
            targets.append(name)
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.01
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.01
    meta = {"unet.r": rank, "unet.lora_alpha": rank, "unet.target_modules": sorted(targets)}
    save_file(tensors, path, metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(meta)})
    return path


def measure(mode: str, make_pipe, files, kw: dict, repeats: int) -> dict:
    from trainer.preview.previewer import Previewer

    t0 = time.perf_counter()
    pv = Previewer("bench", pipeline=make_pipe(), hotswap=mode != "multi", compile=mode == "compile", max_rank=16)
    setup_s = time.perf_counter() - t0
    pv.load_adapter(files[0], "A")
    pv.load_adapter(files[1], "B")
    t0 = time.perf_counter()
    pv.generate(adapters={"A": 1.0}, **kw)  # warm-up (and compilation when compiled)
    first_s = time.perf_counter() - t0
    pv.generate(adapters={"A": 1.0}, **kw)
    if mode == "compile":
        from torch._dynamo.utils import counters

        frames_before = counters["stats"]["unique_graphs"]
    swaps, gens = [], []
    for i in range(repeats):
        name = "B" if i % 2 == 0 else "A"
        swaps.append(pv.activate({name: 1.0}))
        _, t = pv.generate(adapters={name: 1.0}, **kw)
        gens.append(t["gen_ms"])
    base_swap = pv.activate({})
    row = {"mode": mode, "device": str(pv.device), "dtype": str(pv.dtype).removeprefix("torch."),
           "swap_ms_median": round(statistics.median(swaps), 2), "swap_ms_max": round(max(swaps), 2),
           "to_base_ms": base_swap, "gen_ms_median": round(statistics.median(gens), 1),
           "first_gen_s": round(first_s, 2), "setup_s": round(setup_s, 2)}
    if mode == "compile":
        row["graphs_added_by_swaps"] = counters["stats"]["unique_graphs"] - frames_before
    del pv
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test base (CPU-friendly smoke run)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--modes", default=None, help="comma list of multi,hotswap,compile (compile needs CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON rows to this file")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    modes = (args.modes or ("multi,hotswap,compile" if cuda else "multi,hotswap")).split(",")
    size = args.size or (64 if args.tiny else 512)
    steps = args.steps or (2 if args.tiny else 20)
    kw = dict(prompt="zkstyle, a lighthouse", steps=steps, guidance=7.0, seed=0, width=size, height=size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tiny:
            from diffusers import StableDiffusionPipeline

            from trainer.families.tiny import build_tiny_sd15

            folder = build_tiny_sd15(tmp / "tiny")

            def make_pipe():
                return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        else:
            def make_pipe():
                torch.manual_seed(0)
                return sd15_pipeline(tmp / "tok")
        unet = make_pipe().unet
        files = [random_adapter(unet, tmp / f"{n}.safetensors", args.rank, seed) for n, seed in (("a", 1), ("b", 2))]
        del unet
        rows = []
        for mode in modes:
            row = measure(mode, make_pipe, files, kw, args.repeats)
            row.update(size=size, steps=steps, rank=args.rank, arch="tiny" if args.tiny else "sd15",
                       device_name=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    arch = "tiny SD1.5-layout" if args.tiny else "SD1.5 (random weights)"
    print(f"\n{arch}, rank {args.rank}, {size}px, {steps} steps, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}\n")
    print("| mode | swap A↔B (median / max ms) | to base (ms) | image (median ms) | first image (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        extra = f" ({r['graphs_added_by_swaps']} graphs added by swaps)" if "graphs_added_by_swaps" in r else ""
        print(f"| {r['mode']} | {r['swap_ms_median']} / {r['swap_ms_max']} | {r['to_base_ms']} | {r['gen_ms_median']} | "
              f"{r['first_gen_s']}{extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
