"""The Saves tab (gradio): a run's saves with their losses and verdicts, an X/Y grid over saves × strengths × prompts
× seeds × a second adapter's weight on the preview worker, the style report per save, "Use this save" and
"Delete the other saves". Values and actions are app/saves_view.py's."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr  # handlers' `request: gr.Request` annotations are resolved against this module

from app import jobs, preview_client, saves_view
from app.runs_view import run_choices, run_dir_of

_JOBS: dict[tuple, saves_view.GridJob] = {}  # (user, run) -> the grid being drawn


def layout() -> dict:
    with gr.Tab("Saves", id="saves") as tab:
        gr.Markdown("Pick the best save of a run: compare its `save_every` saves in a grid on the loaded base, run the "
                    "style report on them, then keep one as the run's downloads.")
        with gr.Row():
            run = gr.Dropdown(choices=[], label="Run", scale=3, elem_id="saves-run")
            refresh = gr.Button("Refresh", scale=0, elem_id="saves-refresh")
        table = gr.Dataframe(headers=saves_view.COLUMNS, interactive=False, elem_id="saves-table", wrap=True)
        with gr.Row():
            save = gr.Dropdown(choices=[], label="Save", scale=2, elem_id="saves-save")
            report_one = gr.Button("Style report on this save", scale=1, elem_id="saves-report-one")
            report_all = gr.Button("Style report on all saves", scale=1, elem_id="saves-report-all")
            use_btn = gr.Button("Use this save", variant="primary", scale=1, elem_id="saves-use")
            delete_btn = gr.Button("Delete the other saves…", variant="stop", scale=1, elem_id="saves-delete")
        with gr.Row(visible=False) as confirm_row:
            question = gr.Markdown(elem_id="saves-delete-question")
            yes = gr.Button("Yes, delete them", variant="stop", scale=0, elem_id="saves-delete-yes")
            no = gr.Button("No", scale=0)
        action = gr.Markdown(elem_id="saves-action")
        gr.Markdown("### Grid")
        with gr.Row():
            x = gr.Dropdown(saves_view.AXIS_CHOICES, value="saves", label="X axis", elem_id="saves-x")
            y = gr.Dropdown([("(none)", ""), *saves_view.AXIS_CHOICES], value="strength", label="Y axis",
                            elem_id="saves-y")
            saves = gr.Textbox(label="Saves (steps, comma-separated; empty = all)", elem_id="saves-list")
            strengths = gr.Textbox(value="0.5, 1.0", label="Strengths", elem_id="saves-strengths")
            seeds = gr.Textbox(value="0, 1, 2", label="Seeds", elem_id="saves-seeds")
        prompts = gr.Textbox(label="Prompts, one per line ({trigger} = the run's trigger; the first is used when "
                             "prompts is not an axis)", value="{trigger}, a red circle on a blue background, left",
                             lines=2, elem_id="saves-prompts")
        with gr.Row():
            strength = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Strength (when not an axis)")
            seed = gr.Number(value=0, precision=0, label="Seed (when not an axis; same for every cell)")
            steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="saves-steps")
            guidance = gr.Slider(0.0, 20.0, value=4.0, step=0.5, label="Guidance")
        with gr.Row():
            adapter2 = gr.Dropdown(choices=[("(none)", "")], value="", label="Second adapter (optional)")
            weight2 = gr.Slider(-1.0, 2.0, value=0.5, step=0.05, label="Second adapter weight")
            weights2 = gr.Textbox(value="0, 0.5, 1.0", label="Second adapter weights (axis)")
        with gr.Row():
            draw = gr.Button("Draw grid", variant="primary", elem_id="saves-grid-btn")
            cancel = gr.Button("Cancel grid", elem_id="saves-grid-cancel")
        status = gr.Markdown(elem_id="saves-grid-status")
        image = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="saves-grid-img")
        download = gr.File(label="Grid PNG (settings in its text chunks)", interactive=False, elem_id="saves-grid-png")
    return locals()


def build_tab(outputs: Path) -> dict:
    """The Saves tab; call inside the app's `gr.Tabs()`. Every event has an api_name."""
    outputs = Path(outputs)
    c = layout()
    grid_fields = [c[k] for k in ("x", "y", "saves", "strengths", "seeds", "weights2", "prompts", "strength", "seed",
                                  "steps", "guidance", "weight2")]

    def show(name: str | None, request: gr.Request):
        user = jobs.user_of(request)
        run_dir = run_dir_of(outputs, name, user)
        choices = saves_view.save_choices(run_dir)
        st = jobs.status(run_dir) if run_dir else None
        note = saves_view.report_state(run_dir, st.events) if st else ""
        return (saves_view.saves_table(run_dir) or None, gr.Dropdown(choices=choices, value=choices[-1][1] if choices
                                                                       else None), note)

    def runs(request: gr.Request):
        user = jobs.user_of(request)
        finished = [(label, n) for label, n in run_choices(outputs, user) if "(done)" in label or "(stopped)" in label]
        adapters = preview_client.adapter_choices(outputs, user)
        return gr.Dropdown(choices=finished), gr.Dropdown(choices=[("(none)", ""), *adapters])

    def on_draw(request: gr.Request, name: str | None, second: str, *values):
        user = jobs.user_of(request)
        run_dir = run_dir_of(outputs, name, user)
        if run_dir is None:
            yield gr.skip(), "**Pick a run** with saves first.", gr.skip()
            return
        form = dict(zip(("x", "y", "saves", "strengths", "seeds", "weights2", "prompts", "strength", "seed", "steps",
                         "guidance", "weight2"), values))
        try:
            pair = (second, str(preview_client.resolve(outputs, second, user)[0])) if second else None
            spec = saves_view.grid_spec(run_dir, form, pair)
        except (ValueError, preview_client.PreviewError, FileNotFoundError) as err:
            yield gr.skip(), f"**Could not draw the grid**: {str(err).splitlines()[0]}", gr.skip()
            return
        out = preview_client.preview_dir(outputs) / "grids" / f"{run_dir.name}-grid-{time.time_ns()}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        job = _JOBS[(user, name)] = saves_view.GridJob(outputs, spec, out)
        while not job.finished.wait(0.5):
            yield gr.skip(), job.status(), gr.skip()
        done = out.is_file()
        yield (str(out) if done else None), job.status(), (str(out) if done else None)

    def on_cancel(name: str | None, request: gr.Request):
        job = _JOBS.get((jobs.user_of(request), name))
        if job is not None:
            job.cancel()
        return "Cancelling after the current cell…" if job is not None and not job.finished.is_set() else gr.skip()

    def on_report(name: str | None, stem: str | None, every: bool, request: gr.Request):
        run_dir = run_dir_of(outputs, name, jobs.user_of(request))
        if run_dir is None or (not every and not stem):
            return "Pick a run and a save first."
        return saves_view.start_reports(outputs, run_dir, "all" if every else stem)

    def on_use(name: str | None, stem: str | None, request: gr.Request):
        run_dir = run_dir_of(outputs, name, jobs.user_of(request))
        if run_dir is None or not stem:
            return "Pick a run and a save first.", gr.skip()
        try:
            message = saves_view.use(outputs, run_dir, stem)
        except ValueError as err:
            message = f"**Could not use the save**: {err}"
        return message, saves_view.saves_table(run_dir) or None

    def on_delete_ask(name: str | None, request: gr.Request):
        run_dir = run_dir_of(outputs, name, jobs.user_of(request))
        q = saves_view.delete_question(run_dir) if run_dir else ""
        return gr.Row(visible=bool(q)), q, "" if q else "No other saves to delete."

    def on_delete(name: str | None, request: gr.Request):
        run_dir = run_dir_of(outputs, name, jobs.user_of(request))
        message = saves_view.delete(run_dir) if run_dir else "Pick a run first."
        return gr.Row(visible=False), message, saves_view.saves_table(run_dir) or None

    c["tab"].select(runs, None, [c["run"], c["adapter2"]], api_name="saves_open")
    c["refresh"].click(runs, None, [c["run"], c["adapter2"]], api_name="saves_runs").then(
        show, c["run"], [c["table"], c["save"], c["action"]])
    c["run"].change(show, c["run"], [c["table"], c["save"], c["action"]], api_name="saves_list")
    c["draw"].click(on_draw, [c["run"], c["adapter2"], *grid_fields], [c["image"], c["status"], c["download"]],
                    api_name="saves_grid")
    c["cancel"].click(on_cancel, c["run"], c["status"], api_name="saves_grid_cancel")
    def report_one(name: str | None, stem: str | None, request: gr.Request):
        return on_report(name, stem, False, request)

    def report_all(name: str | None, stem: str | None, request: gr.Request):
        return on_report(name, stem, True, request)

    c["report_one"].click(report_one, [c["run"], c["save"]], c["action"], api_name="saves_report")
    c["report_all"].click(report_all, [c["run"], c["save"]], c["action"], api_name="saves_report_all")
    c["use_btn"].click(on_use, [c["run"], c["save"]], [c["action"], c["table"]], api_name="saves_use")
    c["delete_btn"].click(on_delete_ask, c["run"], [c["confirm_row"], c["question"], c["action"]],
                          api_name="saves_delete_ask")
    c["yes"].click(on_delete, c["run"], [c["confirm_row"], c["action"], c["table"]], api_name="saves_delete")
    c["no"].click(lambda: gr.Row(visible=False), None, c["confirm_row"])
    return c
