"""The Runs panel's plots: the loss plot: the training loss of every step and the validation loss (trainer/training/validation.py) of the
steps that have one, as (step, loss, series) rows; and beside it the style reports of the saves against the step.
No torch, no gradio."""

from __future__ import annotations

from trainer.events import SAVE_REPORT, STEP, VALIDATION

SERIES = ("train", "validation")


def loss_rows(events: list[dict]) -> list[tuple[int, float, str]]:
    rows = []
    for e in events:
        if e.get("type") in (STEP, VALIDATION) and e.get("loss") is not None:
            rows.append((e["step"], e["loss"], "train" if e["type"] == STEP else "validation"))
    return rows


def last_validation(events: list[dict]) -> str:
    """'val loss 0.1234 (best 0.1200 at step 40)' for the panel, or '' without validation."""
    last = next((e for e in reversed(events) if e.get("type") == VALIDATION), None)
    if last is None:
        return ""
    return f"val loss {last['loss']:.4f} (best {last['best_loss']:.4f} at step {last['best_step']})"


def verdict_rows(events: list[dict]) -> list[tuple[int, float, str]]:
    """(step, value, series) of the save reports: progress towards the style, prompt fidelity and copying at
    strength 1.0. Plotted beside the loss: the style arrives as progress rises; overfitting shows as copying rising
    while fidelity falls."""
    latest: dict[int, dict] = {}
    for e in events:
        if e.get("type") == SAVE_REPORT and isinstance(e.get("step"), int):
            latest[e["step"]] = e
    rows = []
    for step, e in sorted(latest.items()):
        for series, key in (("progress", "progress"), ("fidelity", "fidelity"), ("copying", "copying")):
            value = (e.get(key) or {}).get("1.0")
            if isinstance(value, (int, float)):
                rows.append((step, float(value), series))
    return rows
