"""CUDA-only checks of what never runs on the CPU machines: QLoRA (bitsandbytes 4-bit) training and the compiled
preview's adapter hot-swap. Skipped without a GPU; bench/gpu_check.sh runs them (`pytest -m gpu`) on a lent one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_preview import KW, arr, make_adapter

pytestmark = pytest.mark.gpu


def test_qlora_trains_in_4_bit_on_cuda_and_exports_both_layouts(make_cfg, tmp_path):
    """QLoRA: the UNet's linear layers are bitsandbytes 4-bit, LoRA trains on top of them, and the files load."""
    import torch
    from safetensors.torch import load_file

    from trainer.training.loop import train

    final = train(make_cfg('lora.variant="qlora"', "train.steps=4", "lora.train_text_encoder=false"), tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    assert start["variant"] == "qlora" and start["device"].startswith("cuda")
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    tensors = load_file(final)
    ups = [t for k, t in tensors.items() if "lora_B" in k]
    assert ups and any(t.abs().max() > 0 for t in ups)  # B starts at zero: it moved
    kohya = load_file(final.with_name(final.name.replace(".diffusers", "")))
    assert any(k.startswith("lora_unet_") for k in kohya)
    assert torch.cuda.max_memory_allocated() > 0


def test_compiled_preview_hot_swaps_without_recompiling(tiny_base, tmp_path):
    """torch.compile(reduce-overhead) + the hot-swap slot: swapping A -> B -> base -> A adds no graph, and each
    image equals the uncompiled multi-adapter preview's (within a few levels)."""
    from torch._dynamo.utils import counters

    from trainer.preview.previewer import Previewer

    a = make_adapter(tiny_base, tmp_path, "a", seed=1, text_encoder=False)[1]
    b = make_adapter(tiny_base, tmp_path, "b", seed=2, alpha=2.0, text_encoder=False)[1]
    compiled = Previewer(str(tiny_base), compile=True, max_rank=16, dtype="fp32")
    plain = Previewer(str(tiny_base), device="cuda", dtype="fp32")
    for pv in (compiled, plain):
        pv.load_adapter(a, "A")
        pv.load_adapter(b, "B")
    compiled.generate(**KW, seed=0, adapters={"A": 1.0})  # compiles
    compiled.generate(**KW, seed=0, adapters={"A": 1.0})  # records the CUDA graphs
    graphs = counters["stats"]["unique_graphs"]
    images = {}
    for mix in ({"B": 1.0}, {}, {"A": 1.0}, {"B": 0.5}):
        got, t = compiled.generate(**KW, seed=3, adapters=mix)
        want, _ = plain.generate(**KW, seed=3, adapters=mix)
        assert np.abs(arr(got) - arr(want)).mean() < 4, mix
        assert t["swap_ms"] < 500, t
        images[json.dumps(mix)] = arr(got)
    assert counters["stats"]["unique_graphs"] == graphs, "a swap recompiled the UNet"
    assert np.abs(images['{"B": 1.0}'] - images['{"A": 1.0}']).mean() > 1  # the swap really changed the adapter


def test_cached_frozen_parts_leave_the_gpu_and_return_for_samples(make_cfg, tmp_path, train_capturing, monkeypatch):
    """With latents and text embeddings cached (frozen TE, static captions), the VAE and text encoder wait on the CPU
    during the steps, come back for the samples, and are on the GPU again when train() returns."""
    import trainer.training.run as run_module

    moved = []
    real = run_module.offload
    monkeypatch.setattr(run_module, "offload", lambda modules, device: (moved.append(list(modules)), real(modules, device)))
    cfg = make_cfg("lora.train_text_encoder=false", "data.shuffle_captions=false", "data.caption_dropout=0.0",
                   "train.steps=4", "sample.every=2", 'sample.prompts=["zkstyle, a red circle"]', "sample.steps=2",
                   "sample.width=64", "sample.height=64")
    base, _ = train_capturing(cfg, tmp_path / "run")
    assert moved and any(base.text_encoder in m and base.vae in m for m in moved)
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) >= 2
    assert next(base.text_encoder.parameters()).device.type == "cuda"
    assert next(base.vae.parameters()).device.type == "cuda"
