"""Issue 30, major 6: no export is larger than the base weights it changes; where it cannot be exact, its rank comes
from an error target, the error is measured and shown, and a file that comes nowhere near is not written by default.

Tiny bases only; the full-size numbers are scripts/export_sizes.py's (docs/consumers.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_export import tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def lokr_unet(tiny_base, rank: int, conv_rank: int = 0, variant: str = "lokr"):
    """The tiny UNet with LoKr (or LoHa) attached as training does, every factor moved off its init (lokr_w1
    starts at 0)."""
    from diffusers import UNet2DConditionModel

    from trainer.adapters.lycoris import add_locon
    from trainer.adapters.attach import denoiser_targets
    from trainer.adapters.variants import add_adapter, peft_config
    from trainer.families import sd1
    from trainer.config import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet").requires_grad_(False)
    cfg = LoraConfig(variant=variant, rank=rank, alpha=3.0, conv_rank=conv_rank, conv_alpha=1.0)
    config = peft_config(cfg, denoiser_targets(cfg, sd1), 10)
    add_adapter(unet, add_locon(config, unet, cfg) if conv_rank else config)
    return moved(unet)


def lokr_text_encoder(tiny_base, rank: int):
    from transformers import CLIPTextModel

    from trainer.adapters.variants import add_adapter, peft_config
    from trainer.config import LoraConfig

    text_encoder = CLIPTextModel.from_pretrained(tiny_base / "text_encoder").requires_grad_(False)
    cfg = LoraConfig(variant="lokr", rank=rank, alpha=2.0, train_text_encoder=True)
    add_adapter(text_encoder, peft_config(cfg, cfg.text_encoder_targets, 10))
    return moved(text_encoder, seed=1)


def moved(model, seed: int = 0):
    """Every trainable adapter parameter set to N(0, 0.1²) noise."""
    from trainer.adapters.variants import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def file_deltas(path) -> dict[str, torch.Tensor]:
    """{module: ΔW [out, in·kh·kw]} of a diffusers-layout plain LoRA file, float64, alpha from its rank_pattern."""
    state = load_file(path)
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
            up = state[key.replace("lora_A", "lora_B")].double().flatten(1)
            scale = config["unet.alpha_pattern"][module] / config["unet.rank_pattern"][module]
            out[module] = scale * up @ down.double().flatten(1)
    return out


def test_kron_and_product_svds_are_exact_and_keep_the_smallest_rank_within_the_target():
    from trainer.adapters.compact import choose_rank, kron_truncated, product_truncated

    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(6, 5, generator=g), torch.randn(7, 12, generator=g)
    full = torch.kron(w1.double(), w2.double())
    s = torch.linalg.svdvals(full)
    for cap, target in ((1000, 0.01), (12, 0.01), (1000, 0.3)):
        up, down, lost, total = kron_truncated(w1, w2, cap, target)
        k = up.shape[1]
        assert lost == pytest.approx(float((full - up @ down).pow(2).sum()), rel=1e-9)
        assert lost == pytest.approx(float(s[k:].pow(2).sum()), rel=1e-9) and total == pytest.approx(float(s.pow(2).sum()))
        assert k == choose_rank(s, cap, target) and k <= cap
    assert kron_truncated(w1, w2, 1000, 0.01)[2] < 1e-20  # rank 35 fits the cap: exact whatever the target
    rel = [float(s[k:].pow(2).sum() / s.pow(2).sum()) ** 0.5 for k in range(len(s))]
    k = kron_truncated(w1, w2, 30, 0.3)[0].shape[1]
    assert rel[k] <= 0.3 < rel[k - 1]  # the smallest rank within the target
    a, b = torch.randn(40, 9, generator=g), torch.randn(9, 50, generator=g)
    up, down, lost, _ = product_truncated(a, b, 20, 1e-3)
    assert up.shape[1] == 9 and lost < 1e-20 and torch.allclose(up @ down, a.double() @ b.double(), atol=1e-10)


def test_a_lokr_diffusers_file_is_never_larger_than_the_weights_it_changes(tiny_base, tmp_path):
    """Rank 16 on the tiny UNet: every layer's kron(w1, w2) is full rank, so the old file (the float64 full-rank SVD,
    (out + in)·min(out, in) numbers a layer) was larger than the weights. Now it is capped and its header holds the
    error the file really has."""
    from trainer.adapters.lycoris import lycoris_delta
    from trainer.adapters.variants import lora_layers
    from trainer.lora_files.export import COMPACT_KEY, save_diffusers_lora

    unet = lokr_unet(tiny_base, rank=16, conv_rank=16)
    path = save_diffusers_lora(tmp_path / "k.diffusers.safetensors", {"unet": unet}, {}, convert=True, max_error=0.01,
                               exact_lokr=False)  # the plain LoRA anyway (by default: peft's LoKr layout, below)
    layers = lora_layers(unet)
    weights = sum(layer.get_base_layer().weight.numel() for layer in layers.values())
    assert sum(t.numel() for t in load_file(path).values()) <= weights
    with safe_open(str(path), "pt") as f:
        report = json.loads(f.metadata()[COMPACT_KEY])
    got = file_deltas(path)
    lost = total = worst = 0.0
    for name, layer in layers.items():
        want = lycoris_delta(layer).flatten(1)
        miss = float((got[name] - want).pow(2).sum())
        lost, total = lost + miss, total + float(want.pow(2).sum())
        worst = max(worst, (miss / float(want.pow(2).sum())) ** 0.5)
    assert report["rel_error"]["unet"] == pytest.approx((lost / total) ** 0.5, rel=1e-3)
    assert report["max_layer_rel_error"] == pytest.approx(worst, rel=1e-3)
    assert not report["exact"] and report["bytes"] <= report["weight_bytes"] == 4 * weights


def test_a_lokr_diffusers_file_stays_exact_where_the_decomposed_factors_fit(tiny_base, tmp_path):
    """Rank 2: w2 is stored as a rank-2 product, so kron(w1, a·b) has rank rows(w1)·2; the old closed form used the
    whole w2 (full rank, then the SVD). Exact, and smaller than the weights."""
    from trainer.adapters.lycoris import lycoris_delta
    from trainer.adapters.variants import lora_layers
    from trainer.lora_files.export import COMPACT_KEY, save_diffusers_lora

    unet = lokr_unet(tiny_base, rank=2)
    path = save_diffusers_lora(tmp_path / "k.diffusers.safetensors", {"unet": unet}, {}, convert=True)
    layers = lora_layers(unet)
    got = file_deltas(path)
    for name, layer in layers.items():
        want = lycoris_delta(layer).flatten(1)
        assert float((got[name] - want).norm() / want.norm()) < 1e-5, name
    with safe_open(str(path), "pt") as f:
        report = json.loads(f.metadata()[COMPACT_KEY])
    assert report["exact"] and report["bytes"] < report["weight_bytes"] / 2


def dora_run(make_cfg, tiny_base, tmp_path, *settings):
    from trainer.lora_files.export import save_adapters

    cfg = make_cfg('lora.variant="dora"', *settings)
    modules = tiny_models(tiny_base, "dora", "dora")
    run = tmp_path / "run"
    run.mkdir()
    paths = save_adapters(run, cfg, modules, {}, base_kind="sd1", tag_frequency={}, cover_png=None)
    return cfg, run, paths


def test_a_dora_plain_lora_that_comes_nowhere_near_is_not_written_and_the_guide_says_so(make_cfg, tiny_base,
                                                                                          tmp_path):
    from app import downloads_view
    from app.jobs import adapter_files

    cfg, run, paths = dora_run(make_cfg, tiny_base, tmp_path)
    assert [p.name for p in paths] == [f"{cfg.output.name}.safetensors", f"{cfg.output.name}.diffusers.safetensors"]
    with safe_open(str(paths[0]), "pt") as f:
        skipped = json.loads(f.metadata()["style_lora_plain_skipped"])
    assert skipped["rel_error"]["unet"] > cfg.output.export_max_error and skipped["bytes"] <= skipped["weight_bytes"]
    text = downloads_view.downloads_markdown(adapter_files(run))
    line = next(x for x in text.splitlines() if f"`{cfg.output.name}.safetensors`" in x)
    assert "A1111 and kohya `merge_lora.py` cannot use this run" in line and f"{skipped['rel_error']['unet']:.2%}" in line
    assert " kB" in line or " MB" in line  # its size beside it


def test_a_dora_plain_lora_within_the_target_is_written_with_its_rank_chosen_by_it(make_cfg, tiny_base, tmp_path):
    """A DoRA whose magnitudes equal ‖W + ΔW‖ is the plain LoRA ΔW itself (rank 4): the target picks rank 4, not
    the old fixed 2 × lora.rank, and the file is exact."""
    from peft.tuners.lora import LoraLayer

    from app import downloads_view
    from trainer.lora_files.dora import row_norm
    from trainer.lora_files.export import save_plain_lora

    modules = tiny_models(tiny_base, "dora", "dora")
    with torch.no_grad():
        for model in modules.values():
            for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
                weight = layer.get_base_layer().weight
                delta = layer.get_delta_weight("default")  # s·B·A, convolutions included (no DoRA in it)
                magnitude = layer.lora_magnitude_vector["default"].weight
                magnitude.copy_(row_norm(weight + delta).reshape(magnitude.shape))
    path, report = save_plain_lora(tmp_path / "p.plain.safetensors", modules, {}, 0, max_error=0.01)
    assert report["rank"] == 4 and report["exact"] and report["bytes"] <= report["weight_bytes"]
    line = downloads_view.file_use(path)
    assert "rank 4" in line and "for " in line and "of base weights it changes" in line


# ----------------------------------------------------------------------------- LoKr: peft's own layout when no plain LoRA comes near


def lokr_run(make_cfg, tiny_base, tmp_path, **kw):
    """save_adapters of a rank-16 LoKr on the tiny UNet (convolutions too) and text encoder: every kron(w1, w2) is
    full rank, so no plain LoRA no larger than the weights comes within the target (the test above: 0.29)."""
    from trainer.lora_files.export import save_adapters

    cfg = make_cfg('lora.variant="lokr"', "lora.rank=16", "lora.conv_rank=16", "lora.train_text_encoder=true")
    modules = {"unet": lokr_unet(tiny_base, 16, 16).eval(), "text_encoder": lokr_text_encoder(tiny_base, 16).eval()}
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    paths = save_adapters(run, cfg, modules, {}, base_kind="sd1", tag_frequency={}, cover_png=None, convert=True, **kw)
    return cfg, modules, run, paths


def assert_same_lokr(modules: dict, loaded: dict, adapter: str) -> None:
    """Every LoKr layer of `loaded` ({part: model}) has the ΔW of the trained one, to fp32 round-off."""
    from trainer.adapters.lycoris import lycoris_delta
    from trainer.adapters.variants import lora_layers

    for part, model in loaded.items():
        want, got = lora_layers(modules[part]), lora_layers(model)
        assert got.keys() == want.keys(), part
        for name, layer in want.items():
            delta = got[name].get_delta_weight(adapter).detach().double().cpu()
            assert float((delta - lycoris_delta(layer)).norm() / lycoris_delta(layer).norm()) < 1e-6, name


def test_a_lokr_no_plain_lora_comes_near_is_written_exactly_in_peft_lokr_layout(make_cfg, tiny_base, tmp_path):
    """Before: a plain LoRA 29 % off (16 % on the full-size UNet) under the `.diffusers.safetensors` name. Now peft's
    own LoKr layout, which diffusers' `load_lora_adapter` (and peft, for the text encoder) rebuild exactly, as small
    as the LyCORIS file; its header keeps what the plain LoRA would have lost, and the Runs panel says so."""
    from diffusers import UNet2DConditionModel
    from peft import LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
    from transformers import CLIPTextModel

    from app import downloads_view
    from trainer.lora_files.export import COMPACT_KEY, LOKR_LAYOUT_KEY

    cfg, modules, run, (kohya, diffusers) = lokr_run(make_cfg, tiny_base, tmp_path)
    with safe_open(str(diffusers), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    layout = json.loads(meta[LOKR_LAYOUT_KEY])
    assert COMPACT_KEY not in meta and keys and all(".lokr_w" in k for k in keys)
    assert layout["exact"] and layout["plain_lora"]["rel_error"]["unet"] > cfg.output.export_max_error
    assert layout["bytes"] <= layout["weight_bytes"] / 4 and layout["bytes"] == 4 * sum(
        t.numel() for t in load_file(diffusers).values())
    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")  # diffusers' documented call, from the file
    unet.load_lora_adapter(str(run), weight_name=diffusers.name, prefix="unet", adapter_name="style")
    text_encoder = CLIPTextModel.from_pretrained(tiny_base / "text_encoder")  # peft, as docs/consumers.md shows
    config = json.loads(meta["lora_adapter_metadata"])
    inject_adapter_in_model(LoKrConfig(**{k.removeprefix("text_encoder."): v for k, v in config.items()
                                          if k.startswith("text_encoder.")}), text_encoder, adapter_name="style")
    state = {k.removeprefix("text_encoder.text_model."): v for k, v in load_file(diffusers).items()
             if k.startswith("text_encoder.")}
    assert not set_peft_model_state_dict(text_encoder, state, adapter_name="style").unexpected_keys
    assert_same_lokr(modules, {"unet": unet, "text_encoder": text_encoder}, "style")
    from trainer.lora_tools.deltas import read_lora  # the toolbox reads it too: the same ΔW as the LyCORIS file

    peft_file, lycoris_file = read_lora(diffusers), read_lora(kohya, model=str(tiny_base))
    assert peft_file.variant == "lokr" and peft_file.deltas.keys() == lycoris_file.deltas.keys()
    for key, delta in lycoris_file.deltas.items():
        want = delta.weight()
        assert float((peft_file.deltas[key].weight() - want).norm() / want.norm()) < 1e-5, key
    line = downloads_view.file_use(diffusers)
    assert "**exact**" in line and "load_lora_adapter" in line and "`pipe.load_lora_weights` does not read" in line
    assert f"{layout['plain_lora']['rel_error']['unet']:.2%}" in line and "of base weights it changes" in line
    assert "the `.diffusers.safetensors` file" in downloads_view.file_use(kohya)


def test_the_preview_and_the_report_loader_read_the_lokr_layout_exactly(make_cfg, tiny_base, tmp_path):
    """The Preview (and the style report, through load_lora_file) draw what the trained LoKr modules draw."""
    from diffusers import StableDiffusionPipeline

    from trainer.lora_files.adapter_files import AdapterError, load_lora_file, read_adapter
    from trainer.preview.previewer import Previewer

    _, modules, _, (_, diffusers) = lokr_run(make_cfg, tiny_base, tmp_path)
    kw = dict(num_inference_steps=2, guidance_scale=3.0, width=64, height=64, output_type="pt")
    pv = Previewer(str(tiny_base), max_adapters=2, device="cpu")
    assert pv.load_adapter(diffusers, "lokr")["layout"] == "lokr"
    assert_same_lokr(modules, {"unet": pv.pipe.unet, "text_encoder": pv.pipe.text_encoder}, "a1")
    images = {}
    for name in ("lokr", None):
        pv.activate({name: 1.0} if name else {})
        images[name] = pv.pipe("zkstyle, a red circle", generator=torch.Generator().manual_seed(5), **kw).images
    ref = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    ref.unet, ref.text_encoder = modules["unet"], modules["text_encoder"]
    want = ref("zkstyle, a red circle", generator=torch.Generator().manual_seed(5), **kw).images
    assert (images["lokr"] - want).abs().max() < 1e-4 < (images["lokr"] - images[None]).abs().max()
    report = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    load_lora_file(report, diffusers, "style")
    assert_same_lokr(modules, {"unet": report.unet, "text_encoder": report.text_encoder}, "style")
    with pytest.raises(AdapterError, match="LoKr adapters cannot go into the hot-swap slot"):
        read_adapter(diffusers, pv.pipe, pv.table, allow_dora=False)


# ----------------------------------------------------------------------------- never longer than the training


def tensors_digest(path) -> str:
    import hashlib

    state, h = load_file(path), hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_the_time_budget_is_the_training_time_with_a_floor_and_the_ui_keeps_the_same_names():
    import time

    from app import downloads_view
    from trainer.lora_files import export

    assert export.export_budget(time.time() - 5) == export.EXPORT_FLOOR_S == downloads_view.EXPORT_FLOOR_S == 30
    assert export.export_budget(time.time() - 100) == pytest.approx(100, abs=5)
    assert (downloads_view.EXPORT_SKIPPED_KEY, downloads_view.LOKR_LAYOUT_KEY) == (export.EXPORT_SKIPPED_KEY,
                                                                                   export.LOKR_LAYOUT_KEY)


def test_a_dora_plain_lora_past_its_time_budget_is_not_written_and_the_kohya_file_says_why(make_cfg, tiny_base,
                                                                                             tmp_path):
    """Asked for (output.plain_lora_rank=2), but its SVDs find the budget spent: no `.plain` file and nothing partial
    (an older one of that name is removed), the kohya header says why, a warning goes out, the Runs panel says so.
    The kohya and diffusers files are the same tensors as with no budget; a budget that suffices changes nothing."""
    from app import downloads_view
    from trainer.lora_files.export import EXPORT_SKIPPED_KEY, save_adapters

    cfg = make_cfg('lora.variant="dora"', "output.plain_lora_rank=2")
    modules = tiny_models(tiny_base, "dora", "dora")
    run, digests, warnings = tmp_path / "run", {}, []
    run.mkdir()
    for budget in (None, 1e6, 0.0):  # the last into the same folder: the first's .plain file is there
        paths = save_adapters(run, cfg, modules, {}, base_kind="sd1", tag_frequency={}, cover_png=None,
                              budget_s=budget, warn=warnings.append)
        digests[budget] = {p.name: tensors_digest(p) for p in paths}
    name = cfg.output.name
    assert digests[None] == digests[1e6] and len(digests[None]) == 3
    assert digests[0.0] == {k: v for k, v in digests[None].items() if not k.endswith(".plain.safetensors")}
    assert sorted(p.name for p in run.iterdir()) == sorted(digests[0.0])  # no .plain, no temporary file
    with safe_open(str(run / f"{name}.safetensors"), "pt") as f:
        skipped = json.loads(f.metadata()[EXPORT_SKIPPED_KEY])
    layers = sum(1 for k in load_file(run / f"{name}.safetensors") if k.endswith(".lora_down.weight"))
    assert skipped == {f"{name}.plain.safetensors": {"budget_s": 0.0, "spent_s": skipped[f"{name}.plain.safetensors"][
        "spent_s"], "layers_done": 0, "layers": layers}}
    assert len(warnings) == 1 and f"{name}.plain.safetensors not written" in warnings[0] and "budget" in warnings[0]
    line = downloads_view.file_use(run / f"{name}.safetensors")
    assert "A1111 and kohya `merge_lora.py` cannot use this save" in line and "export time budget" in line


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_a_lycoris_diffusers_file_past_its_time_budget(variant, make_cfg, tiny_base, tmp_path):
    """LoHa rank 8 on the tiny UNet (exact factors of rank 64, larger than the weights: SVDs) with the budget spent:
    no diffusers file (nothing exact to fall back to), the kohya header, a warning and the Runs panel say so. LoKr
    rank 16: peft's LoKr layout instead, exact and written at once, so nothing is missing."""
    from app import downloads_view
    from trainer.lora_files.export import EXPORT_SKIPPED_KEY, LOKR_LAYOUT_KEY, save_adapters

    rank = 8 if variant == "loha" else 16
    cfg = make_cfg(f'lora.variant="{variant}"', f"lora.rank={rank}")
    modules = {"unet": lokr_unet(tiny_base, rank, variant=variant)}
    run, warnings = tmp_path / "run", []
    run.mkdir()
    paths = save_adapters(run, cfg, modules, {}, base_kind="sd1", tag_frequency={}, cover_png=None, convert=True,
                          budget_s=0.0, warn=warnings.append)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in paths)
    with safe_open(str(paths[0]), "pt") as f:
        header = f.metadata()
    kohya_line = downloads_view.file_use(paths[0])
    if variant == "loha":
        assert [p.name for p in paths] == [f"{cfg.output.name}.safetensors"]
        skipped = json.loads(header[EXPORT_SKIPPED_KEY])[f"{cfg.output.name}.diffusers.safetensors"]
        assert skipped["layers_done"] < skipped["layers"] and len(warnings) == 1
        assert "no `.diffusers.safetensors` file was written" in kohya_line and "export time budget" in kohya_line
    else:
        assert EXPORT_SKIPPED_KEY not in header and not warnings
        with safe_open(str(paths[1]), "pt") as f:
            layout = json.loads(f.metadata()[LOKR_LAYOUT_KEY])
        assert layout["exact"] and layout["plain_lora_out_of_time"]["layers_done"] == 0
        assert "ran past the export time budget" in downloads_view.file_use(paths[1])


def test_the_training_loop_gives_its_saves_the_budget_and_reports_a_skipped_file(make_cfg, tmp_path, monkeypatch):
    """Every save of a run gets export_budget(the run's start); a file it skips is a warning on the Runs panel."""
    import trainer.training.loop as loop
    from app import jobs, runs_view

    budgets = []
    monkeypatch.setattr(loop, "export_budget", lambda started_at: budgets.append(started_at) or 0.0)
    loop.train(make_cfg("train.steps=1", 'lora.variant="dora"', "output.plain_lora_rank=2"), tmp_path / "run")
    assert budgets and not (tmp_path / "run" / "tiny-test.plain.safetensors").exists()
    events = jobs.run_events(tmp_path / "run" / "events.jsonl")
    panel = runs_view.panel_markdown(jobs.RunStatus(tmp_path / "run", "done", events=events))
    assert "Warnings:" in panel and "tiny-test.plain.safetensors not written" in panel
