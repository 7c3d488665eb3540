"""TensorBoard through accelerate's trackers (train.log_with = "tensorboard").

events.jsonl stays the source of the UI; the tracker listens to the same events (trainer.events.EventLog listeners),
so TensorBoard shows exactly what the Runs panel shows: the training loss and learning rate of every step and the
validation loss. Logs go to RUN/tensorboard/ (`tensorboard --logdir outputs/` lists every run).
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import Config
from trainer.events import STEP, VALIDATION

RUN_NAME = "tensorboard"  # the subfolder of the run folder


def tracker_args(cfg: Config, run_dir: Path) -> dict:
    """Accelerator(...) arguments of the configured tracker (none: nothing)."""
    if cfg.train.log_with == "none":
        return {}
    return {"log_with": cfg.train.log_with, "project_dir": str(run_dir)}


def _hparams(cfg: Config) -> dict:
    """The config flattened to section.key = number / bool / string (what TensorBoard's hparams accept)."""
    flat = {}
    for section, values in cfg.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, bool, str)) else str(value)
    return flat


def start_trackers(accelerator, cfg: Config, events) -> None:
    """Open the trackers (main process) and have them follow the `step` and `validation` events."""
    if cfg.train.log_with == "none":
        return
    accelerator.init_trackers(RUN_NAME, config=_hparams(cfg))

    def follow(kind: str, fields: dict) -> None:
        if kind == STEP:
            accelerator.log({"train/loss": fields["loss"], "train/lr": fields["lr"]}, step=fields["step"])
        elif kind == VALIDATION:
            accelerator.log({"validation/loss": fields["loss"]}, step=fields["step"])

    events.listeners.append(follow)
