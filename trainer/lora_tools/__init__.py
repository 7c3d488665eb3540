"""The LoRA toolbox (`python -m trainer lora ...`, the web UI's Tools tab): inspect, resize, merge, bake, extract and
tag LoRA files of every base family and variant, including files other trainers wrote.

  lora_file.py Delta (one module's ΔW, low-rank or full) and LoraFile
  deltas.py    read_lora: any layout -> {part.module: Delta} (formulas.py: the consumers' ΔW formulas)
  layouts.py   which layout and trainer a file's keys come from, and their key names mapped to the base's modules
  write.py     write_lora: Deltas -> a kohya or diffusers file (exact scales, checked hashes and metadata)
  lowrank.py   truncated SVD of a ΔW at a rank or by kohya resize_lora.py's dynamic methods, with what it kept
  info.py      `lora info`: layout, family, variant, ranks, metadata, hashes, the consumers that load it exactly
  resize.py    `lora resize`: any variant -> a plain LoRA of a chosen or dynamic rank
  merge.py     `lora merge`: weighted sum of LoRAs (exact by concatenated ranks, or SVD to a rank)
  bake.py      `lora bake`: LoRAs merged into a base checkpoint (single file in its original layout, or a folder)
  extract.py   `lora extract`: a LoRA from the difference of two checkpoints
  meta.py      `lora meta`: ModelSpec / ss_* metadata edits that leave the tensors byte-identical, hashes redone
  cli.py       the `lora` subcommands

May import: trainer.config, trainer.io, trainer.families, trainer.adapters, trainer.lora_files
"""
