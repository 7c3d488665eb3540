"""The Tools tab's command as a child process (`python -m trainer lora ... --json`), cancellable and without a time
limit, and what the result box shows: the command's summary, or its error in one line (never a traceback). When a
file needs its base (a kohya file of a base whose layout differs from its family's reference, a DoRA) the command is
run once more with the base it belongs to as --model. No gradio, no torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from app import jobs


def error_line(stderr: str, code: int | None) -> str:
    """The command's one `error: ...` line, or a short line naming how it ended (never a traceback)."""
    lines = [x.strip() for x in (stderr or "").splitlines() if x.strip()]
    errors = [x.removeprefix("error:").strip() for x in lines if x.startswith("error:")]
    if errors:
        return errors[-1]
    if code is not None and code < 0:
        return f"the command was stopped (signal {-code})"
    last = next((x for x in reversed(lines) if not x.startswith(("File ", "Traceback", "^", "~"))), "")
    return f"the command failed (exit code {code})" + (f": {last[:300]}" if last else "")


class ToolJob:
    """One `python -m trainer lora ... --json` child in its own session; `cancel` ends it. No time limit: a bake of a
    large checkpoint may take long, and the user decides when to stop it. `base`: the base the input belongs to,
    passed as --model when the command asks for it (and then recorded with the result by the caller)."""

    def __init__(self, outputs: Path, args: list[str], out: Path | None, base: str | None = None):
        self.outputs, self.args, self.out, self.base = Path(outputs), list(args), out, base
        self.result: dict | None = None
        self.error = ""
        self.cancelled = False
        self.finished = threading.Event()
        self._lock = threading.Lock()
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = self._start()
        threading.Thread(target=self._wait, daemon=True, name="lora-tool").start()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "trainer", "lora", *self.args, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                encoding="utf-8", errors="replace", env=jobs.child_env(self.outputs), cwd=Path.cwd(),
                                start_new_session=True)

    def _wait(self) -> None:
        try:
            stdout, stderr = self.proc.communicate()
            with self._lock:  # a file that needs its base: once more with it (unless cancelled meanwhile)
                again = (self.proc.returncode != 0 and not self.cancelled and self.base is not None
                         and "--model" not in self.args and "pass --model" in stderr)
                if again:
                    self.args += ["--model", self.base]
                    self.proc = self._start()
            if again:
                stdout, stderr = self.proc.communicate()
            if self.cancelled:
                self.error = "cancelled"
            elif self.proc.returncode != 0:
                self.error = error_line(stderr, self.proc.returncode)
            else:
                self.result = parse_result(stdout)
                if self.result is None:
                    self.error = "the command printed no result"
        finally:
            self.finished.set()

    def cancel(self) -> None:
        with self._lock:
            if self.proc.poll() is None:
                self.cancelled = True
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except OSError:
                    pass

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)


def parse_result(stdout: str) -> dict | None:
    """The JSON object the command printed last (other lines, e.g. a library's notice, are ignored)."""
    for line in reversed((stdout or "").splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def result_text(job: ToolJob) -> str:
    """What the result box shows: the summary, and where the file went; or the error in one line."""
    if job.error:
        return "Cancelled." if job.error == "cancelled" else f"Error: {short_paths(job, job.error)}"
    result = job.result or {}
    summary = str(result.get("summary") or "").strip() or json.dumps(result, indent=1, default=str)[:4000]
    if result.get("file"):  # info names its input as given: by its name here
        summary = summary.replace(str(result["file"]), Path(str(result["file"])).name)
    summary = short_paths(job, summary)
    out = result.get("out") or (str(job.out) if job.out else "")
    if out and job.args and job.args[0] == "bake":
        summary += f"\n\nWritten: {Path(out).name} — use it as the base model in Preview: {out}"
    elif out:
        summary += f"\n\nWritten: {Path(out).name} (listed in Preview as \"{Path(out).name} (tools)\")"
    return summary


def short_paths(job: ToolJob, text: str) -> str:
    """The text with the server's folders left out: results by name, run files as RUN/FILE."""
    for folder in ([job.out.parent] if job.out is not None else []) + [job.outputs.resolve(), job.outputs]:
        text = text.replace(f"{folder}{os.sep}", "")
    return text
