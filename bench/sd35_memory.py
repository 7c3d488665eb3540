"""Peak GPU memory ESTIMATES for SD3.5 Medium / Large LoRA training at 1024 px, batch 1 (docs/benchmarks.md), until
`bash bench/gpu_check.sh --arch sd35m sd35l` measures them on a GPU.

  python bench/sd35_memory.py            # about 2 minutes on 2 CPU cores; prints a Markdown table
  python bench/sd35_memory.py --json     # the numbers behind it

Weights: parameter counts of the real architectures built on the meta device (no memory), bf16 (2 bytes each):
the MMDiT (bench/train_speed.py's sd35_mmdit), CLIP-L and OpenCLIP bigG with projections, T5-XXL's encoder, the
16-channel VAE (fp32: the trainer keeps the VAE in fp32; with cached latents it waits on the CPU during the steps).
LoRA: rank 16 on trainer.families.sd3.DEFAULT_TARGETS (peft's rule: a Linear whose name is a target or ends in
"." + target), fp32 parameters + fp32 gradients + AdamW's two fp32 states = 16 bytes per LoRA parameter.

Activations (what autograd keeps for the backward), measured, not guessed: the MMDiT at full width with LoRA attached
by peft, bf16 base weights, fp32 LoRA, under bf16 autocast (as accelerate runs the training step), one forward on
the CPU with `saved_tensors_hooks` summing the bytes of the distinct storages saved for backward (parameters
excluded). The CPU's SDPA kernel is a flash-attention kernel that saves q, k, v, out and a logsumexp, as CUDA's flash /
memory-efficient kernels do, so nothing grows with tokens². Measured at depth 2 and 3 and at 64 and 256 image tokens
(latents 16² and 32², patch 2), with the 333 text tokens of the real conditioning (77 CLIP + 256 T5), fitted as
bytes = c0 + c1·N + (L − 2)·(b0 + b1·N): depth 2 is the first block (whose inputs need no grad) and the last
(context-pre-only) one, depth 3 adds a middle block, which the full model repeats; Medium's image-only attn2 is
measured the same way in a middle block (blocks 1-12; block 0's saves nothing). Checked at 576 tokens, then
extrapolated to depth 24 / 38 and N = 4096 (1024 px: 128² latents, patch 2).
Gradient checkpointing (diffusers': every transformer block checkpointed): the saves outside the blocks (measured
with checkpointing on), plus each block's inputs held (image and text streams, bf16), plus one block recomputed.
Peak = resident weights + LoRA (16 B/param) + saved activations + one block's activations again (the backward's
working set: gradients of the block being differentiated). Not counted: CUDA context (~0.5 GiB, outside torch's
counters), allocator fragmentation, the fast path's CUDA graph pools. So these are estimates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30
RANK = 16
TEXT_TOKENS = 77 + 256  # CLIP + T5 states joined along the sequence (trainer.families.sd3.encode_text)
FULL_SIDE = 128  # latent side at 1024 px (VAE factor 8)
BLOCK_SIDES = (16, 32)  # measured latent sides (64 and 256 image tokens); 48 (576 tokens) checks linearity
CHECK_SIDE = 48


def meta_counts() -> dict:
    """Parameter counts of every part, built on the meta device."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from bench.train_speed import T5_XXL, sd35_mmdit
    from trainer.families.clip import CLIP_L, OPENCLIP_BIGG
    from trainer.families.sd3 import DEFAULT_TARGETS

    def count(module) -> int:  # parameters and float buffers (the MMDiT's sin-cos position table is one)
        return (sum(p.numel() for p in module.parameters())
                + sum(b.numel() for b in module.buffers() if b.is_floating_point()))

    clip = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        parts = {
            "text_encoder (CLIP-L)": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **clip, projection_dim=768))),
            "text_encoder_2 (bigG)": count(CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **clip,
                                                                                       hidden_act="gelu"))),
            "text_encoder_3 (T5-XXL)": count(T5EncoderModel(T5Config(**T5_XXL, is_encoder_decoder=False))),
            "vae": count(AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                                       down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                                       use_post_quant_conv=False)),
        }
        out = {}
        for arch in ("sd35m", "sd35l"):
            transformer = SD3Transformer2DModel(**sd35_mmdit(arch))
            lora = sum(RANK * (m.in_features + m.out_features) for name, m in transformer.named_modules()
                       if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in DEFAULT_TARGETS))
            modules = sum(1 for name, m in transformer.named_modules()
                          if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in DEFAULT_TARGETS))
            out[arch] = {"transformer": count(transformer), **parts, "lora": lora, "lora_modules": modules}
    return out


def lora_mmdit(arch: str, layers: int, dual: tuple):
    """A `layers`-deep, full-width MMDiT in bf16 with fp32 LoRA (peft, rank 16, the family's default targets)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging
    from peft import LoraConfig, inject_adapter_in_model

    from bench.train_speed import sd35_mmdit
    from trainer.families.sd3 import DEFAULT_TARGETS

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**{**sd35_mmdit(arch), "num_layers": layers, "dual_attention_layers": dual})
    model = model.to(torch.bfloat16).requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0,
                                               target_modules=list(DEFAULT_TARGETS)), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return model.train()


def saved_bytes(model, side: int, checkpointing: bool = False) -> int:
    """Bytes autograd saves for backward in one training forward of `model` at a `side`² latent."""
    import torch

    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    config = model.config
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    noisy = torch.randn(1, 16, side, side, dtype=torch.bfloat16)
    hidden = torch.randn(1, TEXT_TOKENS, config.joint_attention_dim, dtype=torch.bfloat16)
    pooled = torch.randn(1, config.pooled_projection_dim, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(hidden_states=noisy, timestep=torch.tensor([500.0]), encoder_hidden_states=hidden,
                    pooled_projections=pooled).sample
        loss = out.float().square().mean()
    assert loss.requires_grad
    return sum(storages.values())


def linear(points: dict) -> tuple[float, float]:
    """(a, b) of a + b·N through the two (N, bytes) points."""
    (n1, y1), (n2, y2) = sorted(points.items())
    b = (y2 - y1) / (n2 - n1)
    return y1 - b * n1, b


def fit(arch: str, log) -> dict:
    """Saved bytes at full depth and 4096 image tokens, from measurements at depth 1-2 and 64/256 tokens."""
    from bench.train_speed import sd35_mmdit

    cfg = sd35_mmdit(arch)
    depth, width = cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    dual_layers = len(cfg["dual_attention_layers"])
    tokens = {side: (side // 2) ** 2 for side in (*BLOCK_SIDES, CHECK_SIDE, FULL_SIDE)}
    m = {}
    # depth 2 = the first block (its inputs need no grad, so it saves less) + the last (context-pre-only) one;
    # depth 3 adds one middle block, which the full depth repeats; Medium's attn2 measured in a middle block (in
    # block 0 it saves nothing: its input needs no grad)
    for layers, dual in ((2, ()), (3, ()), (3, (1,))):
        if dual and not dual_layers:
            continue
        t0 = time.time()
        model = lora_mmdit(arch, layers, dual)
        for side in (*BLOCK_SIDES, CHECK_SIDE) if (layers, dual) == (3, ()) else BLOCK_SIDES:
            m[layers, dual, side, False] = saved_bytes(model, side)
        if not dual:
            for side in BLOCK_SIDES:
                m[layers, dual, side, True] = saved_bytes(model, side, checkpointing=True)
        log(f"{arch} depth {layers}{' (attn2 in block 1)' if dual else ''}: "
            + ", ".join(f"{tokens[k[2]]} tok{' ckpt' if k[3] else ''} {v / 2**20:.1f} MiB"
                        for k, v in m.items() if k[:2] == (layers, dual)) + f" ({time.time() - t0:.0f} s)")
        del model
    c0, c1 = linear({tokens[s]: m[2, (), s, False] for s in BLOCK_SIDES})  # outside + first + last block
    b0, b1 = linear({tokens[s]: m[3, (), s, False] - m[2, (), s, False] for s in BLOCK_SIDES})  # a middle block
    d0, d1 = (linear({tokens[s]: m[3, (1,), s, False] - m[3, (), s, False] for s in BLOCK_SIDES})
              if dual_layers else (0.0, 0.0))
    n3 = tokens[CHECK_SIDE]
    check, predicted = m[3, (), CHECK_SIDE, False], c0 + c1 * n3 + b0 + b1 * n3
    log(f"{arch} linearity check, depth 3, {n3} tokens: measured {check / 2**20:.1f} MiB, fit {predicted / 2**20:.1f} MiB")
    # with checkpointing: what autograd still saves outside the checkpointed blocks (and per block, if anything)
    o0, o1 = linear({tokens[s]: m[2, (), s, True] for s in BLOCK_SIDES})
    p0, p1 = linear({tokens[s]: m[3, (), s, True] - m[2, (), s, True] for s in BLOCK_SIDES})
    n = tokens[FULL_SIDE]
    per_block, per_dual = b0 + b1 * n, d0 + d1 * n
    saved = c0 + c1 * n + (depth - 2) * per_block + (dual_layers - 1) * per_dual
    block_inputs = depth * (n + TEXT_TOKENS) * width * 2  # bf16 image + text streams entering each block, held
    recompute = per_block + per_dual  # one block's saves while it is recomputed
    saved_ckpt = o0 + o1 * n + (depth - 2) * (p0 + p1 * n) + block_inputs + recompute
    return {"saved_gib": saved / GIB, "saved_ckpt_gib": saved_ckpt / GIB, "block_gib": recompute / GIB,
            "block_inputs_gib": block_inputs / GIB, "fit_check_error": round(abs(predicted - check) / check, 4),
            "tokens": n, "depth": depth, "width": width,
            "measured_mib": {f"depth{k[0]}{'+attn2' if k[1] else ''} {tokens[k[2]]}tok{' ckpt' if k[3] else ''}":
                             round(v / 2**20, 2) for k, v in m.items()}}


def table(counts: dict, acts: dict) -> str:
    rows = ["| | Medium (sd35m) | Large (sd35l) |", "| --- | --- | --- |"]

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(a) for a in ("sd35m", "sd35l")) + " |")

    def gib(params, size=2):
        return f"{params * size / GIB:.2f}"

    row("MMDiT parameters / bf16 GiB", lambda a: f"{counts[a]['transformer'] / 1e9:.3f} B / {gib(counts[a]['transformer'])}")
    for part in ("text_encoder (CLIP-L)", "text_encoder_2 (bigG)", "text_encoder_3 (T5-XXL)"):
        row(f"{part} / bf16 GiB", lambda a, p=part: f"{counts[a][p] / 1e6:.1f} M / {gib(counts[a][p])}")
    row("VAE / fp32 GiB (offloaded with cached latents)", lambda a: f"{counts[a]['vae'] / 1e6:.1f} M / {gib(counts[a]['vae'], 4)}")
    row(f"LoRA r{RANK} params ({len(__import__('trainer.families.sd3', fromlist=['x']).DEFAULT_TARGETS)} targets)",
        lambda a: f"{counts[a]['lora'] / 1e6:.2f} M in {counts[a]['lora_modules']} Linears")
    row("LoRA fp32 weights + grads / AdamW states GiB",
        lambda a: f"{gib(counts[a]['lora'], 8)} / {gib(counts[a]['lora'], 8)}")
    row("saved activations, no / with grad. checkpointing GiB",
        lambda a: f"{acts[a]['saved_gib']:.2f} / {acts[a]['saved_ckpt_gib']:.2f}")
    row("backward working set (one block) GiB", lambda a: f"{acts[a]['block_gib']:.2f}")
    for t5, ckpt in ((False, False), (False, True), (True, False), (True, True)):
        label = (f"**peak, T5 {'resident' if t5 else 'off or offloaded'}, "
                 f"{'with' if ckpt else 'no'} checkpointing** GiB")
        row(label, lambda a, t5=t5, ckpt=ckpt: f"**{peak(counts[a], acts[a], t5, ckpt):.1f}**")
    return "\n".join(rows)


def peak(c: dict, act: dict, t5: bool, ckpt: bool) -> float:
    """Transformer + both CLIPs resident (bf16), T5 if resident, LoRA 16 B/param, activations + one block."""
    weights = (c["transformer"] + c["text_encoder (CLIP-L)"] + c["text_encoder_2 (bigG)"]
               + (c["text_encoder_3 (T5-XXL)"] if t5 else 0)) * 2 / GIB
    return weights + c["lora"] * 16 / GIB + (act["saved_ckpt_gib"] if ckpt else act["saved_gib"]) + act["block_gib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    parser.add_argument("--arch", nargs="+", default=["sd35m", "sd35l"], choices=["sd35m", "sd35l"])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    counts = meta_counts()
    acts = {a: fit(a, lambda text: print(text, file=sys.stderr, flush=True)) for a in args.arch}
    for a in ("sd35m", "sd35l"):
        acts.setdefault(a, {"saved_gib": float("nan"), "saved_ckpt_gib": float("nan"), "block_gib": float("nan")})
    print(table(counts, acts))
    if args.json:
        print(json.dumps({"counts": counts, "activations": acts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
