"""One training run, read top to bottom from loop.py.

  loop.py        train -> prepare -> fit (train_step each step) -> finish
  run.py         what a run holds (Run) and its set-up: open_run, attach_models, resume, fill_caches
  batch.py       one micro-batch (make_batch, seeded by (seed, k)) and its loss (diffusion_loss: asks the family)
  validation.py  held-out loss and keep_best          checkpoint.py  pickle-free checkpoints, the disk estimate
  ema.py, optimizers.py, tracking.py (TensorBoard), fast_path.py (torch.compile + CUDA graphs), sampling.py

May import: trainer.config, trainer.events, trainer.io, trainer.versions, trainer.data, trainer.families,
trainer.adapters, trainer.lora_files, trainer.preview
"""
