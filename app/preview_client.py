"""The client of the preview worker (trainer/preview/previewer.py): no gradio, no torch here (app/preview.py is the tab).

The worker (`python -m trainer preview --base MODEL`) is a child process holding one base pipeline; it speaks JSON
lines on stdin/stdout, one request at a time. It is started lazily for the base of the chosen adapter, and only one
lives at a time (a different base ends the old one: one GPU, one base in memory). Images are PNG files under
OUTPUTS/.preview/images; uploaded adapters are kept in OUTPUTS/.preview/adapters; the worker's log is
OUTPUTS/.preview/worker.log. Nothing is written outside outputs/.

GPU sharing with training: a watcher thread asks the worker to `release` (pipeline to CPU memory, CUDA cache emptied)
while a training run is running or stopping, and to `resume` when none is; on a GPU worker, Generate is refused
with a message while a run trains. On a CPU-only machine the two simply share the CPU.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from app import jobs
from app.uploads import sanitize_name
from app.user_files import preview_dir, recorded_bases, tool_result, tool_results, uploads_dir
from trainer.events import DONE, STOPPED
from trainer.io import describe_os_error, read_safetensors_header
from trainer.lora_files.shapes import check_shapes

WORKER_CMD = [sys.executable, "-m", "trainer", "preview"]
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 900
KEEP_IMAGES = 200
DEFAULT_BASE = "builtin:demo-sd"  # the offline demo base (assets/demo-sd); runs use their own base
DEMO_FOLDER = Path(__file__).resolve().parent.parent / "assets" / "demo-sd"
DISPLAY_MIN_PX = 512  # smaller images (the 32 px demo base) are shown enlarged by a whole factor, pixel for pixel
FINISHED = (DONE, STOPPED, "reporting")  # states whose adapter file is written (reporting: the report runs)
NO_ADAPTER = ("**No adapter picked.** Choose a finished run in *Adapter* above (train one on the Train tab), or upload "
              "a `.safetensors` adapter, then Generate.")


def base_size(base: str) -> int | None:
    """The base's native image side, to preset the width/height sliders (None: unknown, e.g. a hub id)."""
    from trainer.families import native_size

    base = (base or "").strip()
    if base == "builtin:demo-sd":
        return native_size(DEMO_FOLDER)
    if base.startswith("builtin:"):
        return 64
    return native_size(base) if Path(base).expanduser().is_dir() else None


class PreviewError(RuntimeError):
    """A request the worker refused (bad adapter, ...) or a worker that died; the message says which."""


class Worker:
    """One preview worker process for one base model."""

    def __init__(self, base: str, outputs: Path, args: list[str] | None = None):
        self.base = base
        self.outputs = Path(outputs).resolve()
        folder = preview_dir(self.outputs)
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "worker.log"
        env = jobs.child_env(self.outputs)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*WORKER_CMD, "--base", base, *(args or [])], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=env, cwd=Path.cwd(),
                                         text=True, encoding="utf-8", bufsize=1)
        self._replies: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._next_id = 0
        self.ready: dict | None = None
        self.released = False
        threading.Thread(target=self._read, name="preview-reader", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._replies.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._replies.put(None)  # EOF: the worker ended

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait(self, want_id: int, timeout: float) -> dict:
        end = time.time() + timeout
        while True:
            try:
                reply = self._replies.get(timeout=max(0.1, end - time.time()))
            except queue.Empty:
                raise PreviewError(f"the preview worker did not answer within {timeout:.0f} s") from None
            if reply is None:
                self.proc.wait(timeout=10)
                raise PreviewError(f"the preview worker ended (exit code {self.proc.returncode}):\n{self._log_tail()}")
            if reply.get("id") == want_id:
                return reply

    def request(self, op: str, timeout: float = REQUEST_TIMEOUT_S, **payload: Any) -> dict:
        with self._lock:
            if self.ready is None:
                reply = self._wait(0, START_TIMEOUT_S)
                if not reply.get("ok"):
                    self.close()
                    raise PreviewError(reply.get("error", "the preview worker could not start"))
                self.ready = reply
            if not self.alive():
                raise PreviewError(f"the preview worker is not running:\n{self._log_tail()}")
            self._next_id += 1
            try:
                self.proc.stdin.write(json.dumps({"id": self._next_id, "op": op, **payload}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                raise PreviewError(f"the preview worker ended:\n{self._log_tail()}") from None
            reply = self._wait(self._next_id, timeout)
        if not reply.get("ok"):
            raise PreviewError(reply.get("error", "the preview worker refused the request"))
        if op in ("release", "resume"):
            self.released = bool(reply.get("released"))
        return reply

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.write(json.dumps({"id": -1, "op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)


_WORKERS: dict[str, Worker] = {}
_WORKERS_LOCK = threading.Lock()


def get_worker(base: str, outputs: Path) -> Worker:
    """The live worker for `base`, started if needed; a worker for another base is ended first."""
    with _WORKERS_LOCK:
        w = _WORKERS.get(base)
        if w is not None and w.alive():
            return w
        for other in list(_WORKERS):
            _WORKERS.pop(other).close()
        w = _WORKERS[base] = Worker(base, outputs)
        return w


def shutdown() -> None:
    with _WORKERS_LOCK:
        for base in list(_WORKERS):
            _WORKERS.pop(base).close()


# ----------------------------------------------------------------------------- adapters


def _run_base(run_dir: Path) -> str | None:
    """The base a run trained on, from its saved config (None when it has none or it no longer reads)."""
    from trainer.config import ConfigError, load_config

    try:
        return load_config(run_dir / "config.toml").model.path
    except (OSError, ConfigError):
        return None


def _run_adapter(run_dir: Path) -> Path | None:
    for name in (f"{run_dir.name}.diffusers.safetensors", f"{run_dir.name}.safetensors"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def adapter_choices(outputs: Path, user: str | None = None, runs: list | None = None) -> list[tuple[str, str]]:
    """(label, value): finished runs (value `run:NAME`), uploaded files (value `file:NAME`) and the Tools tab's results
    (value `tool:NAME`) the user may see. `runs`: jobs.list_runs' answer when the caller has it."""
    choices = []
    for st in jobs.list_runs(outputs) if runs is None else runs:
        if st.state in FINISHED and _run_adapter(st.run_dir) and jobs.visible_to(st.run_dir, user):
            choices.append((f"{st.name} (run, {st.state})", f"run:{st.name}"))
    folder = uploads_dir(outputs, user)
    if folder.is_dir():
        for p in sorted(folder.glob("*.safetensors")):
            choices.append((f"{p.name} (uploaded)", f"file:{p.name}"))
    return choices + [(f"{p.name} (tools)", f"tool:{p.name}") for p in tool_results(outputs, user)]


def newest_run_adapter(outputs: Path, user: str | None = None, runs: list | None = None) -> str | None:
    """The picker value of the run that finished last (its adapter written), or None: preselected after a run."""
    newest = None
    for st in jobs.list_runs(outputs) if runs is None else runs:
        if st.state in FINISHED and _run_adapter(st.run_dir) and jobs.visible_to(st.run_dir, user):
            ended = max((e.get("time", 0) for e in st.events if e.get("type") in (DONE, STOPPED)), default=0)
            if newest is None or ended > newest[0]:
                newest = (ended, f"run:{st.name}")
    return newest[1] if newest else None


def resolve(outputs: Path, value: str, user: str | None = None) -> tuple[Path, str | None]:
    """(adapter file, the base it was trained on or None) for a picker value."""
    kind, _, name = (value or "").partition(":")
    if kind == "run":
        run_dir = jobs.run_path(Path(outputs), name)
        if not jobs.visible_to(run_dir, user):
            raise PreviewError(f"no run named {name!r}")
        path = _run_adapter(run_dir)
        if path is None:
            raise PreviewError(f"run {name} has no adapter file yet")
        return path, _run_base(run_dir)
    if kind == "file":
        path = uploads_dir(outputs, user) / sanitize_name(name)
        if path.name != name or not path.is_file():
            raise PreviewError(f"no uploaded adapter named {name!r}")
        return path, None
    if kind == "tool":  # a Tools tab result (app/tools_view.py), with the base of what it was made from
        return tool_result(outputs, name, user), recorded_bases(outputs, user).get(name)
    raise PreviewError(NO_ADAPTER)


def upload(outputs: Path, src: str | Path, base: str, user: str | None = None) -> str:
    """Store an uploaded adapter in OUTPUTS/.preview/adapters once the worker has validated it against `base`. Returns
    its value. Transactional: the file is checked under a temporary folder and only then renamed into place, so a
    refused file never replaces (or deletes) a good adapter of the same name."""
    src = Path(src)
    name = sanitize_name(src.name)
    if not name.lower().endswith(".safetensors"):
        raise PreviewError(f"{src.name}: only .safetensors adapters are accepted (other formats such as .ckpt/.pt "
                           "may be Python pickles, which can run code when loaded)")
    try:  # a broken file is refused here, from its header, before a worker starts (trainer/lora_files/shapes.py)
        header = read_safetensors_header(src)
        check_shapes(src.name, {k: tuple(v.get("shape", ())) for k, v in header.items()
                                if k != "__metadata__" and isinstance(v, dict)})
    except ValueError as err:
        raise PreviewError(str(err).replace(str(src), src.name)) from None
    except OSError as err:
        raise PreviewError(f"{src.name}: cannot read the upload: {describe_os_error(err, with_file=False)}") from None
    folder = uploads_dir(outputs, user)
    staging = None
    try:
        (folder / ".incoming").mkdir(parents=True, exist_ok=True)  # not listed: adapter_choices globs `folder` only
        staging = Path(tempfile.mkdtemp(dir=folder / ".incoming"))
        checked = staging / name  # the same file name, so the worker's messages name the user's file
        shutil.copyfile(src, checked)
        get_worker(base or DEFAULT_BASE, outputs).request("load", path=str(checked), name=f"file:{name}")
        os.replace(checked, folder / name)
    except OSError as err:
        reason = describe_os_error(err, "the adapters folder", with_file=False)
        raise PreviewError(f"{src.name}: cannot store the upload: {reason}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return f"file:{name}"


# ----------------------------------------------------------------------------- GPU sharing with training


def training_run(outputs: Path) -> str | None:
    return next((st.name for st in jobs.list_runs(outputs) if st.state in ("running", "stopping")), None)


def sync_gpu(outputs: Path) -> None:
    """Release the live GPU worker while a run trains; resume it when none does."""
    with _WORKERS_LOCK:
        workers = [w for w in _WORKERS.values() if w.alive() and w.ready and w.ready.get("device") != "cpu"]
    if not workers:
        return
    busy = training_run(outputs)
    for w in workers:
        try:
            if busy and not w.released:
                w.request("release", timeout=120)
            elif not busy and w.released:
                w.request("resume", timeout=300)
        except PreviewError as err:
            print(f"preview: {err}", file=sys.stderr)


def start_gpu_watcher(outputs: Path, interval: float = 2.0) -> threading.Event:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                sync_gpu(outputs)
            except Exception as err:  # never end the watcher
                print(f"preview watcher: {err}", file=sys.stderr)

    threading.Thread(target=loop, name="preview-gpu", daemon=True).start()
    return stop


# ----------------------------------------------------------------------------- requests


def _image_path(outputs: Path) -> Path:
    folder = preview_dir(outputs) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime)
    for p in old[:-KEEP_IMAGES]:
        p.unlink(missing_ok=True)
    return folder / f"{time.time_ns()}.png"


def render(outputs: Path, op: str, adapter: str, strength: float, adapter2: str | None, weight2: float, base: str,
           settings: dict[str, Any], user: str | None = None) -> dict:
    """compare | grid | generate through the worker of `base` (default: the adapter's own base)."""
    outputs = Path(outputs)
    path, run_base = resolve(outputs, adapter, user)
    files = {adapter: str(path)}
    mix = {adapter: float(strength)}
    if adapter2:
        if adapter2 == adapter:
            raise PreviewError("pick two different adapters to mix")
        files[adapter2] = str(resolve(outputs, adapter2, user)[0])
        mix[adapter2] = float(weight2)
    base = (base or "").strip() or run_base or DEFAULT_BASE
    worker = get_worker(base, outputs)
    busy = training_run(outputs)
    if busy and worker.ready and worker.ready.get("device") != "cpu":
        if not worker.released:
            worker.request("release", timeout=120)
        raise PreviewError(f"training run {busy} is using the GPU; the preview released it and comes back when the "
                           "run ends")
    reply = worker.request(op, files=files, adapters=mix, out=str(_image_path(outputs)), **settings)
    for key in ("image", "base_image"):
        if key in reply:
            reply[key], reply["shown_factor"] = shown_image(reply[key])
    return reply


def shown_image(path: str) -> tuple[str, int]:
    """(the file to show, its enlargement). An image smaller than DISPLAY_MIN_PX (from the 32 px demo base, say) is
    shown enlarged by a whole factor with nearest-neighbour: sharp pixels, nothing invented, not a speck in a wide
    panel. The worker's own file stays as it is."""
    from PIL import Image

    with Image.open(path) as im:
        factor = DISPLAY_MIN_PX // max(im.size)
        if factor < 2:
            return path, 1
        big = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    out = Path(path).with_name(f"{Path(path).stem}-x{factor}.png")
    big.save(out)
    return str(out), factor


def status_line(reply: dict, what: str) -> str:
    parts = [what, f"swap {reply['swap_ms']:.1f} ms", f"generation {reply['gen_ms']:.0f} ms"]
    if "base_gen_ms" in reply:
        parts.append(f"base: swap {reply['base_swap_ms']:.1f} ms, generation {reply['base_gen_ms']:.0f} ms")
    if "images" in reply:
        parts[1] = f"swap {reply['swap_ms']:.1f} ms avg"
        parts[2] = f"generation {reply['gen_ms']:.0f} ms avg over {reply['images']} images"
    if reply.get("shown_factor", 1) > 1:
        parts.append(f"shown {reply['shown_factor']}× enlarged (nearest-neighbour; the base draws small images)")
    return " · ".join(parts)
