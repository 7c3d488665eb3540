"""The Preview tab (gradio): LoRA vs base at one seed, strength × seed grids, mixing two adapters, uploads.
Everything it asks of the preview worker goes through app/preview_client.py, which holds no gradio code."""

from __future__ import annotations

from pathlib import Path

import gradio as gr  # handlers' `request: gr.Request` annotations are resolved against this module

from app.jobs import user_of
from app.preview_client import (DEFAULT_BASE, NO_ADAPTER, PreviewError, adapter_choices, base_size,
                                newest_run_adapter, render, resolve, status_line, upload)

# The tab's inputs, in the order gradio passes them (and the API takes them): read into one mapping by `form`.
FORM = ("adapter", "strength", "adapter2", "weight2", "base", "prompt", "negative", "steps", "guidance", "seed",
        "width", "height")


def form(values: tuple) -> dict:
    return dict(zip(FORM, values))


def image_settings(f: dict) -> dict:
    """The worker's image settings from the form (sizes rounded down to the VAE's multiple of 8)."""
    return dict(prompt=f["prompt"] or "", negative=f["negative"] or "", steps=int(f["steps"]),
                guidance=float(f["guidance"]), seed=int(f["seed"] or 0), width=int(f["width"]) // 8 * 8,
                height=int(f["height"]) // 8 * 8)


# ----------------------------------------------------------------------------- the tab


def tab_layout() -> tuple:
    """The tab's components, in the order build_tab unpacks them."""
    with gr.Tab("Preview", id="preview") as tab:
        gr.Markdown("Generate with a trained adapter beside the base model at the same seed. The base stays loaded in "
                    "a preview worker; switching adapters takes milliseconds.")
        with gr.Row():
            # choices are filled per user on page load (ui.on_load) and by Refresh
            adapter = gr.Dropdown(choices=[], label="Adapter", scale=3, elem_id="preview-adapter")
            strength = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Strength", scale=2)
            refresh = gr.Button("Refresh", scale=0)
        with gr.Row():
            adapter2 = gr.Dropdown(choices=[("(none)", "")], value="",
                                   label="Mix with a second adapter (optional)", scale=3)
            weight2 = gr.Slider(-1.0, 2.0, value=0.5, step=0.05, label="Second adapter weight", scale=2)
        with gr.Row():
            upload_file = gr.File(label="Upload an adapter (.safetensors, kohya/A1111 or diffusers layout)",
                                  type="filepath", scale=3)
            base = gr.Textbox(label="Base model", value=DEFAULT_BASE, scale=2,
                              info="Filled from the chosen run; uploaded adapters are checked against it.")
        prompt = gr.Textbox(label="Prompt", value="zkstyle, a red circle on a blue background", lines=2)
        negative = gr.Textbox(label="Negative prompt", value="")
        with gr.Row():
            steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
            guidance = gr.Slider(0.0, 20.0, value=7.0, step=0.5, label="Guidance")
            seed = gr.Number(value=0, precision=0, label="Seed")
            size = base_size(DEFAULT_BASE) or 512
            width = gr.Slider(16, 2048, value=size, step=8, label="Width")
            height = gr.Slider(16, 2048, value=size, step=8, label="Height")
        with gr.Row():
            compare_btn = gr.Button("Generate (LoRA vs base)", variant="primary", elem_id="preview-generate")
            grid_btn = gr.Button("Strength × seed grid", elem_id="preview-grid")
        status = gr.Markdown(elem_id="preview-status")
        with gr.Row():
            lora_img = gr.Image(label="With the adapter", type="filepath", interactive=False)
            base_img = gr.Image(label="Base model, same seed", type="filepath", interactive=False)
        grid_img = gr.Image(label="Strengths 0, 0.5, 1 (columns) × 3 seeds (rows)", type="filepath", interactive=False)
    return (tab, adapter, strength, refresh, adapter2, weight2, upload_file, base, prompt, negative, steps, guidance,
            seed, width, height, compare_btn, grid_btn, status, lora_img, base_img, grid_img)


def build_tab(outputs: Path):
    """The Preview tab; call inside the app's `gr.Tabs()`. Every event has an api_name."""
    outputs = Path(outputs)

    def picker(request: gr.Request):
        return gr.Dropdown(choices=adapter_choices(outputs, user_of(request)))

    def picker2(request: gr.Request):
        return gr.Dropdown(choices=[("(none)", "")] + adapter_choices(outputs, user_of(request)))

    (tab, adapter, strength, refresh, adapter2, weight2, upload_file, base, prompt, negative, steps, guidance,
     seed, width, height, compare_btn, grid_btn, status, lora_img, base_img, grid_img) = tab_layout()
    inputs = [adapter, strength, adapter2, weight2, base, prompt, negative, steps, guidance, seed, width, height]

    def on_base(b: str):
        size = base_size(b)  # the base's own resolution: a 1024 px SDXL or the 32 px demo base at its best
        return (gr.update(), gr.update()) if size is None else (size, size)

    base.change(on_base, base, [width, height], api_name="preview_base_size")

    def failed(err: Exception) -> str:
        # In the status line beside the button (and a toast), never as bare "Error" boxes on the image panels.
        message = str(err)
        if message != NO_ADAPTER:
            gr.Warning(message.splitlines()[0])
            message = f"**Could not generate**: {message}"
        return message

    def mix(f: dict) -> tuple:
        return f["adapter"], f["strength"], f["adapter2"], f["weight2"], f["base"]

    def on_compare(request: gr.Request, *values):  # values: the FORM inputs, in order
        f = form(values)
        try:
            r = render(outputs, "compare", *mix(f), image_settings(f), user_of(request))
        except (PreviewError, FileNotFoundError) as err:
            return None, None, failed(err)
        return r["image"], r["base_image"], status_line(r, f"seed {int(f['seed'] or 0)}")

    def on_grid(request: gr.Request, *values):
        f = form(values)
        settings = image_settings(f)
        first = settings.pop("seed")
        try:
            r = render(outputs, "grid", *mix(f),
                       {**settings, "strengths": [0.0, 0.5, 1.0], "seeds": [first, first + 1, first + 2]},
                       user_of(request))
        except (PreviewError, FileNotFoundError) as err:
            return None, failed(err)
        return r["image"], status_line(r, f"seeds {first}–{first + 2}")

    def on_pick(value: str, request: gr.Request):
        try:
            return resolve(outputs, value, user_of(request))[1] or gr.skip()
        except (PreviewError, FileNotFoundError):
            return gr.skip()

    def on_upload(path: str | None, b: str, request: gr.Request):
        if not path:
            return gr.skip(), gr.skip(), ""
        try:
            value = upload(outputs, path, b, user_of(request))
        except PreviewError as err:
            raise gr.Error(str(err), print_exception=False) from None
        choices = adapter_choices(outputs, user_of(request))
        return (gr.Dropdown(choices=choices, value=value), gr.Dropdown(choices=[("(none)", "")] + choices),
                f"Loaded **{value.removeprefix('file:')}**: it fits {b}.")

    compare_btn.click(on_compare, inputs, [lora_img, base_img, status], api_name="preview_compare")
    grid_btn.click(on_grid, inputs, [grid_img, status], api_name="preview_grid")
    refresh.click(picker, None, adapter, api_name="preview_adapters").then(picker2, None, adapter2,
                                                                              api_name="preview_adapters2")
    adapter.change(on_pick, adapter, base, api_name="preview_base")

    def on_open(current: str | None, request: gr.Request):
        """Opening the tab lists what finished meanwhile; with nothing valid picked, the newest run is preselected."""
        user = user_of(request)
        choices = adapter_choices(outputs, user)
        value = current if current in {v for _, v in choices} else newest_run_adapter(outputs, user)
        return gr.Dropdown(choices=choices, value=value), gr.Dropdown(choices=[("(none)", "")] + choices)

    tab.select(on_open, adapter, [adapter, adapter2], api_name="preview_open")
    upload_file.upload(on_upload, [upload_file, base], [adapter, adapter2, status], api_name="preview_upload")
    return {"adapter": adapter, "adapter2": adapter2, "status": status}
