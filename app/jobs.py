"""Run folders, the one-at-a-time queue and child processes (uploads: app/uploads.py). No gradio, no torch.

A run folder `OUTPUTS/<name>/` is the whole state of a run, so a restarted server (or a reloaded page) finds
everything again by re-reading the folders:
  dataset/       uploaded images and captions (sanitized names)          -> "draft" until submitted
  job.json       queue record: queued_at, then pid/cmd/started_at once started, or cancelled
  config.toml    the resolved config the child trains from
  events.jsonl   appended by the trainer (start, step, samples, adapter, done|stopped|failed, then report|report_failed)
  train.log      the child's stdout + stderr
A run's state is derived, never stored alone: terminal event of the current attempt > live pid > dead pid
(= failed, with the end of train.log). A failed or stopped run can be resumed (`resume`): a new attempt of the
same folder that continues from its latest checkpoint; events of earlier attempts stay in events.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from app.uploads import add_files, sanitize_name
from trainer.config import Config, save_config
from trainer.events import DONE, ENDS, FAILED, REPORT_ENDS, START, STEP, STOP_FILE, STOPPED, run_events
from trainer.io import atomic_write_text, make_unique_dir

OWNER_FILE = ".owner"  # the logged-in user who made the run (absent without login)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 20
TERMINAL = {DONE, STOPPED, FAILED, "cancelled"}
TRAINER_CMD = [sys.executable, "-m", "trainer", "train"]  # + RUN/config.toml --run-dir RUN (tests swap it)

_LOCK = threading.RLock()
_CHILDREN: dict[int, subprocess.Popen] = {}  # pid -> Popen for children of this process (reaped via poll)


@dataclass
class RunStatus:
    run_dir: Path
    state: str  # draft | queued | running | stopping | reporting | done | stopped | failed | cancelled
    reason: str = ""  # for failed: exit code and the end of train.log
    step: int = 0
    total: int = 0
    events: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.name


# ----------------------------------------------------------------------------- run folders


def new_run_dir(outputs: Path, name: str, owner: str | None = None) -> Path:
    """outputs/<name>, or <name>-2, -3 ... never an existing folder. Created empty.

    With an `owner` (a logged-in user) the folder is outputs/<name>-<random hex> and records its owner: other
    users neither list it nor can guess its path (Gradio serves any file under outputs/ to a logged-in user).
    """
    base = sanitize_name(name or "style-lora", 60).replace(".", "-")
    run_dir = make_unique_dir(outputs, base, suffix=(lambda n: secrets.token_hex(8)) if owner is not None else None)
    if owner is not None:
        atomic_write_text(run_dir / OWNER_FILE, owner)
    return run_dir


def child_env(outputs: Path) -> dict[str, str]:
    """The environment of the trainer and preview children: unbuffered output, this checkout first on the path, and
    built-in models written inside outputs/ (nothing is written elsewhere)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("STYLE_LORA_BUILTIN_DIR", str(Path(outputs) / ".builtin"))
    pythonpath = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
    return env


def user_of(request) -> str | None:
    """The logged-in user (server started with --auth), else None: a local single-user server."""
    return getattr(request, "username", None) or None


def owner_of(run_dir: Path) -> str | None:
    path = Path(run_dir) / OWNER_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def visible_to(run_dir: Path, user: str | None) -> bool:
    """Without login (user None) every run is the local user's; with login only one's own runs are."""
    return user is None or owner_of(run_dir) == user


def fork_dataset(outputs: Path, run_dir: Path) -> Path:
    """A new draft run with a copy of run_dir's dataset (a submitted run's dataset is never changed)."""
    stem = re.sub(r"-(\d+|[0-9a-f]{16})$", "", Path(run_dir).name)
    new_dir = new_run_dir(Path(outputs), stem, owner=owner_of(run_dir))
    shutil.copytree(Path(run_dir) / "dataset", new_dir / "dataset", dirs_exist_ok=True)
    return new_dir


def run_path(outputs: Path, name: str) -> Path:
    """The folder of run `name`, refusing anything that is not a direct child of outputs."""
    path = outputs / sanitize_name(name)
    if not name or path.name != name or not path.is_dir():
        raise FileNotFoundError(f"no run named {name!r} in {outputs}")
    return path


# ----------------------------------------------------------------------------- job records


def _job_path(run_dir: Path) -> Path:
    return Path(run_dir) / "job.json"


def read_job(run_dir: Path) -> dict:
    try:
        return json.loads(_job_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_job(run_dir: Path, job: dict) -> None:
    atomic_write_text(_job_path(run_dir), json.dumps(job, indent=1))


def submit(run_dir: Path, cfg: Config) -> Path:
    """Write RUN/config.toml (data.path = RUN/dataset, output = this folder) and queue the run."""
    run_dir = Path(run_dir).resolve()
    if read_job(run_dir):
        raise ValueError(f"run {run_dir.name} was already submitted; start a new dataset for a new run")
    cfg = cfg.model_copy(deep=True)
    cfg.data.path = str(run_dir / "dataset")
    cfg.output.dir = str(run_dir.parent)
    cfg.output.name = run_dir.name
    save_config(cfg, run_dir / "config.toml")
    write_job(run_dir, {"queued_at": time.time()})
    return run_dir


def create_run(outputs: Path, cfg: Config, files: list[str | Path], name: str | None = None) -> tuple[Path, list[str]]:
    """New run folder + dataset from files + queued. Returns (run_dir, upload problems)."""
    run_dir = new_run_dir(Path(outputs), name or cfg.output.name)
    _, problems = add_files(run_dir, files)
    return submit(run_dir, cfg), problems


# ----------------------------------------------------------------------------- processes and state


def pid_alive(pid: int | None, run_dir: Path | None = None) -> bool:
    if not pid:
        return False
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None  # poll reaps our own exited children (no zombies)
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():  # Linux: also rule out zombies and a recycled pid running something else
        try:
            if ") Z" in (proc / "stat").read_text() or ") X" in (proc / "stat").read_text():
                return False
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return run_dir is None or str(Path(run_dir).resolve()) in cmdline
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    except OSError:
        return False


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    log = Path(run_dir) / "train.log"
    if not log.is_file():
        return ""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    # tqdm redraws with \r; keep the last state of each line
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    job = read_job(run_dir)
    if not job:
        return RunStatus(run_dir, "draft")
    if job.get("cancelled_at") and not job.get("pid"):
        return RunStatus(run_dir, "cancelled", "cancelled before it started")
    alive = pid_alive(job.get("pid"), run_dir)  # before reading events: a done event precedes the exit
    events = run_events(run_dir / "events.jsonl")
    steps = [e for e in events if e.get("type") == STEP]
    start = next((e for e in events if e.get("type") == START), {})
    st = RunStatus(run_dir, "queued", events=events, step=steps[-1]["step"] if steps else 0,
                   total=steps[-1]["total"] if steps else start.get("total_steps", 0))
    # Only the current attempt's end counts (a resumed run's earlier 'stopped'/'failed' does not).
    since = job.get("launched_at", 0) - 0.01 if job.get("pid") else float("inf")
    end = next((e for e in reversed(events) if e.get("type") in ENDS
                and e.get("time", float("inf")) >= since), None)
    if end and end["type"] == FAILED:  # the trainer said why in one line (its traceback is in train.log only)
        hint = f"\n{end['hint']}" if end.get("hint") else ""
        st.state, st.reason = FAILED, f"{end.get('reason', 'trainer failed')}{hint}"
    elif end:
        st.state = end["type"]
        reported = any(e.get("type") in REPORT_ENDS and e.get("time", 0) >= end.get("time", 0)
                       for e in events)
        if end["type"] == DONE and alive and not reported:
            st.state = "reporting"  # adapters written; the trainer is measuring the style report (trainer/report/style_report.py)
    elif alive:
        st.state = "stopping" if (run_dir / STOP_FILE).exists() or job.get("cancel_requested") else "running"
    elif job.get("pid"):
        code = job.get("returncode")
        if code is None and job["pid"] in _CHILDREN:
            code = _CHILDREN[job["pid"]].returncode
        how = f"exit code {code}" if code is not None else "process ended"
        if code is not None and code < 0:
            how = f"killed by signal {-code}"
        st.state, st.reason = FAILED, f"trainer {how} without finishing.\n{log_tail(run_dir)}"
    return st


def list_runs(outputs: Path) -> list[RunStatus]:
    """Every run folder under outputs, newest first (drafts included)."""
    outputs = Path(outputs)
    if not outputs.is_dir():
        return []
    dirs = [d for d in outputs.iterdir() if d.is_dir() and not d.name.startswith(".")
            and ((d / "job.json").exists() or (d / "dataset").is_dir())]
    dirs.sort(key=lambda d: (d / "job.json").stat().st_mtime if (d / "job.json").exists() else d.stat().st_mtime,
              reverse=True)
    return [status(d) for d in dirs]


def start(run_dir: Path) -> int:
    """Spawn the trainer for a queued run; stdout+stderr go to RUN/train.log. Returns the pid."""
    run_dir = Path(run_dir).resolve()
    cmd = [*TRAINER_CMD, str(run_dir / "config.toml"), "--run-dir", str(run_dir)]
    job = read_job(run_dir)
    if job.get("resume"):
        cmd += ["--set", 'train.resume="latest"']
    launched_at = time.time()
    env = child_env(run_dir.parent)
    with open(run_dir / "train.log", "ab") as log:
        # New session: the run outlives a server restart, and the UI reattaches by pid.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=Path.cwd(), env=env, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    job.update(pid=proc.pid, started_at=time.time(), launched_at=launched_at, cmd=cmd)
    write_job(run_dir, job)
    return proc.pid


def cancel(run_dir: Path) -> str:
    """Queued: never starts. Running: RUN/stop, so the trainer saves a partial adapter and ends 'stopped'."""
    run_dir = Path(run_dir)
    with _LOCK:
        st = status(run_dir)
        job = read_job(run_dir)
        if st.state == "queued" and not job.get("pid"):
            job["cancelled_at"] = time.time()
            write_job(run_dir, job)
            return f"{run_dir.name}: cancelled before it started"
        if st.state in ("running", "stopping", "queued"):
            job["cancel_requested"] = time.time()
            write_job(run_dir, job)
            (run_dir / STOP_FILE).touch()
            return f"{run_dir.name}: stopping; the trainer saves a partial adapter after the current step"
        return f"{run_dir.name}: nothing to cancel (state {st.state})"


def resume(run_dir: Path) -> str:
    """Queue a failed or stopped run again; it continues from its latest checkpoint (or from step 0 when it was
    killed before the first one) and ends at the same weights as a run that was never interrupted."""
    run_dir = Path(run_dir)
    with _LOCK:
        st = status(run_dir)
        if st.state not in (FAILED, STOPPED):
            return f"{run_dir.name}: nothing to resume (state {st.state})"
        job = read_job(run_dir)
        past = {k: job.pop(k) for k in ("pid", "started_at", "launched_at", "cmd", "returncode", "cancel_requested")
                if k in job}
        job.setdefault("attempts", []).append({**past, "state": st.state})
        job.update(queued_at=time.time(), resume=True)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        write_job(run_dir, job)
        return f"{run_dir.name}: queued to resume from its latest checkpoint"


@contextlib.contextmanager
def _queue_lock(outputs: Path):
    """One queue advance at a time, across threads and across servers sharing the outputs folder."""
    import fcntl

    outputs.mkdir(parents=True, exist_ok=True)
    with _LOCK, open(outputs / ".queue.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def advance(outputs: Path) -> Path | None:
    """Start the oldest queued run when nothing runs; re-assert stop requests. Returns a started run."""
    outputs = Path(outputs)
    with _queue_lock(outputs):
        runs = list_runs(outputs)
        for st in runs:
            job = read_job(st.run_dir)
            # The trainer deletes RUN/stop when it starts (a stop belongs to the run it stopped): re-create it.
            if st.state in ("running", "stopping") and job.get("cancel_requested"):
                (st.run_dir / STOP_FILE).touch()
            if st.state == FAILED and "returncode" not in job and job.get("pid") in _CHILDREN:
                job["returncode"] = _CHILDREN[job["pid"]].returncode
                write_job(st.run_dir, job)
        if any(st.state in ("running", "stopping", "reporting") for st in runs):
            return None
        queued = [st.run_dir for st in runs if st.state == "queued" and not read_job(st.run_dir).get("pid")]
        if not queued:
            return None
        nxt = min(queued, key=lambda d: (read_job(d).get("queued_at", 0), d.name))
        start(nxt)
        return nxt


def start_queue_loop(outputs: Path, interval: float = 1.0) -> threading.Event:
    """Background thread that advances the queue every `interval` s. Set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                advance(outputs)
            except Exception as err:  # never let one bad folder end the queue
                print(f"queue: {err}", file=sys.stderr)
            stop.wait(interval)

    threading.Thread(target=loop, name="run-queue", daemon=True).start()
    return stop


# ----------------------------------------------------------------------------- results


def adapter_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("*.safetensors") if p.is_file())


def sample_images(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "samples"
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def run_zip(run_dir: Path) -> Path:
    """RUN/<name>-run.zip of the whole run except checkpoints (rebuilt when the run changed since)."""
    run_dir = Path(run_dir)
    target = run_dir / f"{run_dir.name}-run.zip"
    files = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and p != target
             and "checkpoints" not in p.relative_to(run_dir).parts and not p.name.startswith(".")
             and p.name != STOP_FILE]
    newest = max((p.stat().st_mtime for p in files), default=0)
    if target.is_file() and target.stat().st_mtime >= newest:
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            zf.write(p, f"{run_dir.name}/{p.relative_to(run_dir).as_posix()}")
    os.replace(tmp, target)
    return target
