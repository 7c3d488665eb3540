"""The preview's hot-swap slot: ONE LoRA slot in the UNet whose weights are replaced in place, so a compiled UNet is
never recompiled (diffusers' `enable_lora_hotswap` + `load_lora_weights(..., hotswap=True)`).

Strength and mixing are folded into the tensors: a mix is the adapters' factors concatenated along the rank, each
B scaled by weight·alpha/r, zero-padded to the slot's rank; the slot's own scale is 1. The base image is the slot
with B zeroed. Text-encoder parts never go here (diffusers cannot hot-swap them): trainer.preview.previewer loads those under
their own names.
"""

from __future__ import annotations

import torch

from trainer.lora_files.adapter_files import AdapterError, lora_scales

SLOT = "hotswap_slot"


class HotSwapSlot:
    def __init__(self, pipe, part: str, max_rank: int, compile: bool, load_unet_part):
        """`part`: the denoiser's pipeline attribute and file prefix ("unet" or "transformer").
        `load_unet_part(peft_name, tensors, metadata, hotswap)`: how the preview loads denoiser tensors (its
        device and dtype). `compile`: torch.compile the denoiser once the slot exists (CUDA graphs)."""
        self.pipe, self.part, self.max_rank, self.compile = pipe, part, max_rank, compile
        self.load_unet_part = load_unet_part
        self.ready = False  # the slot exists in the UNet
        self.compiled = False
        self.key: tuple | None = None  # ((name, weight), ...) it holds now

    def holds(self, name: str) -> bool:
        return bool(self.key) and any(n == name for n, _ in self.key)

    def forget(self) -> None:
        """The next fill writes the slot even if the same names are asked for (an adapter was reloaded)."""
        self.key = None

    def fill(self, unet: list[tuple[str, dict, dict, float]]) -> None:
        """Put the weighted sum of the given UNet adapters [(name, tensors, metadata, weight)] into the slot."""
        key = tuple((name, weight) for name, _, _, weight in unet)
        if key == self.key:
            return
        if not unet or all(weight == 0 for *_, weight in unet):
            self._zero()
        else:
            state, targets = self._mix(unet)
            self._load(state, targets)
        self.key = key

    def _zero(self) -> None:
        if self.ready:  # the base: B zeroed in place (keeps the compiled graph)
            for name, p in getattr(self.pipe, self.part).named_parameters():
                if f"lora_B.{SLOT}." in name:
                    p.data.zero_()

    def _mix(self, unet: list[tuple[str, dict, dict, float]]) -> tuple[dict, list[str]]:
        pairs: dict[str, list] = {}
        for _, tensors, metadata, weight in unet:
            for module, scale in lora_scales(self.part, tensors, metadata).items():
                down = tensors[f"{self.part}.{module}.lora_A.weight"].float()
                up = tensors[f"{self.part}.{module}.lora_B.weight"].float() * (weight * scale)
                pairs.setdefault(module, []).append((down, up))
        state = {}
        for module, factors in pairs.items():
            down = torch.cat([d for d, _ in factors], 0)
            up = torch.cat([u for _, u in factors], 1)
            if down.shape[0] > self.max_rank:
                raise AdapterError(f"the mix has rank {down.shape[0]}, above the hot-swap slot's max_rank "
                                   f"{self.max_rank}; start the worker with a larger --max-rank")
            pad = self.max_rank - down.shape[0]  # zero-padded to the slot's rank: one config for every swap
            down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])], 0)
            up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], 1)
            state[f"{self.part}.{module}.lora_A.weight"], state[f"{self.part}.{module}.lora_B.weight"] = down, up
        return state, sorted(pairs)

    def _load(self, state: dict, targets: list[str]) -> None:
        r = self.max_rank
        # scale 1 everywhere (alpha = r): weights and alphas are already folded into B
        config = {"r": r, "lora_alpha": r, "target_modules": targets, "lora_dropout": 0.0, "init_lora_weights": True,
                  "bias": "none", "use_rslora": False, "use_dora": False}
        metadata = {f"{self.part}.{k}": v for k, v in config.items()}
        if not self.ready:
            self.pipe.enable_lora_hotswap(target_rank=self.max_rank)
            self.load_unet_part(SLOT, state, metadata, False)
            self.ready = True
            if self.compile and not self.compiled:
                setattr(self.pipe, self.part, torch.compile(getattr(self.pipe, self.part), mode="reduce-overhead",
                                                            fullgraph=True))
                self.compiled = True
            return
        try:
            self.load_unet_part(SLOT, state, metadata, True)
        except RuntimeError as err:  # new target layers: the slot cannot take them without a reload
            raise AdapterError(f"cannot hot-swap: {str(err)[:300]} (the first adapter loaded fixes the slot's "
                               "target layers; restart the preview worker to change them)") from None
