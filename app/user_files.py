"""Where each user's files live under outputs/ (the preview uploads, the Tools tab's folder and its results): the
bottom of app/, imported by preview_client, tools_view and auth alike. No gradio, no torch.

  OUTPUTS/.private/user-key                    the key of the per-user folder names (never served)
  OUTPUTS/.preview/adapters/<user-KEY>/        adapters uploaded into Preview (without login: .preview/adapters/)
  OUTPUTS/.tools/<local | user-KEY>/           the Tools tab's results, uploads/ and checkpoints/ (app/tools_view.py)
KEY is a keyed hash of the user name: nobody else can guess it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from app.uploads import sanitize_name

PRIVATE_DIR = ".private"  # under outputs/, never served
TOOLS_DIR = ".tools"
SUFFIX = ".safetensors"
BASES_FILE = ".bases.json"  # in a tools folder: result name -> the base it belongs to (Info's --model, Preview's base)


def preview_dir(outputs: Path) -> Path:
    return Path(outputs) / ".preview"


def uploads_dir(outputs: Path, user: str | None = None) -> Path:
    """Uploaded adapters; with login, each user's in a folder named by a keyed hash nobody else can guess."""
    folder = preview_dir(outputs) / "adapters"
    if user is None:
        return folder
    key_file = Path(outputs) / PRIVATE_DIR / "user-key"  # app/__main__ puts PRIVATE_DIR in gradio's blocked_paths
    if not key_file.is_file():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_hex(32))
    digest = hmac.new(key_file.read_text().encode(), user.encode(), hashlib.sha256).hexdigest()[:32]
    return folder / f"user-{digest}"


def tools_dir(outputs: Path, user: str | None = None) -> Path:
    """The user's tools folder: OUTPUTS/.tools/local without login, else .tools/user-KEY (unguessable)."""
    return Path(outputs) / TOOLS_DIR / (uploads_dir(outputs, user).name if user is not None else "local")


def tool_results(outputs: Path, user: str | None = None) -> list[Path]:
    """The LoRA files the user's commands wrote (newest first): what Preview lists as `tool:NAME`."""
    folder = tools_dir(outputs, user)
    files = [p for p in folder.glob(f"*{SUFFIX}") if p.is_file()] if folder.is_dir() else []
    return sorted(files, key=lambda p: (-p.stat().st_mtime, p.name))


def tool_result(outputs: Path, name: str, user: str | None = None) -> Path:
    """The user's result file `name`; FileNotFoundError for anything else."""
    path = tools_dir(outputs, user) / sanitize_name(name)
    if not name or path.name != name or not path.is_file() or not name.endswith(SUFFIX):
        raise FileNotFoundError(f"no tools result named {name!r}")
    return path


def recorded_bases(outputs: Path, user: str | None = None) -> dict[str, str]:
    """{result name: base model} of the user's tools results whose base is known."""
    try:
        data = json.loads((tools_dir(outputs, user) / BASES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
