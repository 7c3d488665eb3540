"""The trainer: a library with a command line (python -m trainer); the web UI (app/) runs it as child processes.

Shared leaves at the top: config.py (the one typed config; config_lora.py holds its [lora] checks), events.py (the
run's event log), io.py (atomic files, headers), versions.py (the start-up version check); they import only each other. cli.py is the command line and may
import every package. The packages, each importing only the ones before it (its __init__ says which):

  data        the dataset: scanning, images and buckets, masks, concepts, summary, captioning and caption edits
  families    one module per base family (SD 1.x, SD 2.x, SDXL): everything that differs between bases; loading
  adapters    the LoRA family on peft: attaching the variants, LyCORIS, plain-LoRA factors
  lora_files  every file layout we write or read: kohya/A1111, diffusers, LyCORIS, DoRA
  preview     one loaded base, adapters switched, the one drawing call
  training    the loop, a run's set-up, batches, checkpoints, validation, EMA, optimizers, fast path, samples
  report      the style report and its verdict, and the demo base's data and styles

The leaves may import only each other.
May import: trainer.config, trainer.config_lora, trainer.events, trainer.io, trainer.versions
"""
