"""The preview: one base kept loaded, adapters switched in milliseconds, images drawn.

  previewer.py  Previewer: one base pipeline, an LRU of adapters, plain swap or the compiled hot-swap slot
  hotswap.py    HotSwapSlot (diffusers' hotswap)    worker.py  the JSON-lines worker the web UI talks to
  render.py     draw: the one pipeline call that samples, the report and the preview share

May import: trainer.config, trainer.io, trainer.families, trainer.adapters, trainer.lora_files
"""
