"""The Tools tab (gradio): the LoRA toolbox (`python -m trainer lora ...`) on the user's own files. Pick a run's
adapter, a save, an earlier result or an upload; choose Info, Resize, Merge, Bake, Extract or Edit metadata; Run. The
command runs as a child process (Cancel ends it); the result box shows its summary, or its error in one line.
Results land in the user's tools folder and are listed in Preview. Values and actions are app/tools_view.py's."""

from __future__ import annotations

from pathlib import Path

import gradio as gr  # handlers' `request: gr.Request` annotations are resolved against this module

from app import jobs, preview_client, tools_job, tools_view
from app.tools_view import COMMANDS, FORM, METHODS, ToolError

_JOBS: dict[str | None, tools_job.ToolJob] = {}  # user -> the command running for them (one at a time)

# The fields each command shows (the file picker, Run and the result box are always shown).
SHOWN = {"rank_row": ("Resize", "Merge", "Extract"), "files_row": ("Merge", "Bake"),
         "extract_row": ("Extract",), "meta_box": ("Edit metadata",),
         "out_row": ("Resize", "Merge", "Bake", "Extract", "Edit metadata")}
HELP = {
    "Info": "Layout, base, variant, ranks, metadata, hashes and the tools that load the picked file exactly.",
    "Resize": "The picked file (any variant) as a plain LoRA of another rank, by SVD: a fixed rank, or a rank per "
              "module chosen from its singular values (dynamic, as kohya's resize_lora.py).",
    "Merge": "One LoRA whose change is the weighted sum of the listed files: exact (ranks concatenated) without a "
             "rank, or reduced to the rank given.",
    "Bake": "The listed LoRAs merged into the base model: a full checkpoint (a .safetensors name: one file; any "
            "other name: a folder). Use it as the base model in Preview.",
    "Extract": "A LoRA from the difference between the base model and a fine-tuned checkpoint.",
    "Edit metadata": "Title, author, trigger, tags, description and a thumbnail written into a copy of the picked "
                     "file; the tensors stay byte-identical.",
}


def layout() -> dict:
    with gr.Tab("Tools", id="tools") as tab:
        gr.Markdown("The LoRA toolbox on your files: inspect, resize, merge, bake, extract and tag. Every command "
                    "writes a new file (never over an existing one unless you tick *Replace*), in the layout it read "
                    "unless *Output layout* says otherwise; results are listed here and in Preview.")
        with gr.Row():
            file = gr.Dropdown(choices=[], label="LoRA file (your runs, saves, results and uploads)", scale=3,
                               elem_id="tools-file")
            refresh = gr.Button("Refresh", scale=0, elem_id="tools-refresh")
            upload = gr.File(label="Upload a LoRA (.safetensors)", type="filepath", scale=2, height=110,
                             elem_id="tools-upload")
        command = gr.Radio(list(COMMANDS), value="Info", label="Command", elem_id="tools-command")
        help_md = gr.Markdown(HELP["Info"], elem_id="tools-help")
        with gr.Row(visible=False) as rank_row:
            rank = gr.Number(label="Rank", precision=0, value=None, minimum=1, elem_id="tools-rank")
            dynamic = gr.Dropdown([("(fixed rank)", ""), *METHODS], value="", label="Dynamic rank (rank: the largest)",
                                  elem_id="tools-dynamic")
            param = gr.Number(label="Dynamic parameter X", value=None, elem_id="tools-param")
            conv_rank = gr.Number(label="Conv rank (3x3 convolutions; Resize: 0 = the rank; Extract: 0 = leave out)",
                                  precision=0, value=0, minimum=0)
            to = gr.Dropdown([("same as the input", ""), ("kohya / A1111", "kohya"), ("diffusers", "diffusers")],
                             value="", label="Output layout", elem_id="tools-to")
        with gr.Row(visible=False) as files_row:
            files = gr.Textbox(label="LoRA files and weights: FILE:WEIGHT, one a line", lines=3, scale=3,
                               elem_id="tools-files")
            add = gr.Button("Add the picked file", scale=0, elem_id="tools-add")
        model = gr.Textbox(label="Base model", elem_id="tools-model",
                           info="Bake: the checkpoint to bake into; Extract: the original. Info/Resize/Merge: only for "
                           "DoRA files (optional). builtin:..., a hub id, a .safetensors file or a folder.")
        with gr.Row(visible=False) as extract_row:
            tuned = gr.Textbox(label="Fine-tuned checkpoint", scale=3, elem_id="tools-tuned")
        with gr.Group(visible=False) as meta_box:
            with gr.Row():
                title = gr.Textbox(label="Title", elem_id="tools-title")
                author = gr.Textbox(label="Author")
                trigger = gr.Textbox(label="Trigger words")
                tags = gr.Textbox(label="Tags (comma-separated)")
            with gr.Row():
                description = gr.Textbox(label="Description", lines=2, scale=3)
                thumbnail = gr.Image(label="Thumbnail", type="filepath", height=160, scale=1)
        with gr.Row(visible=False) as out_row:
            out_name = gr.Textbox(label="Output file name", placeholder="empty: named after the input and command",
                                  scale=3, elem_id="tools-out")
            overwrite = gr.Checkbox(label="Replace an existing file of that name", elem_id="tools-overwrite")
        with gr.Row():
            run = gr.Button("Run", variant="primary", elem_id="tools-run")
            cancel = gr.Button("Cancel", variant="stop", scale=0, elem_id="tools-cancel")
        result = gr.Textbox(label="Result", lines=10, max_lines=30, interactive=False, elem_id="tools-result")
        download = gr.File(label="The written file", interactive=False, elem_id="tools-download")
    return locals()


def _form_values(c: dict) -> list:
    return [c[k] for k in FORM]


def build_tab(outputs: Path, preview_tab: dict | None = None) -> dict:
    """The Tools tab; call inside the app's `gr.Tabs()`. `preview_tab`: Preview's pickers, refreshed after a result.
    Every event has an api_name."""
    outputs = Path(outputs)
    c = layout()
    groups = list(SHOWN)
    previews = [preview_tab["adapter"], preview_tab["adapter2"]] if preview_tab else []

    def picker(current: str | None, request: gr.Request):
        choices = tools_view.lora_choices(outputs, jobs.user_of(request))
        values = [v for _, v in choices]
        return gr.Dropdown(choices=choices, value=current if current in values else (values[0] if values else None))

    def show_fields(command: str):
        return [gr.update(visible=command in SHOWN[g]) for g in groups] + [HELP.get(command, "")]

    def on_upload(path: str | None, request: gr.Request):
        if not path:
            return gr.skip(), gr.skip()
        user = jobs.user_of(request)
        try:
            value = tools_view.store_upload(outputs, path, user)
        except (ToolError, OSError) as err:
            return gr.skip(), f"Error: {str(err).splitlines()[0]}"
        choices = tools_view.lora_choices(outputs, user)
        return gr.Dropdown(choices=choices, value=value), f"Uploaded {value.removeprefix('upload:')}."

    def on_add(value: str | None, lines: str):
        if not value:
            return gr.skip()
        kept = [x for x in (lines or "").splitlines() if x.strip()]
        return "\n".join([*kept, f"{value}:1.0"])

    def on_run(request: gr.Request, *values):
        user = jobs.user_of(request)
        skip = gr.skip()
        running = _JOBS.get(user)
        if running is not None and not running.finished.is_set():
            yield "A command is still running: wait for it or Cancel it.", skip, skip, *[skip] * len(previews)
            return
        try:
            f = dict(zip(FORM, values))
            args, out = tools_view.build_args(outputs, f, user)
            base = tools_view.source_base(outputs, f, user)
        except ToolError as err:
            yield f"Error: {str(err).splitlines()[0]}", None, skip, *[skip] * len(previews)
            return
        job = _JOBS[user] = tools_job.ToolJob(outputs, args, out, base)
        yield f"Running `lora {args[0]}`…", None, skip, *[skip] * len(previews)
        while not job.wait(0.5):
            yield skip, skip, skip, *[skip] * len(previews)
        written = Path(job.result.get("out") or out) if job.result and out else None
        tools_view.remember_base(outputs, written, base, user)
        download = str(written) if written is not None and written.is_file() else None
        choices = tools_view.lora_choices(outputs, user)
        shown = values[FORM.index("file")]
        lists = []
        if previews:
            found = preview_client.adapter_choices(outputs, user)
            lists = [gr.Dropdown(choices=found), gr.Dropdown(choices=[("(none)", ""), *found])]
        yield tools_job.result_text(job), download, gr.Dropdown(choices=choices, value=shown), *lists

    def on_cancel(request: gr.Request):
        job = _JOBS.get(jobs.user_of(request))
        if job is None or job.finished.is_set():
            return gr.skip()
        job.cancel()
        return "Cancelling…"

    c["tab"].select(picker, c["file"], c["file"], api_name="tools_open")
    c["refresh"].click(picker, c["file"], c["file"], api_name="tools_files")
    c["command"].change(show_fields, c["command"], [*[c[g] for g in groups], c["help_md"]], api_name="tools_fields")
    c["upload"].upload(on_upload, c["upload"], [c["file"], c["result"]], api_name="tools_upload")
    c["add"].click(on_add, [c["file"], c["files"]], c["files"], api_name="tools_add")
    c["run"].click(on_run, _form_values(c), [c["result"], c["download"], c["file"], *previews], api_name="tools_run")
    c["cancel"].click(on_cancel, None, c["result"], api_name="tools_cancel")
    return c
