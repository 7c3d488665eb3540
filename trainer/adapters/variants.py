"""The LoRA family on top of peft: adapter configs, optimizers, per-step hooks, and the plain-LoRA factors
(up, down, scale) of every variant, so each trained adapter exports as a file A1111/ComfyUI/diffusers load.

peft has LoRA, rsLoRA, DoRA, VeRA, AdaLoRA and the LoRA+ / LoRA-FA optimizers; Delta-LoRA (arXiv 2309.02411)
and LoRA-drop (arXiv 2402.07721) are written here, small, on peft's LoRA layers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from trainer.config import Config, LoraConfig

ADAPTER = "default"


# ----------------------------------------------------------------------------- attaching


def peft_config(cfg: LoraConfig, targets: list[str], total_steps: int):
    """The peft config of the variant. Delta-LoRA, LoRA-drop, LoRA+, LoRA-FA and QLoRA train plain LoRA layers."""
    from peft import AdaLoraConfig, VeraConfig
    from peft import LoraConfig as PeftLoraConfig

    if cfg.variant == "vera":
        return VeraConfig(r=cfg.vera_rank, target_modules=targets, vera_dropout=cfg.dropout,
                          d_initial=cfg.vera_d_initial, save_projection=True)
    if cfg.variant in ("loha", "lokr"):
        from trainer.adapters.lycoris import lycoris_config

        return lycoris_config(cfg, targets)
    if cfg.variant == "adalora":
        return AdaLoraConfig(init_r=cfg.adalora_init_rank, target_r=cfg.rank, lora_alpha=cfg.alpha,
                             lora_dropout=cfg.dropout, target_modules=targets, total_step=total_steps,
                             tinit=int(cfg.adalora_tinit * total_steps), tfinal=int(cfg.adalora_tfinal * total_steps),
                             deltaT=cfg.adalora_delta_t, orth_reg_weight=cfg.adalora_orth_reg)
    # init_lora_weights=True: A kaiming-uniform, B zero (what kohya does), so training starts at the base.
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                          use_dora=cfg.variant == "dora", target_modules=targets, init_lora_weights=True)


def add_adapter(module: torch.nn.Module, config) -> object | None:
    """Attach the adapter; returns the peft tuner for variants that need one each step (AdaLoRA)."""
    from peft import AdaLoraModel, VeraModel

    kind = config.peft_type.value
    if kind == "VERA":
        VeraModel(module, config, ADAPTER)  # injects layers in place and sets module.peft_config
        return None
    if kind == "ADALORA":
        return AdaLoraModel(module, config, ADAPTER)
    module.add_adapter(config)  # diffusers / transformers PEFT integration
    return None


# ----------------------------------------------------------------------------- optimizers


def _peft_view(module: torch.nn.Module):
    # peft's optimizer factories expect a PeftModel (active_adapters as a list); diffusers and transformers
    # models expose it as a method, so hand them a view with the attributes they read.
    return SimpleNamespace(active_adapters=[ADAPTER], peft_config=module.peft_config,
                           named_parameters=module.named_parameters, get_submodule=module.get_submodule)


def make_optimizer(cfg: LoraConfig, parts: list[tuple[torch.nn.Module, float]], adamw: dict, fused: bool):
    """One optimizer over the LoRA params of every (module, lr) part; LoRA+ and LoRA-FA use peft's factories."""
    from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer

    if cfg.variant == "lorafa":
        groups = []
        for module, lr in parts:  # freezes every lora_A; its step reads A to project B's gradient
            opt = create_lorafa_optimizer(_peft_view(module), r=cfg.rank, lora_alpha=cfg.alpha, lr=lr,
                                          weight_decay=adamw["weight_decay"])
            groups += [{**g, "betas": adamw["betas"]} for g in opt.param_groups]
        return type(opt)(groups)
    if cfg.variant == "loraplus":
        groups = []
        for module, lr in parts:
            opt = create_loraplus_optimizer(module, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=cfg.loraplus_ratio,
                                            loraplus_weight_decay=adamw["weight_decay"])
            groups += [g for g in opt.param_groups if g["params"]]
        return torch.optim.AdamW(groups, betas=adamw["betas"], eps=adamw["eps"], fused=fused)
    groups = [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr} for m, lr in parts]
    return torch.optim.AdamW(groups, fused=fused, **adamw)


# ----------------------------------------------------------------------------- per-step hooks


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def adalora_orth_loss(module: torch.nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser ||PᵀP − I|| + ||QQᵀ − I||, averaged (peft adds it only to HF losses)."""
    total, count = 0.0, 0
    for name, p in module.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            total = total + torch.linalg.norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype), "fro")
            count += 1
    return total / max(count, 1)


class DeltaLora:
    """Delta-LoRA: W_{t+1} = W_t + λ·s·(B_{t+1}A_{t+1} − B_tA_t) from step K on, so W_t = W_0 + λ·s·(B_tA_t − B_KA_K).

    Instead of writing W (which would lose precision in a bf16 base and need W_0 in every checkpoint), each
    layer's output gets λ·s·(B_tA_t − B_KA_K)·x with B_t, A_t detached: the same forward value and the same
    gradients as the paper's algorithm (the W update never carries gradient), the base stays bit-identical.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], lam: float, start: int):
        self.lam, self.start = lam, start
        self.layers = {f"{p}.{n}": layer for p, m in modules.items() for n, layer in lora_layers(m).items()}
        self.snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in self.layers.items():
            layer.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(layer, args, output):
            if name not in self.snapshot or self.lam == 0:
                return output
            a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
            a0, b0 = (t.to(a) for t in self.snapshot[name])
            x = args[0].to(a.dtype)
            delta = (x @ a.T) @ b.T - (x @ a0.T) @ b0.T
            return output + (self.lam * layer.scaling[ADAPTER] * delta).to(output.dtype)
        return hook

    def begin_step(self, step: int) -> None:
        """Take the B_K, A_K snapshot when step K is reached (step counts completed optimizer steps)."""
        if step >= self.start and not self.snapshot:
            for name, layer in self.layers.items():
                self.snapshot[name] = (layer.lora_A[ADAPTER].weight.detach().clone(),
                                       layer.lora_B[ADAPTER].weight.detach().clone())

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a0, b0) in self.snapshot.items():
            out[f"deltalora.{name}.A"], out[f"deltalora.{name}.B"] = a0, b0
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            if f"deltalora.{name}.A" in tensors:
                w = layer.lora_A[ADAPTER].weight
                self.snapshot[name] = (tensors[f"deltalora.{name}.A"].to(w), tensors[f"deltalora.{name}.B"].to(w))


def needs_conversion(cfg: LoraConfig) -> bool:
    """Variants whose peft state dict is not a plain LoRA diffusers can load as it is."""
    return cfg.variant in ("vera", "adalora", "loha", "lokr") or (cfg.variant == "deltalora" and cfg.deltalora_lambda > 0)


def select_important(importance: dict[str, float], threshold: float) -> list[str]:
    """LoRA-drop: layers sorted by importance, kept until their cumulative share reaches `threshold`."""
    total = sum(importance.values()) or 1.0
    kept, share = [], 0.0
    for name, value in sorted(importance.items(), key=lambda kv: -kv[1]):
        if share >= threshold:
            break
        kept.append(name)
        share += value / total
    return kept


def probe_steps(cfg: LoraConfig, total_steps: int) -> int:
    n = cfg.loradrop_probe_steps
    return max(1, int(n) if n >= 1 else math.ceil(n * total_steps))


# ----------------------------------------------------------------------------- AdaLoRA resume state


def adalora_state(tuners: dict[str, object]) -> dict[str, torch.Tensor]:
    """The rank allocator's running sensitivity averages and the current rank masks, as tensors."""
    out = {}
    for part, tuner in tuners.items():
        alloc = tuner.rankallocator
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            for name, t in getattr(alloc, kind).items():
                out[f"adalora.{part}.{kind}.{name}"] = t
        for name, mask in (tuner.peft_config[ADAPTER].rank_pattern or {}).items():
            out[f"adalora.{part}.rank_pattern.{name}"] = torch.tensor(mask, dtype=torch.uint8)
    return out


def load_adalora_state(tuners: dict[str, object], tensors: dict[str, torch.Tensor]) -> None:
    for part, tuner in tuners.items():
        alloc, pattern = tuner.rankallocator, {}
        for key, t in tensors.items():
            if not key.startswith(f"adalora.{part}."):
                continue
            kind, name = key.removeprefix(f"adalora.{part}.").split(".", 1)
            if kind == "rank_pattern":
                pattern[name] = [bool(v) for v in t.tolist()]
            else:
                device = tuner.model.get_parameter(name).device
                getattr(alloc, kind)[name] = t.to(device)
        if pattern:
            tuner.peft_config[ADAPTER].rank_pattern = pattern


# ----------------------------------------------------------------------------- LoRA-drop importance


@torch.no_grad()
def measure_layer_importance(modules: dict[str, torch.nn.Module], batch_loss, first_k: int, batches: int) -> dict[str, float]:
    """Σ over `batches` micro-batches of ||s·B·A·x||² per LoRA layer (LoRA-drop's importance), via forward hooks."""
    totals: dict[str, float] = {}
    handles = []
    for prefix, module in modules.items():
        module = getattr(module, "module", module)  # DDP
        for name, layer in lora_layers(module).items():
            key = f"{prefix}.{name}"
            totals[key] = 0.0

            def hook(_, __, out, key=key, scale=float(layer.scaling[ADAPTER])):
                totals[key] += float((scale * out.detach().float()).pow(2).sum())

            handles.append(layer.lora_B[ADAPTER].register_forward_hook(hook))
    try:
        for i in range(batches):
            batch_loss(first_k + i)
    finally:
        for h in handles:
            h.remove()
    return totals


def run_loradrop(cfg: Config, run_dir: Path, train: Callable, probe: Callable) -> Path:
    """LoRA-drop: a short probe run (`probe(cfg, folder) -> {layer: importance}`) scores every layer by its adapter
    output ||s·BAx||², then the real run (`train(cfg, run_dir, lora)`) trains LoRA only on the layers that carry
    `loradrop_threshold` of the total importance. The selection is kept in RUN/loradrop.json, so a resumed run
    trains the same layers without probing again."""
    from trainer.io import atomic_write_text

    selection = Path(run_dir) / "loradrop.json"
    if not selection.is_file():
        probe_cfg = cfg.model_copy(deep=True)
        probe_cfg.lora.variant = "lora"
        probe_cfg.train.steps = probe_steps(cfg.lora, cfg.train.steps)
        probe_cfg.train.epochs = probe_cfg.train.checkpoint_every = probe_cfg.train.save_every = 0
        probe_cfg.train.resume = None
        probe_cfg.sample.prompts = []
        importance = probe(probe_cfg, Path(run_dir) / "loradrop-probe")
        kept = select_important(importance, cfg.lora.loradrop_threshold)
        atomic_write_text(selection, json.dumps({"importance": importance, "kept": kept}, indent=1))
    kept = json.loads(selection.read_text())["kept"]
    # kept names are "<part>.<module>"; the denoiser is the part that is not a text encoder
    unet_kept = [k.split(".", 1)[1] for k in kept if not k.startswith("text_encoder")]
    # SDXL: one target list serves both text encoders, so it keeps what either of them needs
    te_kept = sorted({k.split(".", 1)[1] for k in kept if k.startswith("text_encoder")})
    lora = cfg.lora.model_copy(update={"unet_targets": unet_kept, "text_encoder_targets": te_kept,
                                       "train_unet": bool(unet_kept), "train_text_encoder": bool(te_kept)})
    return train(cfg, Path(run_dir), lora)
