"""The Dataset tab's tools: captioning with a model (a child process, `python -m trainer caption`, so the UI never
imports torch), bulk caption edits with undo, the tag-frequency table, concepts (concept.toml per subfolder) and
the dataset summary. No gradio, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from app import jobs
from trainer.data import caption_edit as ce
from trainer.data.concepts import CONCEPT_FILE, Concept, ConceptError, read_concept, write_concept
from trainer.config import Config

CAPTION_CMD = [sys.executable, "-m", "trainer", "caption"]  # + DATASET --model=... (tests may swap it)
CAPTION_LOG = "caption.log"
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"
CAPTION_MODES = ["auto", "sentence", "tags"]


def readable_run(outputs: Path, run: str | None, user: str | None) -> Path | None:
    """The run folder to read, or None for no run or another user's run."""
    try:
        run_dir = jobs.run_path(Path(outputs), run) if run else None
    except FileNotFoundError:
        return None
    return run_dir if run_dir is not None and jobs.visible_to(run_dir, user) else None


def editable_dataset(outputs: Path, run: str | None, user: str | None) -> tuple[Path, bool]:
    """(run folder whose dataset may change, forked). A submitted run's dataset is frozen: edits go to a new
    draft with a copy of it, as with Save captions. Raises FileNotFoundError for no/another user's run."""
    run_dir = readable_run(outputs, run, user)
    if run_dir is None or not (run_dir / "dataset").is_dir():
        raise FileNotFoundError("No dataset yet: drop images first.")
    if jobs.read_job(run_dir):
        return jobs.fork_dataset(Path(outputs), run_dir), True
    return run_dir, False


# ----------------------------------------------------------------------------- captioning (child process)


def caption_command(dataset: Path, model: str, mode: str = "auto", overwrite: bool = False, strip: str = "",
                    only: list[str] | None = None) -> list[str]:
    # --opt=value: a value that starts with '-' can never be read as another option
    cmd = [*CAPTION_CMD, str(dataset), f"--model={model.strip()}", "--json-progress"]
    if mode in ("sentence", "tags"):
        cmd.append(f"--mode={mode}")
    if overwrite:
        cmd.append("--overwrite")
    if strip.strip():
        cmd.append(f"--strip={strip.strip()}")
    return cmd + [f"--only={rel}" for rel in only or []]


def caption_events(run_dir: Path, model: str, mode: str = "auto", overwrite: bool = False, strip: str = "",
                   only: list[str] | None = None) -> Iterator[dict]:
    """Run the captioner on RUN/dataset and yield its progress events (see trainer/data/caption_cli.py), then
    {"event": "finished"} or {"event": "failed", "message": ...}. Closing the iterator (page closed) ends the child."""
    if not model.strip():
        yield {"event": "failed", "message": "give a model: a hub id or a local folder"}
        return
    run_dir = Path(run_dir)
    env = jobs.child_env(run_dir.parent)  # the same environment as the trainer's and the preview's children
    cmd = caption_command(run_dir / "dataset", model, mode, overwrite, strip, only)
    with open(run_dir / CAPTION_LOG, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                                env=env, start_new_session=True)
    try:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
        code = proc.wait()
        if code == 0:
            yield {"event": "finished"}
        else:
            lines = (run_dir / CAPTION_LOG).read_text(encoding="utf-8", errors="replace").strip().splitlines()
            errors = [ln for ln in lines if ln.startswith("error:")]
            yield {"event": "failed", "message": (errors or lines or [f"captioner exit code {code}"])[-1]}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.stdout.close()


def progress_markdown(events: list[dict]) -> str:
    """What the captioner has done so far, for the page."""
    last = next((e for e in reversed(events) if "total" in e), None)
    head = next((e["message"] for e in reversed(events) if e.get("event") in ("loading", "captioned", "failed")), "")
    lines = []
    if last:
        lines.append(f"**Captioning {last['done']}/{last['total']}**: `{last['file']}` {last['status']}")
    if head:
        lines.append(("❌ " if events[-1].get("event") == "failed" else "") + head)
    bad = [e for e in events if e.get("status") == "bad"]
    lines += [f"- skipped `{e['file']}`: {e['reason']}" for e in bad[:20]]
    return "\n\n".join(lines) if lines else "Starting the captioner…"


# ----------------------------------------------------------------------------- bulk edits, tags, selection


def bulk_edit(run_dir: Path, prefix: str = "", suffix: str = "", find: str = "", replace: str = "",
              remove_tag: str = "", strip: str = "", only: list[str] | None = None) -> list[str]:
    """One bulk edit (one undo step) on RUN/dataset; returns one message per edit or problem."""
    edits = ce.plan_edits(strip, [t for t in remove_tag.split(",") if t.strip()] if remove_tag else [],
                          (find, replace) if find else None, prefix, suffix)
    if not edits:
        return ["nothing to do: fill in a prefix, suffix, find/replace, tag to remove or words to strip"]
    label = " + ".join(label for label, _, _ in edits)
    dataset = Path(run_dir) / "dataset"
    try:
        with ce.caption_lock(dataset, label):  # never interleaved with a captioner or another edit
            undo = ce.start_undo(label)
            messages = ce.apply_edits(dataset, edits, undo, only or None)
            ce.finish_undo(dataset, undo)
    except ce.EditError as err:
        return [str(err).replace(str(dataset) + ": ", "")]
    return messages


def undo(run_dir: Path) -> str:
    dataset = Path(run_dir) / "dataset"
    try:
        with ce.caption_lock(dataset, "undo"):
            return ce.undo_last(dataset).message()
    except ce.EditError as err:
        return str(err).split(": ", 1)[-1]


def clear_undo(run_dir: Path) -> str:
    """Forget the dataset's caption undo history (kept until the user clears it); one line saying how much."""
    dataset = Path(run_dir) / "dataset"
    try:
        with ce.caption_lock(dataset, "clear the undo history"):
            count = ce.clear_undo(dataset)
    except ce.EditError as err:
        return str(err).split(": ", 1)[-1]
    return f"Undo history cleared ({count} step{'s' if count != 1 else ''})."


def tag_rows(run_dir: Path | None) -> list[list]:
    """[tag, images] rows for the tag-frequency table, most frequent first."""
    dataset = Path(run_dir) / "dataset" if run_dir else None
    if dataset is None or not dataset.is_dir():
        return []
    return [[tag, n] for tag, n, _ in ce.tag_table(dataset)]


def images_with_tag(run_dir: Path, tag: str) -> list[str]:
    return next((imgs for t, _, imgs in ce.tag_table(Path(run_dir) / "dataset") if t == tag), [])


def image_names(run_dir: Path | None) -> list[str]:
    dataset = Path(run_dir) / "dataset" if run_dir else None
    if dataset is None or not dataset.is_dir():
        return []
    return [p.relative_to(dataset).as_posix() for p in ce.list_images(dataset)]


# ----------------------------------------------------------------------------- concepts


def concept_folders(run_dir: Path | None) -> list[str]:
    """Subfolders of the dataset that hold images (directly or below), posix, sorted."""
    folders = {str(Path(rel).parent.as_posix()) for rel in image_names(run_dir)}
    parents = {p.as_posix() for f in folders for p in Path(f).parents}
    return sorted((folders | parents) - {"."})


def concepts_markdown(run_dir: Path | None) -> str:
    dataset = Path(run_dir) / "dataset" if run_dir else None
    if dataset is None or not dataset.is_dir():
        return ""
    rows = []
    for path in sorted(dataset.rglob(CONCEPT_FILE)):
        rel = path.parent.relative_to(dataset).as_posix()
        try:
            c = read_concept(path)
            rows.append(f"| `{rel}` | {c.trigger if c.trigger is not None else '(data.trigger)'} | "
                        f"{c.caption_prefix or ''} | {c.repeats or '(folder/default)'} |")
        except ConceptError as err:
            rows.append(f"| `{rel}` | ⚠️ {err} | | |")
    if not rows:
        return "No concepts yet: every image uses the trigger word of the Train tab."
    return "| folder | trigger | caption prefix | repeats |\n|---|---|---|---|\n" + "\n".join(rows)


def save_concept(run_dir: Path, folder: str, trigger: str | None, prefix: str, repeats: int | None) -> str:
    """Write RUN/dataset/FOLDER/concept.toml; empty fields are left out (all empty: the file is removed)."""
    dataset = Path(run_dir) / "dataset"
    if folder not in concept_folders(run_dir):
        raise ValueError(f"{folder!r} is not a subfolder of this dataset with images")
    concept = Concept(trigger=(trigger or "").strip() or None, caption_prefix=prefix.strip() or None,
                      repeats=int(repeats) if repeats else None)
    written = write_concept(dataset / folder, concept)
    return f"{folder}: concept saved" if written else f"{folder}: concept removed"


# ----------------------------------------------------------------------------- summary


def summary_markdown(run_dir: Path | None, cfg: Config) -> str:
    """The dataset summary (trainer/data/summary.py) of RUN/dataset under the form's settings."""
    from trainer.data.dataset import DatasetError, scan_dataset
    from trainer.data.summary import format_summary, summarize

    dataset = Path(run_dir) / "dataset" if run_dir else None
    if dataset is None or not dataset.is_dir():
        return ""
    cfg = cfg.model_copy(deep=True)
    cfg.data.path = str(dataset)
    try:
        items, problems = scan_dataset(cfg.data)
    except DatasetError as err:
        return f"⚠️ {str(err).splitlines()[0]}"
    text = format_summary(summarize(items, problems, cfg), cfg.train.steps, cfg.train.epochs)
    return text.replace(str(dataset) + "/", "")
