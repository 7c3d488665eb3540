"""The Runs panel's loss plot: the training loss of every step and the validation loss (trainer/training/validation.py) of the
steps that have one, as (step, loss, series) rows. No torch, no gradio."""

from __future__ import annotations

from trainer.events import STEP, VALIDATION

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
