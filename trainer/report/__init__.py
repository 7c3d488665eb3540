"""The style report after a run, and the demo base's world it is calibrated on.

  style_report.py  run_report / write_report: how much style the adapter learned, measured on images
  verdict.py       the learned / partly / not verdict by feature group
  demo_data.py     the demo base's shapes, captions and content check
  demo_styles.py   the random looks the demo base is trained on
  suite_styles.py  the style suite: named styles with their ground-truth statistics
  saves.py         a run's saves listed with their losses and verdicts; use one as the downloads, delete the others
  save_report.py   the style report on one save (or all of them), as save_report events

May import: trainer.config, trainer.events, trainer.io, trainer.data, trainer.families, trainer.lora_files,
trainer.preview
"""
