"""The style report on one save of a run, or on all of them in turn (`python -m trainer report RUN --save all`, what
the web UI queues as a child process). Each report is a `save_report` event (verdict, progress, step) the saves table
and the Runs panel's verdict-vs-step plot read, or a `save_report_failed` event with the reason."""

from __future__ import annotations

from pathlib import Path

from trainer.config import Config, load_config
from trainer.events import SAVE_REPORT, SAVE_REPORT_FAILED, SAVE_REPORT_STARTED, EventLog
from trainer.report.saves import Save, find_save, list_saves


def report_save(cfg: Config, run_dir: Path, save: Save) -> dict | None:
    """The style report of one save into RUN/reports/<stem>.json/.png and a `save_report` event; a failure is a
    `save_report_failed` event with the reason (never raised: the next save still gets its report)."""
    from trainer.report.style_report import ReportError, report_paths, write_report

    run_dir = Path(run_dir)
    events = EventLog(run_dir / "events.jsonl")
    events.emit(SAVE_REPORT_STARTED, stem=save.stem, step=save.step)
    try:
        report = write_report(cfg, run_dir, save.stem)
    except Exception as err:  # a report never costs the save
        reason = str(err) if isinstance(err, (ReportError, ValueError, FileNotFoundError)) else \
            f"{type(err).__name__}: {err}"
        events.emit(SAVE_REPORT_FAILED, stem=save.stem, step=save.step, reason=reason)
        print(f"style report of {save.stem} failed: {reason}")
        return None
    verdict = report["verdict"]
    json_path, png_path = report_paths(cfg, run_dir, save.stem)
    events.emit(SAVE_REPORT, stem=save.stem, step=save.step, save_kind=save.kind, verdict=verdict["verdict"],
                progress=verdict["progress"], reason=verdict["reason"], has_style=verdict["has_style"],
                fidelity=report["fidelity"], copying=report["copying"], style_lift=report["style_lift"],
                path=str(json_path), image=str(png_path), seconds=report["seconds"])
    print(f"style report of {save.label()}: {verdict['verdict']}: {verdict['reason']}")
    return report


def report_saves(run_dir: Path, which: str = "all") -> list[dict | None]:
    """Reports on `which` ("all", or a save's stem, label or step), in step order."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    saves = list_saves(run_dir, cfg.output.name)
    chosen = saves if which == "all" else [find_save(saves, which)]
    return [report_save(cfg, run_dir, s) for s in chosen]
