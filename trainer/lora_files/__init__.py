"""The adapter file formats, together: what is written after training and what is read back (preview, convert).

  export.py         save_adapters: both files of a run (kohya/A1111 and diffusers layouts), training_metadata
  kohya.py          kohya_state_dict / save_kohya_lora (A1111, Forge, ComfyUI keys), kohya_to_diffusers
  convert.py        convert_file (`python -m trainer convert`), read_adapter_file (a checked .safetensors)
  shapes.py         every module's shapes checked (rank agreement; the base's shapes when it is given)
  kohya_names.py    module path <-> kohya key names (spelled by each base's family), file-kind detection
  fused.py          kohya modules that stand for several diffusers ones (SD3's q/k/v in one qkv), exactly
  lycoris.py        LoHa/LoKr files in the LyCORIS layout A1111/Forge and ComfyUI read
  kohya_meta.py     the ss_* / modelspec.* header a kohya file carries
  dora.py           DoRA for ComfyUI's formula, and a DoRA run as a plain LoRA (SVD, with its measured error)
  adapter_files.py  read_adapter: any adapter file, checked against a loaded pipeline's modules (the preview)

This __init__ imports nothing: the web UI reads file headers through trainer.io without importing torch.
May import: trainer.config, trainer.io, trainer.families, trainer.adapters
"""
