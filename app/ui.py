"""Gradio layout and wiring. Logic lives in jobs.py (runs, queue, files) and form.py (config <-> widgets).

Every event has an api_name, so everything the page does can be scripted with gradio_client. No torch here:
training runs in child processes (jobs.start) and the page only reads their folders.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from app import downloads_view, form, jobs, loss_view, preview, report_view, uploads
from trainer import arch
from trainer.config import ConfigError

THUMB_PX = 72
TICK_S = 1.0


# ----------------------------------------------------------------------------- dataset tab


def _user(request: gr.Request | None) -> str | None:
    """The logged-in user (server started with --auth), else None: a local single-user server."""
    return getattr(request, "username", None) or None


def _run_dir(outputs: Path, name: str | None, user: str | None = None) -> Path | None:
    """The run's folder, or None when there is no such run or it belongs to another logged-in user."""
    try:
        run_dir = jobs.run_path(outputs, name) if name else None
    except FileNotFoundError:
        return None
    return run_dir if run_dir is not None and jobs.visible_to(run_dir, user) else None


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
    run_dir = _run_dir(outputs, run, user)
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
    run_dir = _run_dir(outputs, run, user)
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
    run_dir = _run_dir(outputs, run, user)
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


# ----------------------------------------------------------------------------- runs tab


def _run_choices(outputs: Path, user: str | None = None) -> list[tuple[str, str]]:
    return [(f"{st.name} ({st.state})", st.name)
            for st in jobs.list_runs(outputs) if st.state != "draft" and jobs.visible_to(st.run_dir, user)]


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def panel_markdown(st: jobs.RunStatus, queue_pos: int | None = None) -> str:
    steps = [e for e in st.events if e.get("type") == "step"]
    last = steps[-1] if steps else {}
    head = f"### {st.name}: {st.state}"
    if st.state == "queued" and queue_pos:
        head += f" (position {queue_pos} in the queue)"
    mem = last.get("gpu_mem_gib")
    facts = [f"step **{st.step}/{st.total or '?'}**",
             f"loss {last['loss']:.4f}" if "loss" in last else "loss —",
             loss_view.last_validation(st.events),
             f"{last['it_s']:.2f} it/s" if last.get("it_s") else "— it/s",
             f"ETA {_fmt_s(last.get('eta_s'))}" if st.state == "running" else "",
             f"GPU mem {mem:.2f} GiB" if mem is not None else "GPU mem — (CPU)"]
    lines = [head, " · ".join(f for f in facts if f)]
    start = next((e for e in st.events if e.get("type") == "start"), None)
    if start:
        precision = {"no": "fp32"}.get(start.get("precision"), start.get("precision"))
        base = arch.describe(start["base_kind"], start.get("prediction_type", "")) if start.get("base_kind") else "base"
        lines.append(f"{start.get('images')} images on {start.get('device')} ({precision}); {base}")
    problems = [e for e in st.events if e.get("type") == "problem"]
    if problems:
        lines.append("Skipped or warned: " + "; ".join(f"`{Path(p['path']).name}`: {p['reason']}" for p in problems[:10]))
    if st.state == "failed":
        lines.append(f"**Failed**: {st.reason.splitlines()[0]}\n```\n" + "\n".join(st.reason.splitlines()[1:]) + "\n```")
    if st.state == "stopped":
        lines.append("Cancelled: a partial adapter was saved.")
    return "\n\n".join(lines)


def run_panel(outputs: Path, name: str, user: str | None = None) -> dict[str, Any]:
    """Everything the live panel shows for one run, as plain values."""
    run_dir = _run_dir(outputs, name, user)
    if run_dir is None:
        return {"markdown": "Pick a run.", "loss": [], "samples": [], "files": [], "config": "", "log": "",
                "state": "", "report_image": None}
    st = jobs.status(run_dir)
    queued = sorted((s for s in jobs.list_runs(outputs) if s.state == "queued"),
                    key=lambda s: jobs.read_job(s.run_dir).get("queued_at", 0))
    pos = next((i + 1 for i, s in enumerate(queued) if s.name == name), None)
    files = [str(p) for p in jobs.adapter_files(run_dir)]
    if st.state in jobs.TERMINAL:
        files.append(str(jobs.run_zip(run_dir)))
    config = run_dir / "config.toml"
    return {
        "markdown": "\n\n".join(filter(None, [panel_markdown(st, pos),
                                                report_view.report_markdown(st.state, st.events),
                                                downloads_view.downloads_markdown(jobs.adapter_files(run_dir))])),
        "report_image": report_view.report_image(run_dir, st.events),
        "loss": loss_view.loss_rows(st.events),  # training and validation loss, one series each
        "samples": [(str(p), p.stem) for p in jobs.sample_images(run_dir)],
        "files": files,
        "config": config.read_text(encoding="utf-8") if config.is_file() else "",
        "log": jobs.log_tail(run_dir, 40),
        "state": st.state,
    }


def _fingerprint(outputs: Path, name: str, user: str | None = None) -> str:
    run_dir = _run_dir(outputs, name, user)
    if run_dir is None:
        return f"none:{name}"
    sizes = [(run_dir / f).stat().st_size if (run_dir / f).exists() else -1 for f in ("events.jsonl", "train.log")]
    return f"{name}:{jobs.status(run_dir).state}:{sizes}:{len(jobs.adapter_files(run_dir))}"


def _list_fingerprint(outputs: Path, user: str | None = None) -> str:
    return ",".join(f"{label}" for label, _ in _run_choices(outputs, user))


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


def build_app(outputs: str | Path = "outputs") -> gr.Blocks:
    outputs = Path(outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    defaults = form.preset_values(form.DEFAULT_PRESET)

    with gr.Blocks(title="Style-LoRA Studio") as demo:
        gr.Markdown("# Style-LoRA Studio\nDrop images → check captions → pick settings → Train.")
        current = gr.Textbox(label="Current dataset (run folder)", interactive=False, elem_id="current-run")
        with gr.Tabs(selected="dataset") as tabs:
            with gr.Tab("Dataset", id="dataset"):
                with gr.Row():
                    run_name = gr.Textbox(value="my-style", label="Name for a new dataset/run", scale=1)
                    new_btn = gr.Button("New dataset", scale=0)
                # No file_types: gradio would refuse a whole drop for one bad file;
                # uploads.add_files names each refusal instead.
                upload = gr.File(file_count="multiple", type="filepath",
                                 label="Drop images, .txt captions or a .zip of both", elem_id="upload")
                data_md = gr.Markdown(elem_id="dataset-status")
                grid = gr.Dataframe(headers=["image", "file", "caption", "status"], datatype=["html", "str", "str", "str"],
                                    interactive=True, static_columns=[0, 1, 3], wrap=True, type="array",
                                    label="Captions (edit the caption column, then Save captions)", elem_id="caption-grid")
                save_btn = gr.Button("Save captions")
            with gr.Tab("Train", id="train"):
                preset = gr.Dropdown(choices=form.list_preset_names(), value=form.DEFAULT_PRESET, label="Preset",
                                     info="demo-style: the demo style set on the demo base, ~2 min on a CPU; "
                                     "tiny-test: seconds, random base; sd15-style: real SD1.5 training")
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
            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    runs = gr.Dropdown(choices=[], label="Run", scale=3, elem_id="run-select",
                                       allow_custom_value=True)
                    refresh_btn = gr.Button("Refresh", scale=0)
                    cancel_btn = gr.Button("Cancel run", variant="stop", scale=0, elem_id="cancel-btn")
                panel_md = gr.Markdown(elem_id="run-status")
                with gr.Row():
                    # y from 0: short, stable axis labels while points stream in
                    loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", x_title="step",
                                            y_title="loss",
                                            y_lim=[0, None], height=260, scale=1)
                    samples = gr.Gallery(label="Samples", columns=4, height=260, scale=1)
                report_img = gr.Image(label="Style report: rows base / LoRA 0.5 / LoRA 1.0, held-out prompts",
                                      interactive=False, height=260, elem_id="style-report")
                files = gr.File(label="Downloads: adapters and a zip of the run (which file for which tool: see above)",
                                file_count="multiple", interactive=False, elem_id="downloads")
                with gr.Accordion("Config and log", open=False):
                    config_code = gr.Code(label="config.toml", language=None, interactive=False)
                    log_box = gr.Textbox(label="train.log (end)", lines=12, max_lines=12, interactive=False)
            preview_tab = preview.build_tab(outputs)  # app/preview.py: LoRA vs base, grids, mixing (own worker)
        timer = gr.Timer(TICK_S)
        shown = gr.State("")  # fingerprint of what the panel shows, to skip redundant refreshes

        widgets["model.path"].change(form.describe_base, widgets["model.path"], base_md, api_name="describe_base")

        # -- dataset
        min_size = widgets["data.min_image_size"]

        # Every handler takes the request: with --auth, a user sees and touches only their own runs.
        def upload_files(files: list[str] | None, run: str, name: str, min_image_size: int | None,
                         request: gr.Request):
            return on_upload(outputs, files, run, name, min_image_size, _user(request))

        def save_grid(run: str, table: Any, min_image_size: int | None, request: gr.Request):
            return on_save_captions(outputs, run, table, min_image_size, _user(request))

        def show_dataset(run: str, min_image_size: int | None, request: gr.Request):
            return _grid(outputs, _run_dir(outputs, run, _user(request)), min_image_size)

        upload.upload(upload_files, [upload, current, run_name, min_size], [current, grid, data_md, upload],
                      api_name="upload")
        save_btn.click(save_grid, [current, grid, min_size], [current, grid, data_md], api_name="save_captions")
        new_btn.click(lambda: ("", [], "New dataset: drop images above."), None, [current, grid, data_md],
                      api_name="new_dataset")
        current.change(show_dataset, [current, min_size], [grid, data_md], api_name="dataset")

        # -- train
        ordered = list(widgets)  # field paths, in widget order
        def apply_preset(preset_name: str):
            values = on_preset(preset_name)
            return [values.get(k, gr.skip()) for k in ordered]

        preset.change(apply_preset, preset,
                      [widgets[k] for k in ordered], api_name="preset")

        def train(run: str, preset_name: str, extra_lines: str, request: gr.Request, **fields: Any):
            values = {spec.path: fields[spec.key] for spec in form.ALL_SPECS}
            user = _user(request)
            name, text = on_train(outputs, run, preset_name, extra_lines, values, user)
            return text, gr.Dropdown(choices=_run_choices(outputs, user), value=name), gr.Tabs(selected="runs")

        train_btn.click(train, inputs_kwargs={"run": current, "preset_name": preset, "extra_lines": extra,
                                              **{s.key: widgets[s.path] for s in form.ALL_SPECS}},
                        outputs=[train_md, runs, tabs], api_name="train")

        # -- runs: live panel
        panel_outputs = [panel_md, loss_plot, samples, files, config_code, log_box, report_img]

        def panel(name: str, request: gr.Request):
            p = run_panel(outputs, name, _user(request))
            import pandas as pd  # gradio depends on pandas; LinePlot wants a DataFrame

            # Typed columns even when empty: an untyped (object) frame makes the plot treat loss as categories.
            loss = pd.DataFrame(p["loss"], columns=["step", "loss", "series"]).astype(
                {"step": "int64", "loss": "float64", "series": "string"})
            return p["markdown"], loss, p["samples"], p["files"] or None, p["config"], p["log"], p["report_image"]

        def tick(name: str, seen: str, request: gr.Request):
            jobs.advance(outputs)  # the queue thread does this too; cheap and keeps tests deterministic
            user = _user(request)
            panel_fp, list_fp = _fingerprint(outputs, name, user), _list_fingerprint(outputs, user)
            old_panel, _, old_list = seen.partition("|")
            skip = gr.skip()
            values = panel(name, request) if panel_fp != old_panel else [skip] * len(panel_outputs)
            choices = gr.Dropdown(choices=_run_choices(outputs, user)) if list_fp != old_list else skip
            return [*values, choices, f"{panel_fp}|{list_fp}"]

        runs.change(panel, runs, panel_outputs, api_name="panel")
        def list_runs(request: gr.Request):
            return gr.Dropdown(choices=_run_choices(outputs, _user(request)))

        refresh_btn.click(list_runs, None, runs, api_name="list_runs")
        timer.tick(tick, [runs, shown], [*panel_outputs, runs, shown], api_name="tick", show_progress="hidden")

        def cancel(name: str, request: gr.Request) -> str:
            run_dir = _run_dir(outputs, name, _user(request))
            if run_dir is None:
                raise gr.Error("Pick a run to cancel.", print_exception=False)
            msg = jobs.cancel(run_dir)
            gr.Info(msg)
            return msg

        cancel_btn.click(cancel, runs, panel_md, api_name="cancel")

        def status_json(name: str, request: gr.Request) -> dict:
            run_dir = _run_dir(outputs, name, _user(request))
            if run_dir is None:
                return {"state": "unknown", "name": name}
            st = jobs.status(run_dir)
            return {"name": st.name, "state": st.state, "step": st.step, "total": st.total, "reason": st.reason,
                    "adapters": [p.name for p in jobs.adapter_files(run_dir)],
                    "samples": [p.name for p in jobs.sample_images(run_dir)]}

        status_out = gr.JSON(visible=False)
        gr.Button(visible=False).click(status_json, runs, status_out, api_name="status")

        def on_load(request: gr.Request):
            user = _user(request)
            draft = _latest_draft(outputs, user)
            choices = _run_choices(outputs, user)
            active = next((c[1] for c in choices if c[0].endswith(("(running)", "(stopping)", "(reporting)"))), None)
            pick = active or (choices[0][1] if choices else None)
            adapters = preview.adapter_choices(outputs, user)
            return (draft, gr.Dropdown(choices=choices, value=pick), gr.Dropdown(choices=adapters),
                    gr.Dropdown(choices=[("(none)", "")] + adapters))

        demo.load(on_load, None, [current, runs, preview_tab["adapter"], preview_tab["adapter2"]], api_name="restore")
    return demo
