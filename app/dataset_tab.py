"""The Dataset tab's tools, layout and wiring (logic: app/dataset_tools.py): caption with a model, bulk edits and
undo, the tag-frequency table (click a tag to select its images), concepts, and the dataset summary.
Every event has an api_name. No torch: captioning runs as a child process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr

from app import dataset_tools as dt
from app import form, jobs
from trainer.config import ConfigError


def build() -> dict[str, Any]:
    """The components; call inside the Dataset tab, below the caption grid. Wire them with `wire`."""
    with gr.Accordion("Caption with a model", open=False):
        gr.Markdown("Style LoRAs learn best from captions that describe the **content** only: the trigger word "
                    "stands for the style. The model runs in its own process; the first use of a hub id downloads it.")
        with gr.Row():
            cap_model = gr.Textbox(value=dt.DEFAULT_CAPTION_MODEL, label="Model: hub id or local folder", scale=3,
                                   info="Sentences: BLIP/GIT/Florence-2 (safetensors). Booru tags: a WD14 ONNX "
                                   "tagger, e.g. SmilingWolf/wd-swinv2-tagger-v3.")
            cap_mode = gr.Radio(dt.CAPTION_MODES, value="auto", label="Mode", scale=1,
                                info="auto: tags for an ONNX tagger, else sentences")
        with gr.Row():
            cap_strip = gr.Textbox(label="Strip style words", placeholder="watercolor, painting", scale=3,
                                   info="Removed from the generated captions (comma separated)")
            cap_overwrite = gr.Checkbox(False, label="Overwrite existing captions", scale=1)
        cap_btn = gr.Button("Caption with a model", variant="primary", elem_id="caption-btn")
        cap_md = gr.Markdown(elem_id="caption-status")
    with gr.Accordion("Bulk edit captions", open=False):
        with gr.Row():
            prefix = gr.Textbox(label="Add prefix", placeholder="e.g. the trigger word")
            suffix = gr.Textbox(label="Add suffix")
            remove_tag = gr.Textbox(label="Remove tags", placeholder="watermark, signature")
        with gr.Row():
            find = gr.Textbox(label="Find (literal, case-sensitive)")
            replace = gr.Textbox(label="Replace with")
            strip = gr.Textbox(label="Strip style words", placeholder="watercolor, painting")
        with gr.Row():
            apply_btn = gr.Button("Apply to captions", elem_id="bulk-btn")
            undo_btn = gr.Button("Undo last bulk edit", elem_id="undo-btn")
            clear_undo_btn = gr.Button("Clear undo history", elem_id="clear-undo-btn", size="sm")
        edit_md = gr.Markdown(elem_id="bulk-status")
        with gr.Row():
            tags_df = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], interactive=False,
                                   label="Tag frequency (click a tag to select its images)", elem_id="tag-table",
                                   scale=1, max_height=320)
            with gr.Column(scale=1):
                selected = gr.CheckboxGroup(choices=[], label="Selected images: captioning and bulk edits apply "
                                            "only to these (none selected = all)", elem_id="selected-images")
                clear_btn = gr.Button("Clear selection", size="sm")
        tag_box = gr.Textbox(visible=False)  # for scripts: select_tag(run, tag) does what a click does
    with gr.Accordion("Concepts: subfolders with their own trigger word, caption prefix and repeats", open=False):
        gr.Markdown(f"Saved as `{'{folder}'}/concept.toml` in the dataset (a `.zip` upload may carry them too). "
                    "Empty fields keep the defaults: the Train tab's trigger word, the folder's `N_` repeats.")
        with gr.Row():
            concept_folder = gr.Dropdown(choices=[], label="Subfolder", allow_custom_value=False)
            concept_trigger = gr.Textbox(label="Trigger word")
            concept_prefix = gr.Textbox(label="Caption prefix")
            concept_repeats = gr.Number(value=None, precision=0, minimum=0, label="Repeats (empty = default)")
        concept_btn = gr.Button("Save concept")
        concepts_md = gr.Markdown(elem_id="concepts")
    with gr.Accordion("Dataset summary (what training will see)", open=True):
        summary_md = gr.Markdown(elem_id="dataset-summary")
        summary_btn = gr.Button("Refresh summary", size="sm")
    return dict(cap_model=cap_model, cap_mode=cap_mode, cap_strip=cap_strip, cap_overwrite=cap_overwrite,
                cap_btn=cap_btn, cap_md=cap_md, prefix=prefix, suffix=suffix, remove_tag=remove_tag, find=find,
                replace=replace, strip=strip, apply_btn=apply_btn, undo_btn=undo_btn, clear_undo_btn=clear_undo_btn,
                edit_md=edit_md,
                tags_df=tags_df, selected=selected, clear_btn=clear_btn, tag_box=tag_box,
                concept_folder=concept_folder, concept_trigger=concept_trigger, concept_prefix=concept_prefix,
                concept_repeats=concept_repeats, concept_btn=concept_btn, concepts_md=concepts_md,
                summary_md=summary_md, summary_btn=summary_btn)


def _editable(outputs: Path, run: str, request) -> Path:
    try:
        run_dir, forked = dt.editable_dataset(outputs, run, jobs.user_of(request))
    except FileNotFoundError as err:
        raise gr.Error(str(err), print_exception=False) from None
    if forked:
        gr.Info(f"{run} was already trained; the edits go to a copy, {run_dir.name}")
    return run_dir


def wire(outputs: Path, c: dict[str, Any], current, grid, data_md, min_size, grid_fn: Callable) -> list:
    """The tools' events. `grid_fn(outputs, run_dir, min_size)` -> (table, markdown) redraws the caption grid.
    Returns the events that change the dataset (the summary refreshes after them)."""
    outputs = Path(outputs)

    def refreshed(run_dir: Path, min_image_size, keep: list[str] | None = None) -> tuple:
        """current, grid, grid markdown, tag table, selection (kept where the images still exist)."""
        table, text = grid_fn(outputs, run_dir, min_image_size)
        names = dt.image_names(run_dir)
        return (run_dir.name, table, text, dt.tag_rows(run_dir),
                gr.CheckboxGroup(choices=names, value=[n for n in keep or [] if n in names]))

    def caption(run: str, model: str, mode: str, overwrite: bool, strip_words: str, only: list[str],
                min_image_size, request: gr.Request):
        run_dir = _editable(outputs, run, request)
        events: list[dict] = []
        skip = gr.skip()
        yield run_dir.name, skip, skip, dt.progress_markdown(events), skip, skip
        for event in dt.caption_events(run_dir, model, mode, overwrite, strip_words, only or None):
            events.append(event)
            yield run_dir.name, skip, skip, dt.progress_markdown(events), skip, skip
        name, table, text, tags, choices = refreshed(run_dir, min_image_size, only)
        yield name, table, text, dt.progress_markdown(events), tags, choices

    def bulk(run: str, pre: str, suf: str, fnd: str, rep: str, tags: str, words: str, only: list[str],
             min_image_size, request: gr.Request):
        run_dir = _editable(outputs, run, request)
        messages = dt.bulk_edit(run_dir, pre, suf, fnd, rep, tags, words, only or None)
        name, table, text, tag_rows, choices = refreshed(run_dir, min_image_size, only)
        return name, table, text, "\n".join(f"- {m}" for m in messages), tag_rows, choices

    def undo(run: str, only: list[str], min_image_size, request: gr.Request):
        run_dir = _editable(outputs, run, request)
        message = dt.undo(run_dir)
        name, table, text, tag_rows, choices = refreshed(run_dir, min_image_size, only)
        return name, table, text, message, tag_rows, choices

    def clear(run: str, request: gr.Request):
        return dt.clear_undo(_editable(outputs, run, request))

    selected = c["selected"]
    captioned = c["cap_btn"].click(
        caption, [current, c["cap_model"], c["cap_mode"], c["cap_overwrite"], c["cap_strip"], selected, min_size],
        [current, grid, data_md, c["cap_md"], c["tags_df"], selected], api_name="caption")
    edit_outputs = [current, grid, data_md, c["edit_md"], c["tags_df"], selected]
    edited = c["apply_btn"].click(
        bulk, [current, *(c[k] for k in ("prefix", "suffix", "find", "replace", "remove_tag", "strip")), selected,
               min_size], edit_outputs, api_name="bulk_edit")
    undone = c["undo_btn"].click(undo, [current, selected, min_size], edit_outputs, api_name="undo_edit")
    c["clear_undo_btn"].click(clear, [current], [c["edit_md"]], api_name="clear_undo")
    return [captioned, edited, undone, _wire_tags_and_concepts(outputs, c, current)]


def _wire_tags_and_concepts(outputs: Path, c: dict[str, Any], current):
    """Tag clicks select images; the tools follow the current dataset; concepts are saved. Returns the
    save-concept event."""
    def select_tag(run: str, tag: str, request: gr.Request):
        run_dir = dt.readable_run(outputs, run, jobs.user_of(request))
        return gr.CheckboxGroup(value=dt.images_with_tag(run_dir, tag) if run_dir and tag else [])

    def clicked_tag(run: str, evt: gr.SelectData, request: gr.Request):
        row = evt.row_value or []
        return select_tag(run, str(row[0]) if row else str(evt.value), request)

    def tools(run: str, request: gr.Request):
        run_dir = dt.readable_run(outputs, run, jobs.user_of(request))
        folders = dt.concept_folders(run_dir)
        return (dt.tag_rows(run_dir), gr.CheckboxGroup(choices=dt.image_names(run_dir), value=[]),
                gr.Dropdown(choices=folders, value=folders[0] if folders else None), dt.concepts_markdown(run_dir))

    def save_concept(run: str, folder: str, trigger: str, prefix_text: str, repeats, request: gr.Request):
        run_dir = _editable(outputs, run, request)
        try:
            message = dt.save_concept(run_dir, folder or "", trigger, prefix_text or "", repeats)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        gr.Info(message)
        return run_dir.name, dt.concepts_markdown(run_dir)

    selected = c["selected"]
    c["tags_df"].select(clicked_tag, [current], selected, api_name="click_tag")
    gr.Button(visible=False).click(select_tag, [current, c["tag_box"]], selected, api_name="select_tag")
    c["clear_btn"].click(lambda: gr.CheckboxGroup(value=[]), None, selected, api_name="clear_selection")
    current.change(tools, current, [c["tags_df"], selected, c["concept_folder"], c["concepts_md"]],
                   api_name="dataset_tools")
    return c["concept_btn"].click(
        save_concept, [current, *(c[k] for k in ("concept_folder", "concept_trigger", "concept_prefix",
                                                 "concept_repeats"))], [current, c["concepts_md"]],
        api_name="save_concept")


def wire_summary(outputs: Path, c: dict, current, preset, extra, widgets: dict, events: list) -> None:
    """Refresh the dataset summary after every event that changes the dataset, with the Train form's settings
    (batch size, repeats, resolution and buckets decide the numbers)."""
    outputs = Path(outputs)

    def summary(run: str, preset_name: str, extra_lines: str, request: gr.Request, **fields: Any) -> str:
        values = {spec.path: fields[spec.key] for spec in form.ALL_SPECS}
        try:
            cfg = form.values_to_config(preset_name, values, extra_lines)
        except ConfigError as err:
            return f"⚠️ {str(err).splitlines()[0]}"
        return dt.summary_markdown(dt.readable_run(outputs, run, jobs.user_of(request)), cfg)

    kwargs = dict(inputs_kwargs={"run": current, "preset_name": preset, "extra_lines": extra,
                                 **{s.key: widgets[s.path] for s in form.ALL_SPECS}}, outputs=c["summary_md"])
    c["summary_btn"].click(summary, api_name="summary", **kwargs)
    for event in events:
        event.then(summary, show_progress="hidden", api_visibility="private", **kwargs)  # scripts call /summary
