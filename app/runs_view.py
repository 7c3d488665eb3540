"""The Runs tab's content as plain values: the run list, the live panel (status, loss, samples, files) and the
fingerprints that tell the 1-second tick whether anything changed. No gradio, no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app import downloads_view, jobs, loss_view, preview_client, report_view
from trainer import families
from trainer.events import FAILED, PROBLEM, START, STEP, STOPPED, WARNING


def run_dir_of(outputs: Path, name: str | None, user: str | None = None) -> Path | None:
    """The run's folder, or None when there is no such run or it belongs to another logged-in user."""
    try:
        run_dir = jobs.run_path(outputs, name) if name else None
    except FileNotFoundError:
        return None
    return run_dir if run_dir is not None and jobs.visible_to(run_dir, user) else None


def run_choices(outputs: Path, user: str | None = None, runs: list | None = None) -> list[tuple[str, str]]:
    """(label, name) of the user's submitted runs; `runs`: jobs.list_runs' answer when the caller has it."""
    return [(f"{st.name} ({st.state})", st.name) for st in (jobs.list_runs(outputs) if runs is None else runs)
            if st.state != "draft" and jobs.visible_to(st.run_dir, user)]


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def panel_markdown(st: jobs.RunStatus, queue_pos: int | None = None) -> str:
    steps = [e for e in st.events if e.get("type") == STEP]
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
    start = next((e for e in st.events if e.get("type") == START), None)
    if start:
        precision = {"no": "fp32"}.get(start.get("precision"), start.get("precision"))
        base = (families.describe(start["base_kind"], start.get("prediction_type", ""), start.get("base_label"))
                if start.get("base_kind") else "base")
        lines.append(f"{start.get('images')} images on {start.get('device')} ({precision}); {base}")
    problems = [e for e in st.events if e.get("type") == PROBLEM]
    if problems:
        lines.append("Skipped or warned: " + "; ".join(f"`{Path(p['path']).name}`: {p['reason']}" for p in problems[:10]))
    warnings = [e for e in st.events if e.get("type") == WARNING]
    if warnings:
        lines.append("Warnings: " + "; ".join(w.get("reason", "") for w in warnings[-5:]))
    if st.state == FAILED:
        first, *rest = st.reason.splitlines() or ["trainer failed"]
        lines.append(f"**Failed**: {first}" + ("\n```\n" + "\n".join(rest) + "\n```" if rest else ""))
    if st.state == STOPPED:
        lines.append("Cancelled: a partial adapter was saved.")
    return "\n\n".join(lines)


def run_panel(outputs: Path, name: str, user: str | None = None) -> dict[str, Any]:
    """Everything the live panel shows for one run, as plain values."""
    run_dir = run_dir_of(outputs, name, user)
    if run_dir is None:
        return {"markdown": "Pick a run.", "loss": [], "verdict": [], "samples": [], "files": [], "config": "", "log": "",
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
        "verdict": loss_view.verdict_rows(st.events),  # the saves' style reports against the step
        "samples": [(str(p), p.stem) for p in jobs.sample_images(run_dir)],
        "files": files,
        "config": config.read_text(encoding="utf-8") if config.is_file() else "",
        "log": jobs.log_tail(run_dir, 40),
        "state": st.state,
    }


def fingerprint(outputs: Path, name: str, user: str | None = None) -> str:
    run_dir = run_dir_of(outputs, name, user)
    if run_dir is None:
        return f"none:{name}"
    sizes = [(run_dir / f).stat().st_size if (run_dir / f).exists() else -1 for f in ("events.jsonl", "train.log")]
    return f"{name}:{jobs.status(run_dir).state}:{sizes}:{len(jobs.adapter_files(run_dir))}"


def list_fingerprint(choices: list[tuple[str, str]]) -> str:
    return ",".join(label for label, _ in choices)


def finished_since(old: str, new: str) -> bool:
    """Did a run write its final adapter between two list fingerprints ("name (state)" labels)?"""
    ended = set(new.split(",")) - set(old.split(","))
    return any(label.endswith(tuple(f"({s})" for s in preview_client.FINISHED)) for label in ended)
