"""The LoRA family on peft: what is attached to a base and how it trains. No file formats here (trainer.lora_files).

  attach.py    attach_lora: freeze the base, add the variant's layers to the UNet and text encoders
  blocks.py    lora.blocks: LoRA on chosen denoiser blocks only, each at its own rank (kohya's block_dims)
  variants.py  the variants on peft: DoRA, VeRA, AdaLoRA, LoRA+, LoRA-FA, Delta-LoRA, LoRA-drop, QLoRA
  lycoris.py   LoHa/LoKr on peft's tuners and LoCon (resnet convolutions); their exact low-rank ΔW
  factors.py   any trained layer as plain-LoRA factors (ΔW = scale·up·down): what every exported file is built from
  compact.py   a change as a plain LoRA no larger than the weights it changes: exact SVDs from the structure (LoKr's
               Kronecker factors, up·down), torch.svd_lowrank for dense changes, rank by an error target, error measured

Imports go compact -> factors -> lycoris, variants; variants -> lycoris (no circle).
May import: trainer.config, trainer.io, trainer.versions, trainer.families
"""
