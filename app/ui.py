"""Gradio layout and wiring. Logic lives in jobs.py (runs, queue, files) and form.py (config <-> widgets).

Every event has an api_name, so everything the page does can be scripted with gradio_client. No torch here:
training runs in child processes (jobs.start) and the page only reads their folders.
"""

from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from app import dataset_tab, form, jobs, preview, preview_client, saves_tab, tools_tab, uploads
from app.runs_view import (finished_since, fingerprint, list_fingerprint, panel_markdown,  # noqa: F401 (tests)
                           run_choices, run_dir_of, run_panel)
from trainer.config import ConfigError, list_presets

THUMB_PX = 72
TICK_S = 1.0


# ----------------------------------------------------------------------------- dataset tab


def _grid(outputs: Path, run_dir: Path | None, min_size: int | None) -> tuple[list[list[str]], str]:
    if run_dir is None:
        return [], "No dataset yet: drop images (and optional .txt captions, or a .zip of both) above."
    rows, error = uploads.dataset_items(run_dir, int(min_size or 64))
    table = [[f'<img src="/gradio_api/file={html.escape(r["path"])}" alt="{html.escape(r["file"])}" '
              f'style="height:{THUMB_PX}px;max-width:{2 * THUMB_PX}px;object-fit:contain">',
              r["file"], r["caption"], r["status"]] for r in rows]
    ok = sum(r["status"].startswith(("ok", "missing caption")) for r in rows)
    summary = f"**{run_dir.name}**: {len(rows)} images, {ok} usable"
    issues = [f"- `{r['file']}`: {r['status']}" for r in rows if r["status"] != "ok"]
    text = "\n".join([summary, *([f"\n⚠️ {error}"] if error else []), *issues])
    return table, text


def _latest_draft(outputs: Path, user: str | None = None) -> str:
    drafts = [st.name for st in jobs.list_runs(outputs) if st.state == "draft" and jobs.visible_to(st.run_dir, user)]
    return drafts[0] if drafts else ""


def on_upload(outputs: Path, files: list[str] | None, run: str, name: str, min_size: int | None,
              user: str | None = None):
    run_dir = run_dir_of(outputs, run, user)
    if run_dir is None or jobs.read_job(run_dir):  # a submitted run's dataset is frozen: start a new one
        run_dir = jobs.new_run_dir(outputs, name or "style-lora", owner=user)
    paths = [str(f) for f in (files or [])]
    _, problems = uploads.add_files(run_dir, paths, [Path(p).name for p in paths])
    for problem in problems[:5]:
        gr.Warning(problem)
    table, text = _grid(outputs, run_dir, min_size)
    if problems:
        text += "\n\n**Refused uploads**\n" + "\n".join(f"- {p}" for p in problems)
    return run_dir.name, table, text, None


def on_save_captions(outputs: Path, run: str, table: Any, min_size: int | None, user: str | None = None):
    run_dir = run_dir_of(outputs, run, user)
    if run_dir is None:
        gr.Warning("No dataset to save captions for")
        return "", [], "No dataset."
    rows = table.values.tolist() if hasattr(table, "values") else (table or [])
    if jobs.read_job(run_dir):  # that dataset belongs to a submitted run: edit a copy
        run_dir = jobs.fork_dataset(outputs, run_dir)
        gr.Info(f"{run} was already trained; the edited captions go to a copy, {run_dir.name}")
    refused = uploads.save_captions(run_dir, {str(r[1]): str(r[2] or "") for r in rows if len(r) > 2 and r[1]})
    for r in refused[:5]:
        gr.Warning(r)
    gr.Info(f"Saved {len(rows) - len(refused)} captions")
    return run_dir.name, *_grid(outputs, run_dir, min_size)


# ----------------------------------------------------------------------------- train tab


def on_preset(preset: str) -> dict:
    try:
        return form.preset_values(preset)
    except ConfigError as err:
        gr.Warning(str(err))
        return {}


def on_train(outputs: Path, run: str, preset: str, extra: str, values: dict[str, Any],
             user: str | None = None) -> tuple[str, str]:
    """Validate the form, write the run config and queue it. Returns (run name or "", status markdown)."""
    run_dir = run_dir_of(outputs, run, user)
    if run_dir is None:
        raise gr.Error("Add images on the Dataset tab first.", print_exception=False)
    rows, error = uploads.dataset_items(run_dir, int(values.get("data.min_image_size") or 64))
    if error or not any(r["status"].startswith(("ok", "missing")) for r in rows):
        raise gr.Error(f"The dataset has no usable image. {error}", print_exception=False)
    try:
        cfg = form.values_to_config(preset, values, extra)
    except ConfigError as err:
        raise gr.Error(str(err).replace("\n", "<br>"), print_exception=False) from None
    if jobs.read_job(run_dir):  # training the same dataset again: a new run folder with a copy of it
        run_dir = jobs.fork_dataset(outputs, run_dir)
    jobs.submit(run_dir, cfg)
    jobs.advance(outputs)
    state = jobs.status(run_dir).state
    return run_dir.name, f"Run **{run_dir.name}** {state}. Follow it on the Runs tab."


# ----------------------------------------------------------------------------- layout


def _widget(spec: form.FieldSpec, value: Any):
    info = form.help_markdown(spec)
    if spec.kind == "bool":
        return gr.Checkbox(value=value, label=spec.label, info=info)
    if spec.kind == "int":
        return gr.Number(value=value, label=spec.label, info=info, precision=0)
    if spec.kind == "float":
        return gr.Number(value=value, label=spec.label, info=info)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=value, label=spec.label, info=info)
    if spec.kind == "base":
        return gr.Dropdown(choices=form.BASE_CHOICES, value=value, label=spec.label, info=info, allow_custom_value=True)
    if spec.kind == "lines":
        return gr.Textbox(value=value, label=spec.label, info=info, lines=2)
    return gr.Textbox(value=value, label=spec.label, info=info)


def dataset_layout() -> SimpleNamespace:
    with gr.Tab("Dataset", id="dataset"):
        with gr.Row():
            run_name = gr.Textbox(value="my-style", label="Name for a new dataset/run", scale=1)
            new_btn = gr.Button("New dataset", scale=0)
        # No file_types: gradio would refuse a whole drop for one bad file; uploads.add_files names each refusal.
        upload = gr.File(file_count="multiple", type="filepath",
                         label="Drop images, .txt captions or a .zip of both", elem_id="upload")
        data_md = gr.Markdown(elem_id="dataset-status")
        grid = gr.Dataframe(headers=["image", "file", "caption", "status"], datatype=["html", "str", "str", "str"],
                            interactive=True, static_columns=[0, 1, 3], wrap=True, type="array",
                            label="Captions (edit the caption column, then Save captions)", elem_id="caption-grid")
        save_btn = gr.Button("Save captions")
        tools = dataset_tab.build()  # captioning with a model, bulk edits, tag table, concepts, summary
    return SimpleNamespace(run_name=run_name, new_btn=new_btn, upload=upload, data_md=data_md, grid=grid,
                           save_btn=save_btn, tools=tools)


def train_layout(defaults: dict[str, Any]) -> SimpleNamespace:
    with gr.Tab("Train", id="train"):
        preset = gr.Dropdown(choices=list_presets(), value=form.DEFAULT_PRESET, label="Preset",
                             info="demo-style: the demo style set on the demo base, ~3 min on a CPU; "
                             "tiny-test: seconds, random base; sd15-style and the other -style presets: real training on a full-size base")
        widgets: dict[str, Any] = {}
        with gr.Row():
            for spec in form.BASIC_SPECS[:2]:
                widgets[spec.path] = _widget(spec, defaults[spec.path])
        base_md = gr.Markdown(form.describe_base(defaults["model.path"]), elem_id="base-kind")
        with gr.Row():
            for spec in form.BASIC_SPECS[2:]:
                widgets[spec.path] = _widget(spec, defaults[spec.path])
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                for spec in form.ADVANCED_SPECS:
                    widgets[spec.path] = _widget(spec, defaults[spec.path])
            extra = gr.Textbox(label=form.EXTRA_LABEL, info=form.EXTRA_HELP, lines=3)
        train_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
        train_md = gr.Markdown(elem_id="train-status")
    return SimpleNamespace(preset=preset, widgets=widgets, base_md=base_md, extra=extra, train_btn=train_btn,
                           train_md=train_md)


def runs_layout() -> SimpleNamespace:
    with gr.Tab("Runs", id="runs"):
        with gr.Row():
            runs = gr.Dropdown(choices=[], label="Run", scale=3, elem_id="run-select", allow_custom_value=True)
            refresh_btn = gr.Button("Refresh", scale=0)
            cancel_btn = gr.Button("Cancel run", variant="stop", scale=0, elem_id="cancel-btn")
        panel_md = gr.Markdown(elem_id="run-status")
        with gr.Row():
            # y from 0: short, stable axis labels while points stream in
            loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", x_title="step", y_title="loss",
                                    y_lim=[0, None], height=260, scale=1)
            verdict_plot = gr.LinePlot(x="step", y="value", color="series", title="Style per save (report at 1.0)",
                                       x_title="step", y_title="value", y_lim=[0, 1], height=260, scale=1,
                                       elem_id="verdict-plot")
            samples = gr.Gallery(label="Samples", columns=4, height=260, scale=1)
        report_img = gr.Image(label="Style report: rows base / LoRA 0.5 / LoRA 1.0, held-out prompts",
                              interactive=False, height=260, elem_id="style-report")
        files = gr.File(label="Downloads: adapters and a zip of the run (which file for which tool: see above)",
                        file_count="multiple", interactive=False, elem_id="downloads")
        with gr.Accordion("Config and log", open=False):
            config_code = gr.Code(label="config.toml", language=None, interactive=False)
            log_box = gr.Textbox(label="train.log (end)", lines=12, max_lines=12, interactive=False)
    return SimpleNamespace(runs=runs, refresh_btn=refresh_btn, cancel_btn=cancel_btn, panel_md=panel_md,
                           loss_plot=loss_plot, verdict_plot=verdict_plot, samples=samples, report_img=report_img,
                           files=files, config_code=config_code, log_box=log_box)


def build_app(outputs: str | Path = "outputs") -> gr.Blocks:
    outputs = Path(outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    defaults = form.preset_values(form.DEFAULT_PRESET)

    with gr.Blocks(title="Style-LoRA Studio") as demo:
        gr.Markdown("# Style-LoRA Studio\nDrop images → check captions → pick settings → Train.")
        current = gr.Textbox(label="Current dataset (run folder)", interactive=False, elem_id="current-run")
        with gr.Tabs(selected="dataset") as tabs:
            ds, tr, rn = dataset_layout(), train_layout(defaults), runs_layout()
            preview_tab = preview.build_tab(outputs)  # app/preview.py: LoRA vs base, grids, mixing (own worker)
            saves_tab.build_tab(outputs)  # app/saves_tab.py: a run's saves, the X/Y grid, keep one
            tools_tab.build_tab(outputs, preview_tab)  # app/tools_tab.py: the LoRA toolbox (trainer lora ...)
        wire_dataset(outputs, current, ds, tr)
        wire_base(outputs, tr)
        wire_train(outputs, current, tr, rn, tabs)
        wire_runs(outputs, demo, current, rn, preview_tab)
    return demo


def wire_base(outputs: Path, tr: SimpleNamespace) -> None:
    def describe(path: str, request: gr.Request) -> str:
        return form.describe_base(path, jobs.user_of(request), outputs)

    tr.widgets["model.path"].change(describe, tr.widgets["model.path"], tr.base_md, api_name="describe_base")


def wire_dataset(outputs: Path, current, ds: SimpleNamespace, tr: SimpleNamespace) -> None:
    min_size = tr.widgets["data.min_image_size"]

    # Every handler takes the request: with --auth, a user sees and touches only their own runs.
    def upload_files(files: list[str] | None, run: str, name: str, min_image_size: int | None,
                     request: gr.Request):
        return on_upload(outputs, files, run, name, min_image_size, jobs.user_of(request))

    def save_grid(run: str, table: Any, min_image_size: int | None, request: gr.Request):
        return on_save_captions(outputs, run, table, min_image_size, jobs.user_of(request))

    def show_dataset(run: str, min_image_size: int | None, request: gr.Request):
        return _grid(outputs, run_dir_of(outputs, run, jobs.user_of(request)), min_image_size)

    shown = [current, ds.grid, ds.data_md]
    uploaded = ds.upload.upload(upload_files, [ds.upload, current, ds.run_name, min_size], [*shown, ds.upload],
                                api_name="upload")
    saved = ds.save_btn.click(save_grid, [current, ds.grid, min_size], shown, api_name="save_captions")
    dataset_events = [uploaded, saved,
                      *dataset_tab.wire(outputs, ds.tools, current, ds.grid, ds.data_md, min_size, _grid)]
    ds.new_btn.click(lambda: ("", [], "New dataset: drop images above."), None, shown, api_name="new_dataset")
    shown_dataset = current.change(show_dataset, [current, min_size], [ds.grid, ds.data_md], api_name="dataset")
    dataset_tab.wire_summary(outputs, ds.tools, current, tr.preset, tr.extra, tr.widgets,
                             [*dataset_events, shown_dataset])


def wire_train(outputs: Path, current, tr: SimpleNamespace, rn: SimpleNamespace, tabs) -> None:
    ordered = list(tr.widgets)  # field paths, in widget order

    def apply_preset(preset_name: str):
        values = on_preset(preset_name)
        return [values.get(k, gr.skip()) for k in ordered]

    tr.preset.change(apply_preset, tr.preset, [tr.widgets[k] for k in ordered], api_name="preset")
    rates = [tr.widgets[k] for k in form.LEARNING_RATES]
    tr.widgets["train.optimizer"].change(form.learning_rates_for, [tr.widgets["train.optimizer"], tr.preset, *rates],
                                         rates, api_name="optimizer")

    def train(run: str, preset_name: str, extra_lines: str, request: gr.Request, **fields: Any):
        values = {spec.path: fields[spec.key] for spec in form.ALL_SPECS}
        user = jobs.user_of(request)
        name, text = on_train(outputs, run, preset_name, extra_lines, values, user)
        return text, gr.Dropdown(choices=run_choices(outputs, user), value=name), gr.Tabs(selected="runs")

    tr.train_btn.click(train, inputs_kwargs={"run": current, "preset_name": tr.preset, "extra_lines": tr.extra,
                                             **{s.key: tr.widgets[s.path] for s in form.ALL_SPECS}},
                       outputs=[tr.train_md, rn.runs, tabs], api_name="train")


def wire_runs(outputs: Path, demo, current, rn: SimpleNamespace, preview_tab: dict) -> None:
    timer = gr.Timer(TICK_S)
    shown = gr.State("")  # fingerprint of what the panel shows, to skip redundant refreshes
    # the verdict plot last: the API's earlier outputs keep their places
    panel_outputs = [rn.panel_md, rn.loss_plot, rn.samples, rn.files, rn.config_code, rn.log_box, rn.report_img,
                     rn.verdict_plot]

    def panel(name: str, request: gr.Request):
        p = run_panel(outputs, name, jobs.user_of(request))
        import pandas as pd  # gradio depends on pandas; LinePlot wants a DataFrame

        # Typed columns: an untyped (object) frame makes the plot treat loss as categories. No rows: None, not an
        # empty frame (after an empty frame with a colour column gradio 6.31's plot draws no line for later data).
        loss = pd.DataFrame(p["loss"], columns=["step", "loss", "series"]).astype(
            {"step": "int64", "loss": "float64", "series": "object"}) if p["loss"] else None
        verdict = pd.DataFrame(p["verdict"], columns=["step", "value", "series"]).astype(
            {"step": "int64", "value": "float64", "series": "object"}) if p["verdict"] else None
        return (p["markdown"], loss, p["samples"], p["files"] or None, p["config"], p["log"], p["report_image"],
                verdict)

    def tick(name: str, seen: str, request: gr.Request):
        jobs.advance(outputs)  # the queue thread does this too; cheap and keeps tests deterministic
        user = jobs.user_of(request)
        statuses = jobs.list_runs(outputs)  # once per tick: the run list, its fingerprint, the preview's adapters
        listed = run_choices(outputs, user, statuses)
        panel_fp, list_fp = fingerprint(outputs, name, user), list_fingerprint(listed)
        old_panel, _, old_list = seen.partition("|")
        skip = gr.skip()
        values = panel(name, request) if panel_fp != old_panel else [skip] * len(panel_outputs)
        choices = gr.Dropdown(choices=listed) if list_fp != old_list else skip
        adapters = (skip, skip)
        if finished_since(old_list, list_fp):  # the Preview tab lists the new adapter and preselects it
            found = preview_client.adapter_choices(outputs, user, statuses)
            newest = preview_client.newest_run_adapter(outputs, user, statuses)
            adapters = (gr.Dropdown(choices=found, value=newest), gr.Dropdown(choices=[("(none)", "")] + found))
        return [*values, choices, *adapters, f"{panel_fp}|{list_fp}"]

    rn.runs.change(panel, rn.runs, panel_outputs, api_name="panel")

    def list_runs(request: gr.Request):
        return gr.Dropdown(choices=run_choices(outputs, jobs.user_of(request)))

    rn.refresh_btn.click(list_runs, None, rn.runs, api_name="list_runs")
    timer.tick(tick, [rn.runs, shown], [*panel_outputs, rn.runs, preview_tab["adapter"], preview_tab["adapter2"], shown],
               api_name="tick", show_progress="hidden")

    def cancel(name: str, request: gr.Request) -> str:
        run_dir = run_dir_of(outputs, name, jobs.user_of(request))
        if run_dir is None:
            raise gr.Error("Pick a run to cancel.", print_exception=False)
        msg = jobs.cancel(run_dir)
        gr.Info(msg)
        return msg

    rn.cancel_btn.click(cancel, rn.runs, rn.panel_md, api_name="cancel")

    def status_json(name: str, request: gr.Request) -> dict:
        run_dir = run_dir_of(outputs, name, jobs.user_of(request))
        if run_dir is None:
            return {"state": "unknown", "name": name}
        st = jobs.status(run_dir)
        return {"name": st.name, "state": st.state, "step": st.step, "total": st.total, "reason": st.reason,
                "adapters": [p.name for p in jobs.adapter_files(run_dir)],
                "samples": [p.name for p in jobs.sample_images(run_dir)]}

    status_out = gr.JSON(visible=False)
    gr.Button(visible=False).click(status_json, rn.runs, status_out, api_name="status")

    def on_load(request: gr.Request):
        user = jobs.user_of(request)
        draft = _latest_draft(outputs, user)
        choices = run_choices(outputs, user)
        active = next((c[1] for c in choices if c[0].endswith(("(running)", "(stopping)", "(reporting)"))), None)
        pick = active or (choices[0][1] if choices else None)
        adapters = preview_client.adapter_choices(outputs, user)
        return (draft, gr.Dropdown(choices=choices, value=pick),
                gr.Dropdown(choices=adapters, value=preview_client.newest_run_adapter(outputs, user)),
                gr.Dropdown(choices=[("(none)", "")] + adapters))

    demo.load(on_load, None, [current, rn.runs, preview_tab["adapter"], preview_tab["adapter2"]], api_name="restore")
