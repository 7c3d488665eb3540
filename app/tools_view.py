"""The Tools tab's logic as plain values (app/tools_tab.py is the tab): which LoRA files a user may pick, the
`python -m trainer lora ...` argument list for each command from the form's values (checked first, each refusal one
line), the command as a cancellable child process, and its JSON result. No gradio, no torch.

Where things are (all under outputs/, served with the same per-user rules as the preview uploads, app/auth.py):
  OUTPUTS/.tools/<local | user-KEY>/           results: what the commands write (Preview lists them as `tool:NAME`)
  OUTPUTS/.tools/<local | user-KEY>/uploads/   LoRA files uploaded into the Tools tab
  OUTPUTS/.tools/<local | user-KEY>/checkpoints/  baked checkpoints (a base for Preview, not an adapter)
KEY is the preview uploads' keyed hash of the user name (app/user_files.py): nobody else can guess it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from app import jobs
from app.uploads import sanitize_name
from app.user_files import BASES_FILE, SUFFIX, recorded_bases, tool_result, tool_results, tools_dir
from trainer.io import atomic_write_text

COMMANDS = {"Info": "info", "Resize": "resize", "Merge": "merge", "Bake": "bake", "Extract": "extract",
            "Edit metadata": "meta"}
METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")  # trainer/lora_tools/cli.py METHODS (kept equal by a test)
LAYOUTS = ("kohya", "diffusers")
META_FIELDS = ("title", "author", "trigger", "tags", "description")
# The form's fields, in the order the tab passes them (and its API takes them).
FORM = ("command", "file", "files", "rank", "dynamic", "param", "to", "model", "tuned", "conv_rank", "out_name",
        "overwrite", "title", "author", "trigger", "tags", "description", "thumbnail")


class ToolError(ValueError):
    """A form value the Tools tab refuses; the message is one line for the user."""


def lora_choices(outputs: Path, user: str | None = None) -> list[tuple[str, str]]:
    """(label, value) of every LoRA file the user may pick: their runs' adapters and saves (`run:RUN/FILE`), their
    results (`tool:NAME`) and uploads (`upload:NAME`). Other users' runs never appear."""
    choices = []
    for st in jobs.list_runs(outputs):
        if st.state != "draft" and jobs.visible_to(st.run_dir, user):
            choices += [(f"{st.name} / {p.name}", f"run:{st.name}/{p.name}") for p in jobs.adapter_files(st.run_dir)]
    choices += [(f"{p.name} (tools result)", f"tool:{p.name}") for p in tool_results(outputs, user)]
    up = tools_dir(outputs, user) / "uploads"
    if up.is_dir():
        choices += [(f"{p.name} (uploaded)", f"upload:{p.name}") for p in sorted(up.glob(f"*{SUFFIX}"))]
    return choices


def resolve(outputs: Path, value: str, user: str | None = None) -> Path:
    """The file behind a picker value, checked to be one the user may pick (ToolError otherwise)."""
    kind, _, rest = (value or "").strip().partition(":")
    if kind == "run":
        run, _, name = rest.partition("/")
        try:
            run_dir = jobs.run_path(Path(outputs), run)
        except FileNotFoundError:
            run_dir = None
        if run_dir is not None and jobs.visible_to(run_dir, user) and run_dir / name in jobs.adapter_files(run_dir):
            return run_dir / name
    elif kind == "tool":
        try:
            return tool_result(outputs, rest, user)
        except FileNotFoundError:
            pass
    elif kind == "upload":
        path = tools_dir(outputs, user) / "uploads" / sanitize_name(rest)
        if rest and path.name == rest and path.is_file():
            return path
    if not value:
        raise ToolError("pick a LoRA file first (your runs' adapters, tools results or an upload)")
    raise ToolError(f"{value}: not one of your LoRA files (pick one from the list)")


def base_of(outputs: Path, value: str, user: str | None = None) -> str | None:
    """The base model a picked file belongs to when known: a run's (its config.toml), or a result's (recorded)."""
    from trainer.config import ConfigError, load_config

    kind, _, rest = (value or "").strip().partition(":")
    try:
        if kind == "run":
            return load_config(resolve(outputs, value, user).parent / "config.toml").model.path
    except (OSError, ConfigError, ToolError):
        return None
    return recorded_bases(outputs, user).get(rest) if kind == "tool" else None


def source_base(outputs: Path, f: dict, user: str | None = None) -> str | None:
    """The base of what a command reads: the Base model field, else the picked file's (merge: the first line's)."""
    command = COMMANDS.get(f.get("command") or "")
    if command == "bake":
        return None  # it writes a checkpoint, not a LoRA of a base
    if (f.get("model") or "").strip():
        return checkpoint(outputs, f["model"], "Base model", user)
    first = next((x.strip() for x in str(f.get("files") or "").splitlines() if x.strip()), "")
    value = first if command == "merge" else f.get("file") or ""
    return base_of(outputs, value if value.count(":") < 2 else value.rpartition(":")[0], user)


def remember_base(outputs: Path, out: Path | None, base: str | None, user: str | None = None) -> None:
    """Record the base of a written result (a later Info passes it as --model; Preview draws on it)."""
    if out is None or base is None or not out.is_file():
        return
    bases = recorded_bases(outputs, user)
    bases[out.name] = base
    atomic_write_text(tools_dir(outputs, user) / BASES_FILE, json.dumps(bases, indent=1))


def store_upload(outputs: Path, src: str | Path, user: str | None = None) -> str:
    """Copy an uploaded LoRA into the user's tools uploads (header checked, an existing name kept: `-2`, `-3` ...).
    Returns its picker value."""
    from trainer.io import read_safetensors_header
    from trainer.lora_files.shapes import check_shapes

    src = Path(src)
    name = sanitize_name(src.name)
    if not name.lower().endswith(SUFFIX):
        raise ToolError(f"{src.name}: only .safetensors files are accepted (.ckpt/.pt may be pickles that run code)")
    try:
        header = read_safetensors_header(src)
        check_shapes(src.name, {k: tuple(v.get("shape", ())) for k, v in header.items()
                                if k != "__metadata__" and isinstance(v, dict)})
    except (OSError, ValueError) as err:
        raise ToolError(f"{src.name}: not a readable LoRA file ({str(err).replace(str(src), src.name)})") from None
    folder = tools_dir(outputs, user) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    stem, n = name[: -len(SUFFIX)], 1
    while (folder / name).exists():
        n += 1
        name = f"{stem}-{n}{SUFFIX}"
    shutil.copyfile(src, folder / name)
    return f"upload:{name}"


# ----------------------------------------------------------------------------- checking the form


def positive_int(value: Any, what: str, zero: bool = False) -> int:
    """A whole number ≥ 1 (≥ 0 with `zero`) from a number field or text; ToolError naming `what` otherwise."""
    text = str(value).strip() if value is not None else ""
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number) or number < (0 if zero else 1):
        least = "0 or more" if zero else "1 or more"
        raise ToolError(f"{what} must be a whole number, {least} (got {text or 'nothing'!r})")
    return int(number)


def number(value: Any, what: str) -> float:
    """A finite number from a field or text; ToolError naming `what` otherwise."""
    text = str(value).strip() if value is not None else ""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if isinstance(value, bool) or not math.isfinite(x):
        raise ToolError(f"{what} must be a number (got {text or 'nothing'!r})")
    return x


def weighted_files(outputs: Path, text: str, user: str | None = None) -> list[tuple[Path, float]]:
    """'FILE:WEIGHT' lines (FILE a picker value; no weight: 1.0) as (path, weight); blank lines skipped."""
    items = []
    for n, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        value, sep, weight = line.rpartition(":")
        if not sep or value.count(":") < 1:  # only the picker's own colon: no weight given
            value, weight = line, "1"
        try:
            items.append((resolve(outputs, value.strip(), user), number(weight, f"line {n}: the weight")))
        except ToolError as err:
            raise ToolError(f"{err} (lines are FILE:WEIGHT, e.g. run:my-style/my-style.safetensors:0.7)") from None
    if not items:
        raise ToolError("add the LoRA files to combine, one FILE:WEIGHT a line (the Add button adds the picked file)")
    return items


def checkpoint(outputs: Path, value: str, what: str, user: str | None = None) -> str:
    """A base model argument: builtin:..., a hub id, or a path. With login a path must lie in the base folders
    (form.base_roots) and, inside outputs/, be the user's own (app/auth.may_read), as the base picker's rule."""
    from app.auth import may_read
    from app.form import base_roots

    value = (value or "").strip()
    if not value:
        raise ToolError(f"{what}: give a base model (builtin:..., a hub id, a .safetensors file or a folder)")
    if value.startswith("builtin:") or user is None:
        return value
    path = Path(value).expanduser().resolve()
    inside = any(path.is_relative_to(root) for root in base_roots(Path(outputs)))
    if path.exists() and inside and may_read(Path(outputs).resolve(), str(path), user):
        return str(path)
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", value):  # a hub id
        return value
    raise ToolError(f"{what}: {value}: hub id or path not found here")


def out_path(outputs: Path, user: str | None, command: str, name: str, default: str) -> Path:
    """Where a command writes: a plain file name in the user's tools folder (checkpoints/ for bake)."""
    raw = ((name or "").strip() or default).replace("\\", "/").rsplit("/", 1)[-1]
    single = raw.lower().endswith(SUFFIX)
    clean = sanitize_name(raw[: -len(SUFFIX)] if single else raw, 100)
    folder = tools_dir(outputs, user)
    if command == "bake":  # a name without .safetensors: a diffusers folder
        return folder / "checkpoints" / (clean + SUFFIX if single else clean)
    return folder / (clean + SUFFIX)


def _rank_args(f: dict, command: str, required: bool) -> list[str]:
    args = []
    if f.get("rank") not in (None, ""):
        args += ["--rank", str(positive_int(f["rank"], "Rank"))]
    if f.get("dynamic"):
        if f["dynamic"] not in METHODS:
            raise ToolError(f"dynamic method must be one of {', '.join(METHODS)}")
        param = number(f.get("param"), f"the {f['dynamic']} parameter")
        if param <= 0:
            raise ToolError(f"the {f['dynamic']} parameter must be above 0 (got {param:g})")
        args += ["--dynamic", f["dynamic"], "--param", str(param)]
    if required and not args:
        raise ToolError(f"{command}: give a rank (or a dynamic method and its parameter)")
    return args


def _to_args(f: dict) -> list[str]:
    to = (f.get("to") or "").strip()
    if to and to not in LAYOUTS:
        return []  # "same as the input"
    return ["--to", to] if to else []


def _meta_args(f: dict) -> list[str]:
    args = []
    for key in META_FIELDS:
        text = " ".join(str(f.get(key) or "").split())  # one line each
        if text:
            args += ["--set", f"{key}={text}"]
    if f.get("thumbnail"):
        if not Path(f["thumbnail"]).is_file():
            raise ToolError("the thumbnail image is gone: add it again")
        args += ["--thumbnail", str(f["thumbnail"])]
    if not args:
        raise ToolError("Edit metadata: fill in at least one field (title, author, trigger, tags, description) or "
                        "add a thumbnail")
    return args


def build_args(outputs: Path, f: dict, user: str | None = None) -> tuple[list[str], Path | None]:
    """(the arguments after `python -m trainer lora`, the path the command writes or None) from the form's values.
    Raises ToolError with one line when a value is refused."""
    command = COMMANDS.get(f.get("command") or "")
    if command is None:
        raise ToolError(f"unknown command {f.get('command')!r} (one of {', '.join(COMMANDS)})")
    model = (f.get("model") or "").strip()
    if command in ("info", "resize", "meta"):
        src = resolve(outputs, f.get("file") or "", user)
        stem = src.name[: -len(SUFFIX)]
    if command == "info":
        return ["info", str(src), *(["--model", checkpoint(outputs, model, "Base model", user)] if model else [])], None
    over = ["--overwrite"] if f.get("overwrite") else []
    model_args = ["--model", checkpoint(outputs, model, "Base model", user)] if model else []
    if command == "resize":
        rank = _rank_args(f, "Resize", required=True)
        tag = f"r{rank[1]}" if rank[0] == "--rank" and "--dynamic" not in rank else str(f.get("dynamic"))
        out = out_path(outputs, user, command, f.get("out_name"), f"{stem}-{tag}")
        conv = positive_int(f.get("conv_rank") or 0, "Conv rank", zero=True)
        args = ["resize", str(src), *rank, *(["--conv-rank", str(conv)] if conv else []), *_to_args(f), *model_args]
    elif command == "merge":
        items = weighted_files(outputs, f.get("files"), user)
        out = out_path(outputs, user, command, f.get("out_name"), "merged")
        args = ["merge", *[f"{p}:{w:g}" for p, w in items], *_rank_args(f, "Merge", required=False), *_to_args(f),
                *model_args]
    elif command == "bake":
        base = checkpoint(outputs, model, "Base model (the checkpoint to bake into)", user)
        items = weighted_files(outputs, f.get("files"), user)
        default = "baked" + (SUFFIX if base.endswith(SUFFIX) else "")
        out = out_path(outputs, user, command, f.get("out_name"), default)
        args = ["bake", base, *[f"{p}:{w:g}" for p, w in items]]
    elif command == "extract":
        base = checkpoint(outputs, model, "Base model (the original checkpoint)", user)
        tuned = checkpoint(outputs, f.get("tuned") or "", "Fine-tuned checkpoint", user)
        out = out_path(outputs, user, command, f.get("out_name"), "extracted")
        conv = positive_int(f.get("conv_rank") or 0, "Conv rank", zero=True)
        args = ["extract", "--base", base, "--tuned", tuned, *_rank_args(f, "Extract", required=True),
                *(["--conv-rank", str(conv)] if conv else []), *_to_args(f)]
    else:
        out = out_path(outputs, user, command, f.get("out_name"), f"{stem}-meta")
        args = ["meta", str(src), *_meta_args(f)]
    return [*args, "--out", str(out), *over], out
