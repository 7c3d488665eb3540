"""Web UI of the style-LoRA studio: `python -m app`. Training runs in child processes (app.jobs)."""
