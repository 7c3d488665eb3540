"""python -m app [--host 127.0.0.1] [--port 7860] [--outputs outputs]"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="Style-LoRA Studio web UI")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--outputs", default="outputs", help="folder of run folders (the only place written)")
    args = parser.parse_args(argv)
    outputs = Path(args.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    # Gradio's upload cache goes inside outputs too, so nothing is written elsewhere.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(outputs / ".gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from app import jobs
    from app.ui import build_app

    stop = jobs.start_queue_loop(outputs)
    demo = build_app(outputs)
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, allowed_paths=[str(outputs)],
            max_file_size="50mb", show_error=False)
    finally:
        stop.set()


if __name__ == "__main__":
    main()
