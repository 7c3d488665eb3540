"""python -m app [--host 127.0.0.1] [--port 7860] [--outputs outputs] [--auth USER:PASS ...] [--auth-file FILE]

Bound to localhost unless --host says otherwise. On an exposed server, require a login with --auth (repeatable)
or --auth-file (one `user:password` a line; blank lines and '#' comments ignored). Gradio then refuses every
route, files included, without the session cookie. Gradio serves files only from outputs/ (the run folders and
its own upload cache, which lives in outputs/.gradio): never the working directory or anything else; with a login,
a run's files only to the user who made it (app/auth.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def parse_auth(pairs: list[str], auth_file: str | None) -> list[tuple[str, str]]:
    """[(user, password)] from `user:pass` strings and a file of such lines. Raises ValueError naming the bad entry."""
    entries = [(f"--auth #{i + 1}", p) for i, p in enumerate(pairs)]
    if auth_file:
        text = Path(auth_file).read_text(encoding="utf-8")
        entries += [(f"{auth_file}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    users: dict[str, str] = {}
    for where, entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where}: expected user:password")
        users[user.strip()] = password
    return list(users.items())


def served_paths(outputs: Path) -> dict[str, list[str]]:
    """Gradio may serve files from outputs/ only, and never its private folder (the per-user key)."""
    from app.user_files import PRIVATE_DIR

    return {"allowed_paths": [str(outputs)], "blocked_paths": [str(Path(outputs) / PRIVATE_DIR)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="Style-LoRA Studio web UI")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--outputs", default="outputs", help="folder of run folders (the only place written)")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                        help="require this login (repeat for more users)")
    parser.add_argument("--auth-file", metavar="FILE", help="file of user:password lines")
    args = parser.parse_args(argv)
    from trainer.versions import incompatible_versions

    if problem := incompatible_versions():  # the runs this UI starts would fail on it: say so before serving
        sys.exit(f"error: {problem}")
    try:
        auth = parse_auth(args.auth, args.auth_file)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if args.host not in LOCAL_HOSTS and not auth:
        print(f"warning: serving on {args.host} without a login; anyone who can reach it can train and download. "
              "Add --auth user:pass or --auth-file FILE.", file=sys.stderr)
    outputs = Path(args.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    # Gradio's upload cache goes inside outputs too, so nothing is written elsewhere.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(outputs / ".gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from app import jobs, preview_client
    from app.auth import launch_kwargs
    from app.ui import build_app

    stop = jobs.start_queue_loop(outputs)
    stop_watcher = preview_client.start_gpu_watcher(outputs)  # the preview worker gives the GPU to training runs
    demo = build_app(outputs)
    try:
        # launch_kwargs: the login, with failed attempts throttled per user and per client address (app/auth.py)
        demo.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, **served_paths(outputs),
            max_file_size="50mb", show_error=False, **launch_kwargs(auth, outputs=outputs))
    finally:
        stop.set()
        stop_watcher.set()


if __name__ == "__main__":
    main()
