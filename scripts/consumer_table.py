"""Which tool applies which of this project's files exactly: the variant × consumer table in docs/consumers.md.

    .venv/bin/python scripts/consumer_table.py [--steps 6] [--variants lora,dora,...] [--out docs/consumers.md]

Each variant trains a short real run (trainer.training.loop.train) on the tiny SD1.5 base, plus a plain LoRA on the tiny SDXL
base with the second encoder's text_projection targeted. The reference is the trained model itself (peft's layers,
DoRA included). Each consumer's formula, as read in its source, is applied to the run's kohya file on the base
weights; diffusers is run for real (`load_lora_weights`) on both files. A cell is the largest relative error of a
layer's ΔW = W' − W, ‖ΔW_consumer − ΔW_peft‖ / ‖ΔW_peft‖, UNet / text encoder(s). Everything is evaluated in float64
so the numbers show what the file format loses, not fp32 rounding (ComfyUI's eps is the fp32 one it patches with on
a CPU; on GPUs it patches in fp16, which adds about 1e-3 of rounding to every LoRA alike).

Formulas (file: up [out, r(, 1, 1)], down [r, in(, kh, kw)], alpha, dora_scale s):
- ComfyUI / Forge (comfy/weight_adapter/lora.py, base.py `weight_decompose`): ΔW = up·down·alpha/r; with an
  output-axis s [out, 1]: W' = (W + ΔW)·s/(‖W‖_row + eps).
- A1111 1.10 (extensions-builtin/Lora/network.py `finalize_updown`, `apply_weight_decompose`): ΔW = up·down·alpha/r;
  with s: W' = (W + ΔW)·s/‖W + ΔW‖_col (input axis; an [out, 1] scale broadcasts to [out, in], silently).
- kohya sd-scripts `networks/merge_lora.py` (`merge_to_sd_model`): W + up·down·alpha/dim on modules inside its LoRA
  target classes (attention/transformer/resnet/up-downsamplers, CLIPAttention/CLIPMLP); dora_scale ignored.
- diffusers 0.42: `pipe.load_lora_weights(file)`, the kohya file through its own kohya converter.
- LyCORIS keys (LoHa `hada_w1_a`…, LoKr `lokr_w1`/`lokr_w2`…): ComfyUI (comfy/weight_adapter/loha.py, lokr.py) and A1111
  (network_hada.py, network_lokr.py): LoHa ΔW = (w1_a·w1_b)∘(w2_a·w2_b)·alpha/r, r = rows of hada_w1_b; LoKr ΔW =
  kron(w1, w2)·alpha/r with r the rank of a decomposed factor, 1.0 when both are full. kohya's merge_lora.py reads
  only lora_down/lora_up keys.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMMON = ["train.checkpoint_every=0", "train.save_every=0", "sample.prompts=[]", "sample.every=0", "lora.dropout=0.0",
          "report.enabled=false", "train.lr_unet=5e-3", "train.lr_text_encoder=5e-3", "data.caption_dropout=0.0"]
RUNS = {  # row: (base, variant, extra settings)
    "lora (r8, α4)": ("sd1", "lora", ["lora.rank=8", "lora.alpha=4.0"]),
    "dora (r8, α4)": ("sd1", "dora", ["lora.rank=8", "lora.alpha=4.0", "output.plain_lora_rank=16"]),
    "dora, conv layers too": ("sd1", "dora", ['lora.unet_targets=["to_q", "to_v", "proj_in", "conv1", "conv2"]',
                                              "output.plain_lora_rank=8"]),
    "loraplus": ("sd1", "loraplus", []),
    "lorafa": ("sd1", "lorafa", []),
    "vera": ("sd1", "vera", ["lora.vera_rank=16"]),
    "adalora (ranks differ per layer)": ("sd1", "adalora", [
        "lora.rank=2", "lora.adalora_init_rank=6", "lora.adalora_tinit=0.2", "lora.adalora_tfinal=0.2",
        "lora.adalora_delta_t=1"]),
    "loradrop": ("sd1", "loradrop", ["lora.loradrop_probe_steps=2", "lora.loradrop_threshold=0.6"]),
    "deltalora": ("sd1", "deltalora", ["lora.deltalora_start=2"]),
    "loha (r4, α2)": ("sd1", "loha", ["lora.rank=4", "lora.alpha=2.0"]),
    "lokr (r4, α2)": ("sd1", "lokr", ["lora.rank=4", "lora.alpha=2.0"]),
    "locon: lora + resnet convs (conv r4, α2)": ("sd1", "lora", ["lora.conv_rank=4", "lora.conv_alpha=2.0"]),
    "loha + locon (conv r4, α2)": ("sd1", "loha", ["lora.rank=4", "lora.conv_rank=4", "lora.conv_alpha=2.0"]),
    "lokr + locon (conv r4, α2)": ("sd1", "lokr", ["lora.rank=4", "lora.conv_rank=4", "lora.conv_alpha=2.0"]),
    "SDXL lora, te2 text_projection too": ("sdxl", "lora", [
        'lora.text_encoder_targets=["q_proj", "k_proj", "v_proj", "out_proj", "text_projection"]']),
}
CONSUMERS = ["A1111 1.10", "ComfyUI / Forge", "kohya merge_lora.py", "diffusers, kohya file", "diffusers, .diffusers file"]
COMFY_EPS = torch.finfo(torch.float32).eps
KOHYA_TARGETS = ("attentions", "resnets", "downsamplers", "upsamplers", "self_attn", "mlp")  # inside its classes


def file_delta(weight: torch.Tensor, g: dict) -> torch.Tensor:
    up, down = g["lora_up.weight"].double(), g["lora_down.weight"].double()
    alpha = float(g["alpha"]) / down.shape[0] if "alpha" in g else 1.0
    return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha


def lycoris_delta(weight: torch.Tensor, g: dict) -> torch.Tensor:
    """ΔW of LyCORIS keys as ComfyUI and A1111 compute it (the same formula in both, see the docstring)."""
    g = {k: v.double() for k, v in g.items()}
    if "hada_w1_a" in g:
        diff = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
        return diff.reshape(weight.shape) * (float(g["alpha"]) / g["hada_w1_b"].shape[0] if "alpha" in g else 1.0)
    dim, w1, w2 = None, g.get("lokr_w1"), g.get("lokr_w2")
    if w1 is None:
        dim, w1 = g["lokr_w1_b"].shape[0], g["lokr_w1_a"] @ g["lokr_w1_b"]
    if w2 is None:
        dim, w2 = g["lokr_w2_b"].shape[0], g["lokr_w2_a"] @ g["lokr_w2_b"]
    w1 = w1[:, :, None, None] if w2.dim() == 4 else w1
    scale = float(g["alpha"]) / dim if "alpha" in g and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(weight.shape) * scale


def is_lycoris(g: dict) -> bool:
    return any(k.startswith(("hada_", "lokr_")) for k in g)


def column_norm(w: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a Linear/Conv2d weight (over outputs and kernel), shaped [1, in, 1, 1...]."""
    per_column = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    return per_column.reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)


def comfyui(weight: torch.Tensor, g: dict, module: str) -> torch.Tensor:
    if is_lycoris(g):
        return weight + lycoris_delta(weight, g)
    delta = file_delta(weight, g)
    if "dora_scale" not in g:
        return weight + delta
    s = g["dora_scale"].double()
    combined = weight + delta
    if s.shape[0] == weight.shape[0]:  # output axis: the ORIGINAL weight's row norm
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = column_norm(combined)
    return combined * (s / (norm + COMFY_EPS))


def a1111(weight: torch.Tensor, g: dict, module: str) -> torch.Tensor:
    if is_lycoris(g):
        return weight + lycoris_delta(weight, g)
    delta = file_delta(weight, g)
    if "dora_scale" not in g:
        return weight + delta
    combined = weight + delta  # input axis only: column norms, whatever the scale's shape
    norm = column_norm(combined)
    merged = combined * (g["dora_scale"].double() / norm)  # [out, 1] / [1, in]: broadcasts, no error
    return merged if merged.shape == weight.shape else weight + float("nan")


def kohya_merge(weight: torch.Tensor, g: dict, module: str) -> torch.Tensor:
    if not any(part in module.split(".") for part in KOHYA_TARGETS) or is_lycoris(g):
        return weight  # "no module found for LoRA weight"; LyCORIS keys: it reads lora_down/lora_up keys only
    return weight + file_delta(weight, g)


@torch.no_grad()
def effective_weights(models: dict, adapter: str) -> dict[str, torch.Tensor]:
    """{part.module: W'} of every layer holding `adapter`, in float64: Linear layers through their forward (so
    Delta-LoRA's frozen-weight drift counts), Conv2d layers merged."""
    from trainer.adapters.variants import lora_layers

    out = {}
    for part, model in models.items():
        model.eval()
        for name, layer in lora_layers(model).items():
            if adapter not in {*getattr(layer, "lora_A", {}), *getattr(layer, "vera_lambda_b", {}),
                               *getattr(layer, "hada_w1_a", {}), *getattr(layer, "lokr_w2", {}),
                               *getattr(layer, "lokr_w2_a", {})}:
                continue
            layer = copy.deepcopy(layer).double()
            base = layer.get_base_layer()
            key = f"{part}.{name.removeprefix('text_model.')}"
            if isinstance(base, torch.nn.Linear):
                eye = torch.eye(base.in_features, dtype=torch.float64)
                out[key] = base.weight.detach() + (layer(eye) - base(eye)).T
            else:
                layer.merge(adapter_names=[adapter])
                out[key] = layer.get_base_layer().weight.detach()
    return out


def relative(got: torch.Tensor, want: torch.Tensor, weight: torch.Tensor) -> float:
    return float((got - want).norm() / (want - weight).norm().clamp_min(1e-30))


def measure(base_dir: Path, kind: str, live: dict, files: dict[str, Path]) -> dict[str, dict[str, float]]:
    """{consumer: {part: max relative ΔW error}} of one run's files against `live` ({part.module: peft's W'})."""
    from safetensors.torch import load_file

    from trainer.lora_files.kohya_names import module_names
    from trainer.families.loading import load_base
    from trainer.config import ModelConfig

    base = load_base(ModelConfig(path=str(base_dir)))
    parts = {"unet": base.unet, **base.text_encoders()}
    weights = {f"{p}.{n.removeprefix('text_model.')}": m.weight.detach().double()
               for p, model in parts.items() for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    table = module_names(parts, kind)
    groups: dict[str, dict] = {}
    for key, tensor in load_file(files["kohya"]).items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor
    result: dict[str, dict[str, float]] = {}

    def record(consumer: str, module: str, err: float) -> None:
        part = module.split(".")[0].replace("text_encoder_2", "text_encoder")
        cell = result.setdefault(consumer, {})
        cell[part] = max(cell.get(part, 0.0), err)

    for name, g in groups.items():
        part, module = table[name]
        full = f"{part}.{module}"
        w = weights[full]
        for consumer, fn in (("A1111 1.10", a1111), ("ComfyUI / Forge", comfyui), ("kohya merge_lora.py", kohya_merge)):
            record(consumer, full, relative(fn(w, g, module), live[full], w))
    for consumer, path in (("diffusers, kohya file", files["kohya"]), ("diffusers, .diffusers file", files.get("diffusers"))):
        if path is None:
            continue
        pipe = base.pipeline()
        try:
            pipe.load_lora_weights(str(path), adapter_name="consumer")
        except Exception as err:  # noqa: BLE001 - a consumer refusing the file is a result
            result[consumer] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}
            continue
        loaded = effective_weights(parts, "consumer")
        for full, want in live.items():
            got = loaded.get(full, weights[full])  # a module the loader skipped keeps the base weight
            record(consumer, full, relative(got, want, weights[full]))
        pipe.delete_adapters("consumer")
    return result


def run_row(label: str, kind: str, variant: str, extra: list[str], steps: int, tmp: Path, bases: dict) -> list[tuple]:
    import trainer.training.loop as loop
    from trainer.config import load_config

    cfg = load_config(ROOT / "presets" / "tiny-test.toml", [
        f'model.path="{bases[kind]}"', f'data.path="{ROOT / "examples" / "tiny-style"}"', f'output.dir="{tmp}"',
        f"train.steps={steps}", f'lora.variant="{variant}"', "output.name=\"run\"", *COMMON, *extra])
    run_dir = tmp / label.split()[0].replace(",", "") / str(time.time_ns())
    captured, real = {}, loop.load_base

    def spy(*args, **kwargs):  # the last base the loop loads is the trained one (LoRA-drop loads a probe first)
        captured["base"] = real(*args, **kwargs)
        return captured["base"]

    loop.load_base = spy
    try:
        loop.train(cfg, run_dir)
    finally:
        loop.load_base = real
    trained = captured["base"]
    live = effective_weights({"unet": trained.unet, **trained.text_encoders()}, "default")
    rows = [(label, measure(bases[kind], kind, live, {"kohya": run_dir / "run.safetensors",
                                                      "diffusers": run_dir / "run.diffusers.safetensors"}))]
    plain = run_dir / "run.plain.safetensors"
    if plain.is_file():
        from safetensors import safe_open

        with safe_open(str(plain), "pt") as f:
            rank = json.loads(f.metadata()["style_lora_plain"])["rank"]
        rows.append((f"{label} → `.plain.safetensors` (rank {rank})", measure(bases[kind], kind, live, {"kohya": plain})))
    return rows


def cell(errors: dict | None) -> str:
    if not errors:
        return "—"
    if "error" in errors:
        return f"**no**: does not load ({errors['error']})"
    worst = max(errors.values())
    numbers = " / ".join(f"{errors[p]:.1e}" for p in ("unet", "text_encoder") if p in errors)
    if worst != worst or worst > 1e3:  # NaN: a shape A1111 cannot apply
        return "**no**: wrong shape"
    return f"exact ({numbers})" if worst < 1e-5 else f"**no**: {numbers}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="", help="comma-separated row labels' first words (default: all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "consumers.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = {v for v in args.variants.split(",") if v}

    from trainer.families.tiny import build_tiny_sd15
    from trainer.families.tiny_xl import build_tiny_sdxl

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bases = {"sd1": build_tiny_sd15(tmp / "tiny-sd15"), "sdxl": build_tiny_sdxl(tmp / "tiny-sdxl")}
        for label, (kind, variant, extra) in RUNS.items():
            if wanted and label.split()[0].rstrip(",") not in wanted:
                continue
            rows += run_row(label, kind, variant, extra, args.steps, tmp, bases)
            print(json.dumps(rows[-1]), flush=True)
    write_markdown(rows, args)


def write_markdown(rows: list[tuple], args) -> None:
    import diffusers
    import peft

    lines = [
        "# Which file loads exactly where",
        "",
        f"Produced by `scripts/consumer_table.py --steps {args.steps}` on {time.strftime('%Y-%m-%d')} (torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}), on the tiny random bases of the "
        "tests. Each cell: the largest relative error of one layer's weight change ΔW = W' − W against the trained "
        "model (peft), UNet / text encoder(s), float64; **exact** means < 1e-5. ComfyUI, A1111 and kohya are their "
        "formulas as read in their sources (see the script's docstring); diffusers is its real loader. The kohya "
        "file is `<name>.safetensors`; the diffusers file `<name>.diffusers.safetensors`.",
        "",
        "| run | " + " | ".join(CONSUMERS) + " |",
        "| --- | " + " | ".join("---" for _ in CONSUMERS) + " |",
    ]
    for label, result in rows:
        lines.append(f"| {label} | " + " | ".join(cell(result.get(c)) for c in CONSUMERS) + " |")
    lines += ["", NOTES]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


NOTES = """## Reading the table

- **Every plain-LoRA variant** (LoRA, LoRA+, LoRA-FA, VeRA, AdaLoRA, LoRA-drop, Delta-LoRA) is exported as one plain
  LoRA with one rank for all layers and alpha = rank, the trained scale folded into `lora_up` (zero-padded where a
  layer's rank is lower, e.g. AdaLoRA's). Every loader computes the same ΔW; the trained rank and alpha stay in the
  metadata (`ss_network_dim`, `ss_network_alpha`). Per-module alphas were lost in diffusers' kohya loader, which
  keeps one alpha per model part and whose `alpha_pattern` keys miss the attention modules of the full-size SD1.5
  UNet (tests/test_export.py reproduces that at full size).
- **DoRA**: the kohya file's `dora_scale` is written for ComfyUI/Forge's formula, which divides by the row norm of
  the *original* weight: dora_scale = m·(‖W‖ + eps)/‖W + ΔW‖, so ComfyUI gives peft's DoRA weight. A1111 applies
  DoRA on the input axis only, and kohya's `merge_lora.py` and diffusers' kohya loader do not apply this
  `dora_scale` as ComfyUI does. For those there is `<name>.plain.safetensors`, the DoRA's whole weight change as a
  plain LoRA truncated by SVD: its rank is the one `output.export_max_error` (1 %) asks for, never above the rank at
  which the file would be larger than the weights it changes. The magnitude rescales whole rows of W, a full-rank
  change, so usually no such file comes near exact: then **none is written** and the Runs panel says that A1111 and
  kohya's `merge_lora.py` cannot use the run, with the error the best file would have had (the kohya file's
  `style_lora_plain_skipped` header). `output.plain_lora_rank` writes one at a fixed rank anyway (the rows below use
  16 and 8); its error is the truncation's, the same in every tool, written in its metadata and shown on the Runs
  panel. The `.diffusers.safetensors` file
  is exact in diffusers. The table is at strength 1: at strength t ComfyUI blends W + t·(W' − W), while peft/diffusers
  scale only the low-rank part inside the normalisation, so DoRA at t ≠ 1 differs between them by design. The
  `dora_scale` is stored in fp32, so ComfyUI's W' is exact up to fp32 rounding of W (about 1e-6 of ΔW here). If
  ComfyUI changes its output-axis formula to the norm of W + ΔW (a proposed fix), the kohya DoRA file would be off
  there by about as much as the magnitude moved; the plain file would not.
- **SDXL**: the second text encoder's projection is `lora_te2_text_projection`, the key ComfyUI's key map gives
  `clip_g.transformer.text_projection`; diffusers loads it too. kohya's `sdxl_merge_lora.py` only patches modules
  inside its target classes (not the projection). The A1111 cell of that row assumes A1111 resolves the key to the
  projection, which was not checked in A1111's code; the projection is not a default target.
- **LoHa / LoKr** (LyCORIS): the kohya file has LyCORIS keys, which A1111's built-in Lora extension and ComfyUI/Forge
  apply exactly (LoHa with peft's alpha per module; LoKr with both factors stored full and the scale folded into
  `lokr_w1`, because both tools ignore alpha for full factors and A1111 1.10 fails on decomposed ones). kohya's
  `merge_lora.py` and diffusers read no LyCORIS keys: diffusers users take the `.diffusers.safetensors` file, the ΔW
  as a plain LoRA, exact where that fits in no more than the weights it changes (closed-form rank r² for LoHa, the
  product of the factor ranks for LoKr, a decomposed factor counting its rank r) and otherwise truncated at the rank
  `output.export_max_error` asks for under that size, its measured error in the header (`style_lora_compact`) and on
  the Runs panel. A LoKr whose factors are stored full (rank ≥ half a factor's size) has a full-rank ΔW: on the
  full-size SD1.5 UNet its diffusers file is then **not exact** ([export-sizes.md](export-sizes.md)); the kohya file is.
- **LoCon** (`lora.conv_rank`): the resnet 3×3 convolutions are ordinary conv LoRA modules (`lora_down` [r, in, 3, 3],
  `lora_up` [out, r, 1, 1]) in every loader.
- Conversions (`python -m trainer convert`) write the same layout; DoRA files need `--model BASE`, because the kohya
  `dora_scale` is relative to the base weights.
"""


if __name__ == "__main__":
    main()
