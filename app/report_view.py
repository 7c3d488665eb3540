"""The style report on the Runs panel (trainer/report/style_report.py writes it): numbers from the trainer's `report` event and
the report.png grid. No gradio, no torch."""

from __future__ import annotations

from pathlib import Path

from trainer.events import DONE, REPORT, REPORT_ENDS, REPORT_FAILED


def _by_scale(values: dict, fmt: str = "{:+.3f}") -> str:
    names = {"0.0": "base", "0.5": "LoRA 0.5", "1.0": "LoRA 1.0"}
    return ", ".join(f"{names.get(k, k)} {fmt.format(v)}" for k, v in values.items())


def report_markdown(state: str, events: list[dict]) -> str:
    """A short section for the run panel: running, failed (with the reason) or the measured numbers."""
    kinds = [e.get("type") for e in events]
    done_at = max((i for i, k in enumerate(kinds) if k == DONE), default=-1)
    after = events[done_at + 1:] if done_at >= 0 else []
    last = next((e for e in reversed(after) if e.get("type") in REPORT_ENDS), None)
    if state == "reporting":
        return "**Style report**: running (base vs LoRA on held-out prompts)…"
    if last is None:
        return ""
    if last["type"] == REPORT_FAILED:
        return f"**Style report failed** (the adapters are fine): {last.get('reason', 'unknown reason')}"
    lift = last.get("style_lift", {})
    lines = [
        "**Style report** (held-out prompts" + ("" if last.get("held_out", True) else ", some seen in training")
        + f"; {last.get('features', '')}):",
    ]
    if last.get("verdict"):  # reports before the verdict existed have only the numbers
        lines.append(f"- **verdict: {last['verdict']}**: {last.get('reason', '')}")
        if last.get("warning"):  # overcooking: the style may be learned, but too strongly at 1.0
            lines.append(f"- **warning**: {last['warning']}")
        if last.get("has_style", True):  # without a style to learn the fractions measure noise
            lines.append(f"- progress towards the style: {_by_scale(last.get('progress', {}), '{:.0%}')}")
    lines += [
        f"- style lift (similarity to the training images minus the base's): {_by_scale(lift)}",
        f"- prompt fidelity: {_by_scale(last.get('fidelity', {}), '{:.2f}')}",
        f"- copying (closest match to one training image, 1.0 = copy): {_by_scale(last.get('copying', {}), '{:.2f}')}",
    ]
    return "\n".join(lines)


def report_image(run_dir: Path, events: list[dict]) -> str | None:
    """report.png once the report event says it is written."""
    path = Path(run_dir) / "report.png"
    return str(path) if any(e.get("type") == REPORT for e in events) and path.is_file() else None
