"""The preview worker: `python -m trainer preview --base MODEL` serves a Previewer over JSON lines on stdin/stdout.

app/preview.py talks to it, so the web server never imports torch and a crash or OOM ends only this process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trainer.preview.previewer import AdapterError, Previewer


DRAW_OPS = ("generate", "compare", "grid")
EXAMPLE = '{"op": "generate", "prompt": "a cat", "out": "cat.png", "adapters": {"mine": 1.0}}'
NUMBERS = {"steps": int, "seed": int, "width": int, "height": int, "guidance": float}


def check_request(req: dict) -> None:
    """Raise ValueError in one line that names the field and shows a good request, before anything is drawn (a
    missing prompt would otherwise be "TypeError: generate() missing 1 required positional argument")."""
    op = req.get("op")
    if op == "load" and not isinstance(req.get("path"), str):
        raise ValueError('load: give the adapter file as "path", e.g. {"op": "load", "path": "my-lora.safetensors"}')
    if op not in DRAW_OPS:
        return
    for field in ("prompt", "out"):  # an empty prompt draws unconditioned, as the UI allows; a missing one is a slip
        if not isinstance(req.get(field), str) or (field == "out" and not req[field].strip()):
            raise ValueError(f"{op}: the request needs a text '{field}', e.g. {EXAMPLE}")
    for field, kind in NUMBERS.items():
        value = req.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"{op}: '{field}' is {value!r}; give a{'n integer' if kind is int else ' number'}")
    adapters = req.get("adapters") or {}
    if not isinstance(adapters, dict) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                  for w in adapters.values()):
        raise ValueError(f"{op}: 'adapters' is {adapters!r}; give {{name: weight}} with a number per adapter")


def _handle(pv: Previewer, req: dict) -> dict:
    op = req.get("op")
    check_request(req)
    common = {k: req[k] for k in ("prompt", "negative", "steps", "guidance", "seed", "width", "height") if k in req}
    if op in DRAW_OPS:
        for name, path in (req.get("files") or {}).items():  # {name: path}: loaded (or found cached) first
            pv.load_adapter(path, name)
        adapters = {k: float(v) for k, v in (req.get("adapters") or {}).items()}
        out = Path(req["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
    if op == "load":
        return pv.load_adapter(req["path"], req.get("name"))
    if op == "generate":
        image, t = pv.generate(adapters=adapters, **common)
        image.save(out)
        return {"image": str(out), **t}
    if op == "compare":
        lora, base, t = pv.compare(adapters, **common)
        base_out = out.with_name(out.stem + "-base.png")
        lora.save(out)
        base.save(base_out)
        return {"image": str(out), "base_image": str(base_out), **t}
    if op == "grid":
        kw = {k: v for k, v in common.items() if k != "seed"}
        sheet, t = pv.grid(adapters, tuple(req.get("strengths", (0.0, 0.5, 1.0))),
                           tuple(req.get("seeds", (0, 1, 2))), **kw)
        sheet.save(out)
        return {"image": str(out), **t}
    if op == "release":
        return pv.release()
    if op == "resume":
        return pv.resume()
    if op == "state":
        return pv.state()
    raise ValueError(f"unknown op {op!r}")


def serve(base: str, **kwargs) -> int:
    """JSON lines on stdin -> one JSON line per request on stdout: {"id", "ok": true, ...} or {"ok": false, "error"}.

    Only protocol lines go to the real stdout; anything libraries print goes to stderr (the worker's log).
    """
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        pv = Previewer(base, **kwargs)
    except Exception as err:
        reply({"id": 0, "ok": False, "error": f"cannot load the base model: {err}", "fatal": True})
        return 2
    reply({"id": 0, "ok": True, "ready": True, **pv.state()})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as err:
            reply({"id": None, "ok": False, "error": f"bad request: {err}"})
            continue
        if req.get("op") == "quit":
            reply({"id": req.get("id"), "ok": True})
            break
        try:
            reply({"id": req.get("id"), "ok": True, **_handle(pv, req)})
        except (AdapterError, ValueError, KeyError, FileNotFoundError) as err:
            reply({"id": req.get("id"), "ok": False, "error": str(err)})
        except Exception as err:  # keep serving: one bad request must not end the worker
            print(f"preview: {type(err).__name__}: {err}", file=sys.stderr)
            reply({"id": req.get("id"), "ok": False, "error": f"{type(err).__name__}: {err}"})
    return 0
