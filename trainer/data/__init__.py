"""The dataset: folders of images and captions, and the tools that edit them. Nothing here loads a model.

  dataset.py       scan_dataset (images, captions, repeats, buckets, problems by file), captions per step, batches
  images.py        decoding with size limits, buckets, the resize/crop every consumer shares
  mask_files.py    the mask files (name.mask.png or alpha), decoded and checked when the dataset is scanned
  masks.py         masked loss: the masks as loss weights
  concepts.py      per-folder trigger/prefix/repeats (concept.toml)
  summary.py       the dataset summary shown before training
  caption.py       captioning with a local model (BLIP-style or a WD14 tagger); caption_cli.py its CLI;
  caption_edit.py  bulk caption edits; caption_journal.py the folder's caption lock and undo history

May import: trainer.config, trainer.events, trainer.io
"""
