"""Preview (trainer/preview/previewer.py, app/preview.py) on the tiny base: adapters switched without reloading the base."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file


KW = dict(prompt="zkstyle, a red circle", negative="", steps=2, guidance=3.0, width=64, height=64)


def make_adapter(tiny_base: Path, folder: Path, stem: str, seed: int, rank: int = 4, alpha: float = 8.0,
                 text_encoder: bool = True, targets: list[str] | None = None,
                 variant: str = "lora") -> tuple[Path, Path]:
    """A LoRA with random non-zero B (alpha != rank, so a lost alpha would show), in both file layouts."""
    from trainer.config import LoraConfig, ModelConfig
    from trainer.lora_files.export import save_diffusers_lora
    from trainer.lora_files.kohya import save_kohya_lora
    from trainer.adapters.attach import attach_lora
    from trainer.families.loading import load_base

    base = load_base(ModelConfig(path=str(tiny_base)))
    extra = {"unet_targets": targets} if targets else {}
    attach_lora(base, LoraConfig(rank=rank, alpha=alpha, train_text_encoder=text_encoder, variant=variant, **extra))
    gen = torch.Generator().manual_seed(seed)
    for model in (base.unet, base.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.5
    modules = {"unet": base.unet, "text_encoder": base.text_encoder if text_encoder else None}
    folder.mkdir(parents=True, exist_ok=True)
    kohya = save_kohya_lora(folder / f"{stem}.safetensors", {k: v for k, v in modules.items() if v is not None}, {})
    diffusers = save_diffusers_lora(folder / f"{stem}.diffusers.safetensors",
                                    {k: v for k, v in modules.items() if v is not None})
    return kohya, diffusers


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    a = make_adapter(tiny_base, folder, "style-a", seed=1)
    b = make_adapter(tiny_base, folder, "style-b", seed=2, alpha=2.0)
    return {"a": a, "b": b, "folder": folder}


def arr(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def base_weights(pv) -> dict[str, torch.Tensor]:
    """Every base (non-LoRA) parameter of the pipeline, by its clean name."""
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        for name, p in getattr(pv.pipe, part).named_parameters():
            if "lora_" not in name:
                out[f"{part}.{name.replace('.base_layer', '')}"] = p.detach().clone()
    return out


@pytest.fixture(scope="module")
def previewer(tiny_base):
    from trainer.preview.previewer import Previewer

    return Previewer(str(tiny_base), max_adapters=4)


def test_swap_a_b_none_keeps_base_bit_identical_and_strength_zero_is_base(previewer, adapters):
    pv = previewer
    before = base_weights(pv)
    base_img, t = pv.generate(**KW, seed=3)
    assert t["gen_ms"] > 0 and "swap_ms" in t
    info = pv.load_adapter(adapters["a"][1], "A")
    assert info["parts"] == ["text_encoder", "unet"] and info["layout"] == "diffusers"
    pv.load_adapter(adapters["b"][1], "B")
    img_a, ta = pv.generate(**KW, seed=3, adapters={"A": 1.0})
    img_b, tb = pv.generate(**KW, seed=3, adapters={"B": 1.0})
    img_none, tn = pv.generate(**KW, seed=3)
    for t in (ta, tb, tn):
        assert t["swap_ms"] >= 0 and t["gen_ms"] > 0
    assert tb["swap_ms"] < 1000, "switching adapters is a set_adapters, not a reload"
    after = base_weights(pv)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"
    assert np.array_equal(arr(img_none), arr(base_img))
    assert np.abs(arr(img_a) - arr(img_b)).max() > 1, "two adapters give different images"
    assert np.abs(arr(img_a) - arr(base_img)).max() > 1
    zero, _ = pv.generate(**KW, seed=3, adapters={"A": 0.0})
    assert np.abs(arr(zero) - arr(base_img)).max() < 1e-6
    # mixing: two adapters with their own weights differ from each alone
    mix, _ = pv.generate(**KW, seed=3, adapters={"A": 0.7, "B": 0.5})
    assert np.abs(arr(mix) - arr(img_a)).max() > 1 and np.abs(arr(mix) - arr(img_b)).max() > 1


def test_kohya_and_diffusers_layouts_give_the_same_image(previewer, adapters):
    pv = previewer
    info = pv.load_adapter(adapters["b"][0], "B-kohya")
    assert info["layout"] == "kohya"
    pv.load_adapter(adapters["b"][1], "B")
    # pt output to compare before 8-bit rounding
    outs = []
    for name in ("B-kohya", "B"):
        pv.activate({name: 1.0})
        gen = torch.Generator().manual_seed(5)
        outs.append(pv.pipe(KW["prompt"], num_inference_steps=2, guidance_scale=3.0, width=64, height=64,
                            generator=gen, output_type="pt").images)
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    assert pv.pipe.unet.peft_config[pv.adapters["B"].peft_name].lora_alpha == 2.0  # alpha kept, not = rank


def test_dora_adapter_previews_the_same_in_both_layouts(previewer, adapters, tiny_base):
    from diffusers import StableDiffusionPipeline

    kohya, diffusers = make_adapter(tiny_base, adapters["folder"], "style-dora", seed=7, variant="dora")
    pv = previewer
    assert pv.load_adapter(kohya, "D-kohya")["layout"] == "kohya"
    pv.load_adapter(diffusers, "D")
    outs = []
    for name in ("D-kohya", "D", None):
        pv.activate({name: 1.0} if name else {})
        outs.append(pv.pipe(KW["prompt"], num_inference_steps=2, guidance_scale=3.0, width=64, height=64,
                            generator=torch.Generator().manual_seed(5), output_type="pt").images)
    assert (outs[0] - outs[1]).abs().max() < 1e-4, "kohya dora_scale and diffusers magnitude disagree"
    assert (outs[1] - outs[2]).abs().max() > 1e-3, "the DoRA adapter changes the image"
    # ... and equals diffusers' own loader on a fresh pipeline
    ref = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    ref.load_lora_weights(str(diffusers))
    ref_out = ref(KW["prompt"], num_inference_steps=2, guidance_scale=3.0, width=64, height=64,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert (ref_out - outs[1]).abs().max() < 1e-4


def test_bad_files_are_refused_with_a_message(previewer, adapters, tiny_base, tmp_path):
    from trainer.preview.previewer import AdapterError

    pv = previewer
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match="garbage.safetensors.*not a readable"):
        pv.load_adapter(garbage)
    with pytest.raises(AdapterError, match="evil.ckpt.*only .safetensors"):
        pv.load_adapter(ckpt)
    # keys that map to no module of the base
    unknown = tmp_path / "unknown.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}, unknown)
    with pytest.raises(AdapterError, match="unknown.safetensors.*no_such_block"):
        pv.load_adapter(unknown)
    # right names, wrong shapes (a LoRA for a bigger base)
    from safetensors.torch import load_file

    good = load_file(adapters["a"][1])
    key = next(k for k in good if k.startswith("unet.") and k.endswith("lora_A.weight"))
    bigger = dict(good)
    bigger[key] = torch.zeros(good[key].shape[0], 768)
    wrong = tmp_path / "wrong-shape.safetensors"
    save_file(bigger, wrong)
    with pytest.raises(AdapterError, match="wrong-shape.safetensors.*shapes"):
        pv.load_adapter(wrong)
    # kohya names from the real SD1.5 that the tiny base does not have
    kohya = tmp_path / "sd15-kohya.safetensors"
    save_file({"lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 1280),
               "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(1280, 4)},
              kohya)
    with pytest.raises(AdapterError, match="sd15-kohya.safetensors.*match no module"):
        pv.load_adapter(kohya)
    assert not {"garbage.safetensors", "unknown.safetensors", "wrong-shape.safetensors"} & set(pv.adapters)


def test_lru_evicts_least_recently_used(tiny_base, adapters):
    from trainer.preview.previewer import Previewer

    pv = Previewer(str(tiny_base), max_adapters=2)
    pv.load_adapter(adapters["a"][1], "A")
    pv.load_adapter(adapters["b"][1], "B")
    pv.activate({"A": 1.0})
    pv.load_adapter(adapters["b"][0], "C")  # evicts B: A was used more recently
    assert list(pv.adapters) == ["A", "C"]
    assert set(pv.pipe.unet.peft_config) == {pv.adapters["A"].peft_name, pv.adapters["C"].peft_name}


def test_hotswap_slot_matches_multi_adapter_path(tiny_base, adapters, previewer):
    """The hot-swap path (what compile=True uses on CUDA) gives the multi-adapter images, here eagerly on CPU."""
    from trainer.preview.previewer import Previewer

    hs = Previewer(str(tiny_base), hotswap=True, max_rank=16)
    before = base_weights(hs)
    hs.load_adapter(adapters["a"][1], "A")
    hs.load_adapter(adapters["b"][0], "B")
    previewer.load_adapter(adapters["a"][1], "A")
    previewer.load_adapter(adapters["b"][0], "B")
    for mix in ({"A": 1.0}, {"B": 0.5}, {"A": 0.7, "B": 0.5}, {}, {"A": 1.0}):
        got, t = hs.generate(**KW, seed=4, adapters=mix)
        want, _ = previewer.generate(**KW, seed=4, adapters=mix)
        assert np.abs(arr(got) - arr(want)).max() <= 1, mix
        assert t["swap_ms"] >= 0
    slot = [n for n in hs.pipe.unet.peft_config]
    assert slot == ["hotswap_slot"], "one UNet slot, swapped in place"
    after = base_weights(hs)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_grid_and_compare(previewer, adapters):
    previewer.load_adapter(adapters["a"][1], "A")
    lora, base, t = previewer.compare({"A": 1.0}, **KW, seed=1)
    assert lora.size == base.size == (64, 64) and {"swap_ms", "gen_ms", "base_gen_ms"} <= t.keys()
    sheet, t = previewer.grid({"A": 1.0}, (0.0, 0.5, 1.0), (0, 1, 2), **{k: v for k, v in KW.items()})
    assert sheet.size == (192, 14 + 192) and t["images"] == 9
    first = arr(sheet)[14:78, 0:64]
    base0, _ = previewer.generate(**KW, seed=0)
    assert np.array_equal(first, arr(base0)), "strength 0 column is the base image"


def test_non_finite_adapters_are_refused_and_the_loaded_one_stays(previewer, adapters):
    """The corpus' NaN/Inf adapters (tests/bad_inputs/models) would render black images: refused with a message, and an
    adapter already loaded under the same name is kept."""
    from trainer.preview.previewer import AdapterError

    corpus = Path(__file__).parent / "bad_inputs"
    cases = [c for c in json.loads((corpus / "manifest.json").read_text()) if c["name"] in ("adapter-nan", "adapter-inf")]
    assert len(cases) == 2
    previewer.load_adapter(adapters["a"][1], name="mine")
    for case in cases:
        with pytest.raises(AdapterError, match=case["says"]) as err:
            previewer.load_adapter(corpus / "models" / case["files"][0], name="mine")
        assert case["files"][0] in str(err.value) and "\n" not in str(err.value)
    assert previewer.adapters["mine"].path == str(adapters["a"][1])


# ----------------------------------------------------------------------------- the worker process and the UI


def test_worker_protocol(tiny_base, adapters, tmp_path):
    from app import preview_client as client

    outputs = tmp_path / "outputs"
    worker = client.Worker(str(tiny_base), outputs)
    try:
        state = worker.request("state")
        assert state["base"] == str(tiny_base) and state["device"] == "cpu"
        res = worker.request("compare", files={"A": str(adapters["a"][0])}, adapters={"A": 1.0}, seed=0,
                             out=str(outputs / ".preview" / "x.png"), **KW)
        assert Path(res["image"]).is_file() and Path(res["base_image"]).is_file()
        assert res["swap_ms"] >= 0 and res["gen_ms"] > 0
        with pytest.raises(client.PreviewError, match="only .safetensors"):
            worker.request("load", path=str(tmp_path / "x.ckpt"), name="x")
        assert worker.request("release")["released"] is True
        assert worker.request("resume")["released"] is False
        assert worker.alive()
    finally:
        worker.close()
    assert not worker.alive()


def test_preview_tab_through_gradio_client(tiny_base, adapters, tmp_path):
    import shutil

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from app import jobs
    from app.ui import build_app
    from tests.test_app import free_port

    outputs = tmp_path / "outputs"
    run = outputs / "my-style"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'[model]\npath = "{tiny_base}"\n')
    (run / "job.json").write_text(json.dumps({"queued_at": time.time(), "pid": 1}))
    (run / "events.jsonl").write_text(json.dumps({"type": "done", "step": 1}) + "\n")
    shutil.copy(adapters["a"][0], run / "my-style.safetensors")
    shutil.copy(adapters["a"][1], run / "my-style.diffusers.safetensors")
    assert jobs.status(run).state == "done"

    demo = build_app(outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, allowed_paths=[str(outputs)], quiet=True)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "dl"))
        choices = c.predict(api_name="/preview_adapters")
        names = [v for _, v in choices["choices"]] if isinstance(choices, dict) else choices
        assert "run:my-style" in str(choices)
        base = c.predict("run:my-style", api_name="/preview_base")
        assert base == str(tiny_base)
        lora, base_img, status = c.predict("run:my-style", 1.0, "", 0.0, base, KW["prompt"], "", 2, 3.0, 7, 64, 64,
                                           api_name="/preview_compare")
        assert Path(lora).is_file() and Path(base_img).is_file()
        assert "swap" in status and "ms" in status
        grid, grid_status = c.predict("run:my-style", 1.0, "", 0.0, base, KW["prompt"], "", 2, 3.0, 7, 64, 64,
                                      api_name="/preview_grid")
        assert Path(grid).is_file() and "ms" in grid_status
        # images from a small base are shown enlarged, pixel for pixel (nearest-neighbour); the worker's file stays
        from PIL import Image

        shown = np.asarray(Image.open(lora))
        original = np.asarray(Image.open(outputs / ".preview" / "images" / Path(lora).name.replace("-x8", "")))
        assert original.shape[:2] == (64, 64) and shown.shape[:2] == (512, 512) and "shown 8× enlarged" in status
        assert np.array_equal(shown, original.repeat(8, axis=0).repeat(8, axis=1))
        # an uploaded kohya file is validated and offered
        up = c.predict(handle_file(str(adapters["b"][0])), base, api_name="/preview_upload")
        assert "style-b" in str(up)
        bad = tmp_path / "dl" / "bad.safetensors"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(b"junk")
        with pytest.raises(AppError, match="not a readable"):
            c.predict(handle_file(str(bad)), base, api_name="/preview_upload")
        # a refused file with the name of a good upload neither replaces nor deletes it
        stored = next((outputs / ".preview" / "adapters").glob("style-b.safetensors"))
        junk = tmp_path / "dl" / "junk" / "style-b.safetensors"
        junk.parent.mkdir()
        junk.write_bytes(bytes(100))
        with pytest.raises(AppError, match="style-b.safetensors: not a readable"):
            c.predict(handle_file(str(junk)), base, api_name="/preview_upload")
        nan = Path(__file__).parent / "bad_inputs" / "models" / "nan_adapter.safetensors"
        with pytest.raises(AppError, match="NaN/Inf"):
            c.predict(handle_file(str(nan)), base, api_name="/preview_upload")
        assert stored.read_bytes() == adapters["b"][0].read_bytes()
        assert "file:style-b.safetensors" in str(c.predict(api_name="/preview_adapters"))
        assert not list((outputs / ".preview" / "adapters").glob("*nan*"))
        # Generate without an adapter says what to do (no bare error boxes)
        none_lora, none_base, said = c.predict(None, 1.0, "", 0.0, base, KW["prompt"], "", 2, 3.0, 7, 64, 64,
                                              api_name="/preview_compare")
        assert none_lora is None and none_base is None and "No adapter picked" in said and "Train tab" in said
        # after a run the Preview tab lists it and preselects it (page load, opening the tab)
        restored = c.predict(api_name="/restore")
        assert restored[2]["value"] == "run:my-style", restored
        opened = c.predict(None, api_name="/preview_open")
        assert opened[0]["value"] == "run:my-style", opened
        assert names
    finally:
        demo.close()
        from app import preview_client as client

        client.shutdown()
    # nothing outside outputs/ (besides the client's downloads)
    assert {p.name for p in tmp_path.iterdir()} <= {"outputs", "dl"}
