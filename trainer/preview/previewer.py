"""Preview: one base pipeline kept in memory, LoRA adapters switched in milliseconds, images in a trained style.

`Previewer` holds one StableDiffusionPipeline for a base model and an LRU of loaded adapters. Two ways to switch:

- multi-adapter (default, any device): every adapter is loaded once under its own peft name; switching, mixing and
  strength are `set_adapters` (a few ms: no weights move), the base image is the LoRA disabled. Adapters beyond
  `max_adapters` are deleted least-recently-used first.
- hot-swap (`hotswap=True`; implied by `compile=True`, CUDA only): the UNet has ONE LoRA slot prepared with
  `enable_lora_hotswap(target_rank=max_rank)` before the first load (and before torch.compile). Switching copies the
  chosen adapter's UNet tensors into that slot in place, so a compiled UNet is never recompiled (trainer.preview.hotswap).
  Text-encoder parts (diffusers cannot hot-swap those) are loaded under their own names and activated with
  set_adapters on the text encoder, which is never compiled.

Adapter files: `.safetensors` only (never a pickle), kohya/A1111 or diffusers/PEFT layout. kohya files are converted
in memory by trainer.lora_files.kohya against the loaded base, so every module keeps its exact alpha (diffusers' own kohya
loader loses per-module alphas). Every key must name a Linear/Conv2d of the base with fitting shapes, else
`AdapterError` names the file and the first bad key.

Any base family (trainer.families detects which); the denoiser part is the family's (`unet`, or SD3's `transformer`),
and adapters may carry parts for each LoRA-able text encoder.
`python -m trainer preview --base MODEL` runs trainer.preview.worker.serve: a JSON-lines worker on stdin/stdout
(app/preview.py talks to it), so the web server never imports torch and a crash or OOM ends only the worker.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import families
from trainer.config import ModelConfig
from trainer.lora_files.adapter_files import AdapterError, load_part, module_table, pipe_parts, read_adapter
from trainer.preview.hotswap import HotSwapSlot
from trainer.preview.render import draw


@dataclass
class Adapter:
    name: str  # the caller's name (any string)
    peft_name: str  # the name inside peft (module-name safe)
    path: str
    stamp: tuple  # (size, mtime_ns): a changed file is loaded again
    parts: dict[str, tuple[dict, dict]] = field(default_factory=dict)  # part -> (tensors, metadata) kept on CPU
    rank: int = 0
    layout: str = ""  # "kohya" | "diffusers" | "lokr" (peft's LoKr layout, trainer.lora_files.export.lokr_layout)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Previewer:
    """One base pipeline + an LRU of adapters. See the module docstring for the two switching modes."""

    def __init__(self, base: str, *, single_file_config: str | None = None, device: str | None = None,
                 dtype: str | None = None, max_adapters: int = 8, hotswap: bool = False, compile: bool = False,
                 max_rank: int = 64, pipeline=None):
        from trainer.families.loading import load_base

        t0 = time.perf_counter()
        self.base_path = base
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if compile and self.device.type != "cuda":
            raise ValueError("preview: compile=True needs a CUDA GPU (torch.compile + hot-swap); use hotswap=True here")
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[dtype]
        if self.dtype is None:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.hotswap = hotswap or compile
        self.max_rank = max_rank
        self.max_adapters = max(1, max_adapters)
        if pipeline is None:  # `pipeline`: an already built SD/SDXL pipeline (benchmarks)
            pipeline = load_base(ModelConfig(path=base, single_file_config=single_file_config)).pipeline()
        self.pipe = pipeline
        family = families.of_pipeline(pipeline)
        self.kind = family.NAME
        self.denoiser = family.DENOISER  # "unet" or "transformer": its part name
        self.text_parts = [p for p in pipe_parts(pipeline) if p != self.denoiser]
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device, self.dtype)
        self.table = module_table(self.pipe)
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()  # name -> Adapter, least recently used first
        self.active: dict[str, float] = {}
        self.released = False
        self._counter = 0
        # hot-swap mode: the denoiser's one slot (trainer/preview/hotswap.py); None in multi-adapter mode
        self.slot = (HotSwapSlot(self.pipe, self.denoiser, max_rank, compile, self._load_unet_part)
                     if self.hotswap else None)
        self.load_ms = _ms(t0)

    # ----------------------------------------------------------------------------- adapters

    def load_adapter(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Validate and load (or refresh) an adapter file under `name` (default: the file name)."""
        t0 = time.perf_counter()
        path = Path(path)
        name = name or path.name
        if path.suffix.lower() != ".safetensors":
            raise AdapterError(f"{path.name}: only .safetensors adapters are accepted ({path.suffix or 'no suffix'} "
                               "files may be Python pickles, which can run arbitrary code when loaded)")
        try:
            st = path.stat()
        except OSError:
            raise AdapterError(f"{path.name}: no such file") from None
        stamp = (st.st_size, st.st_mtime_ns)
        old = self.adapters.get(name)
        if old is not None and old.stamp == stamp and old.path == str(path):
            self.adapters.move_to_end(name)
            return self._info(old, cached=True, ms=_ms(t0))
        parts, layout = read_adapter(path, self.pipe, self.table, allow_dora=not self.hotswap)
        if old is not None:
            self._drop(name)
        self._counter += 1
        rank = max((t.shape[0] for tensors, _ in parts.values() for k, t in tensors.items() if k.endswith("lora_A.weight")),
                   default=0)  # LoKr: no LoRA rank
        adapter = Adapter(name, f"a{self._counter}", str(path), stamp, parts, rank, layout)
        if self.hotswap and self.denoiser in parts and rank > self.max_rank:
            raise AdapterError(f"{path.name}: rank {rank} is above the hot-swap slot's max_rank {self.max_rank}")
        try:
            for part in parts:
                if part == self.denoiser and self.hotswap:
                    continue  # goes into the slot on activation
                self._load_part(adapter.peft_name, part, *parts[part])
        except Exception as err:
            self._delete_peft(adapter.peft_name)
            raise AdapterError(f"{path.name}: diffusers could not load it: {err}") from None
        self.adapters[name] = adapter
        self._evict()
        return self._info(adapter, cached=False, ms=_ms(t0))

    def _info(self, a: Adapter, cached: bool, ms: float) -> dict[str, Any]:
        return {"name": a.name, "layout": a.layout, "parts": sorted(a.parts), "rank": a.rank, "cached": cached,
                "load_ms": ms}

    def _load_unet_part(self, peft_name: str, tensors: dict, metadata: dict, hotswap: bool) -> None:
        self._load_part(peft_name, self.denoiser, tensors, metadata, hotswap)

    def _load_part(self, peft_name: str, part: str, tensors: dict, metadata: dict, hotswap: bool = False) -> None:
        load_part(self.pipe, peft_name, part, {k: v.to(self.device, self.dtype) for k, v in tensors.items()}, metadata,
                  hotswap)

    def _peft_names(self, part: str) -> set[str]:
        model = getattr(self.pipe, part)
        return set(getattr(model, "peft_config", {}) or {})

    def _delete_peft(self, peft_name: str) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        if peft_name in self._peft_names(self.denoiser):
            getattr(self.pipe, self.denoiser).delete_adapters(peft_name)
        for part in self.text_parts:
            if peft_name in self._peft_names(part):
                delete_adapter_layers(getattr(self.pipe, part), peft_name)

    def _drop(self, name: str) -> None:
        a = self.adapters.pop(name)
        self._delete_peft(a.peft_name)
        self.active.pop(name, None)
        if self.slot and self.slot.holds(name):
            self.slot.forget()

    def _evict(self) -> None:
        while len(self.adapters) > self.max_adapters:
            victim = next((n for n in self.adapters if n not in self.active), None)
            if victim is None:
                return
            self._drop(victim)

    # ----------------------------------------------------------------------------- switching

    def activate(self, adapters: dict[str, float] | None = None) -> float:
        """Make exactly `adapters` ({name: weight}) active; {} or None = the base model. Returns the swap time (ms)."""
        adapters = {n: float(w) for n, w in (adapters or {}).items()}
        missing = [n for n in adapters if n not in self.adapters]
        if missing:
            raise AdapterError(f"adapter(s) not loaded: {', '.join(missing)}")
        t0 = time.perf_counter()
        for n in adapters:
            self.adapters.move_to_end(n)
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder, enable_lora_for_text_encoder, set_adapters_for_text_encoder)

        for part in self.text_parts:
            te_names = [(self.adapters[n].peft_name, w) for n, w in adapters.items() if part in self.adapters[n].parts]
            if te_names:
                set_adapters_for_text_encoder([p for p, _ in te_names], getattr(self.pipe, part), [w for _, w in te_names])
                enable_lora_for_text_encoder(getattr(self.pipe, part))
            elif self._peft_names(part):
                disable_lora_for_text_encoder(getattr(self.pipe, part))
        part, denoiser = self.denoiser, getattr(self.pipe, self.denoiser)
        unet = [(n, w) for n, w in adapters.items() if part in self.adapters[n].parts]
        if self.slot:
            self.slot.fill([(n, *self.adapters[n].parts[part], w) for n, w in unet])
        elif unet:
            denoiser.set_adapters([self.adapters[n].peft_name for n, _ in unet], [w for _, w in unet])
            denoiser.enable_lora()
        elif self._peft_names(part):
            denoiser.disable_lora()
        self.active = adapters
        _sync(self.device)
        return _ms(t0)

    # ----------------------------------------------------------------------------- images

    def generate(self, prompt: str, negative: str = "", steps: int = 20, guidance: float = 7.5, seed: int = 0,
                 width: int = 512, height: int = 512, adapters: dict[str, float] | None = None):
        """One image with `adapters` ({name: weight}, None/{} = base). Returns (PIL image, {swap_ms, gen_ms})."""
        self._ensure_on_device()
        swap_ms = self.activate(adapters)
        t0 = time.perf_counter()
        image = draw(self.pipe, prompt, negative=negative, steps=steps, guidance=guidance, width=width, height=height,
                     seed=seed)
        _sync(self.device)
        return image, {"swap_ms": swap_ms, "gen_ms": _ms(t0)}

    def compare(self, adapters: dict[str, float], **kw):
        """(LoRA image, base image, timings): the same seed and settings with and without the adapters."""
        lora, t1 = self.generate(adapters=adapters, **kw)
        base, t2 = self.generate(adapters=None, **kw)
        return lora, base, {"swap_ms": t1["swap_ms"], "gen_ms": t1["gen_ms"], "base_swap_ms": t2["swap_ms"],
                            "base_gen_ms": t2["gen_ms"]}

    def grid(self, adapters: dict[str, float], strengths=(0.0, 0.5, 1.0), seeds=(0, 1, 2), **kw):
        """Rows = seeds, columns = strengths (each adapter's weight × strength). Returns (PIL grid, timings)."""
        from PIL import Image, ImageDraw

        cells, swap, gen = [], [], []
        for seed in seeds:
            for s in strengths:
                image, t = self.generate(adapters={n: w * s for n, w in adapters.items()}, seed=seed, **kw)
                cells.append(image)
                swap.append(t["swap_ms"])
                gen.append(t["gen_ms"])
        w, h = cells[0].size
        pad = 14
        sheet = Image.new("RGB", (w * len(strengths), pad + h * len(seeds)), "white")
        draw = ImageDraw.Draw(sheet)
        for j, s in enumerate(strengths):
            draw.text((j * w + 2, 1), f"x{s:g}", fill="black")
        for i, image in enumerate(cells):
            sheet.paste(image, ((i % len(strengths)) * w, pad + (i // len(strengths)) * h))
        return sheet, {"swap_ms": round(sum(swap) / len(swap), 2), "gen_ms": round(sum(gen) / len(gen), 2),
                       "images": len(cells), "strengths": list(strengths), "seeds": list(seeds)}

    # ----------------------------------------------------------------------------- GPU sharing

    def release(self) -> dict[str, Any]:
        """Free the accelerator for a training run: the pipeline moves to CPU memory (adapters stay loaded)."""
        if self.device.type != "cpu" and not self.released:
            self.pipe.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.released = True
        return self.state()

    def resume(self) -> dict[str, Any]:
        self._ensure_on_device()
        return self.state()

    def _ensure_on_device(self) -> None:
        if self.released:
            if self.device.type != "cpu":
                self.pipe.to(self.device)
            self.released = False

    def state(self) -> dict[str, Any]:
        return {"base": self.base_path, "kind": self.kind, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "hotswap": self.hotswap, "compiled": bool(self.slot and self.slot.compiled), "released": self.released,
                "adapters": list(self.adapters), "active": self.active, "max_adapters": self.max_adapters,
                "base_load_ms": self.load_ms}
