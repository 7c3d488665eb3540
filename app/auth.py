"""Login on an exposed server (`python -m app --auth ...`): passwords checked in constant time, and failed attempts
throttled per user and per client address, so guessing a password costs hours instead of seconds. No torch.

Gradio calls the auth function with (username, password) only; the client's address reaches it through a context
variable set by a small ASGI middleware (`ClientAddress`) that sees every request first. After a few free failures a
user (or an address) is locked for a time that doubles with each further failure; a locked login is answered
429 with the wait in seconds, without looking at the password. Behind a reverse proxy every client has the
proxy's address: the per-address limit is then shared, the per-user limit still holds.

Gradio serves any file under outputs/ to any logged-in user (`/gradio_api/file=PATH`). A second middleware
(`RunFilesForOwner`) checks every such request against the session cookie's user: a run folder's files go only to
the run's owner, and a preview upload folder or Tools folder only to its user; anyone else gets 404, as for a missing
file.
"""

from __future__ import annotations

import contextvars
import hmac
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar("client_address", default="unknown")


class ClientAddress:
    """ASGI middleware: the peer address of the current request, for the auth function (CLIENT_ADDRESS)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        token = CLIENT_ADDRESS.set(client[0] if client else "unknown")
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(token)


class RunFilesForOwner:
    """ASGI middleware: a file request (any path with '/file=') for a file of a run folder (or of a preview upload
    folder) under outputs/ is answered 404 unless the session's logged-in user owns it."""

    def __init__(self, app, outputs: str | Path):
        self.app, self.outputs = app, Path(outputs).resolve()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if "/file=" in path and not may_read(self.outputs, path.partition("/file=")[2], session_user(scope)):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            return await send({"type": "http.response.body", "body": b"File not found."})
        await self.app(scope, receive, send)


def session_user(scope) -> str | None:
    """The logged-in user of this request, read as gradio's own login check reads it: its session cookie, looked
    up in the gradio app's token table (Starlette puts the app in scope["app"] before any middleware runs)."""
    from starlette.requests import Request

    gradio_app = scope.get("app")
    cookie_id, tokens = getattr(gradio_app, "cookie_id", None), getattr(gradio_app, "tokens", None) or {}
    if cookie_id is None:
        return None
    cookies = Request(scope).cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None


def may_read(outputs: Path, requested: str, user: str | None) -> bool:
    """False for a file in a run folder of `outputs` that is not `user`'s (or in another user's preview upload
    folder). The path is judged both as written (after '..' is folded, as gradio does) and with its links resolved,
    so neither a link nor '..' reaches a run from outside. Everything else is left to gradio's own rules."""
    from app.jobs import owner_of
    from app.user_files import TOOLS_DIR, preview_dir, tools_dir, uploads_dir

    for path in {Path(os.path.abspath(requested)), Path(os.path.realpath(requested))}:
        if not path.is_relative_to(outputs) or path == outputs:
            continue
        top = path.relative_to(outputs).parts[0]
        uploads = preview_dir(outputs) / "adapters"
        if path.is_relative_to(uploads) and path.parent != uploads:  # outputs/.preview/adapters/user-<key>/...
            if user is None or not path.is_relative_to(uploads_dir(outputs, user)):
                return False
        elif top == TOOLS_DIR:  # the Tools tab's files: outputs/.tools/user-<key>/...
            if user is None or not path.is_relative_to(tools_dir(outputs, user)):
                return False
        elif not top.startswith(".") and (user is None or owner_of(outputs / top) != user):  # a run folder
            return False
    return True


class LoginThrottle:
    """Failed logins per key ("user:NAME", "addr:IP"): `free` failures in a row cost nothing, each further one locks
    the key for first_lock_s * 2**(n - free) seconds, at most max_lock_s. A key forgets after forget_s without
    failures; a successful login clears its user's count (not the address's: one's own account must not reset
    the count of guesses at others)."""

    MAX_KEYS = 10_000  # made-up user names cannot grow the table without bound

    def __init__(self, per_user: int = 5, per_address: int = 20, first_lock_s: float = 1.0,
                 max_lock_s: float = 300.0, forget_s: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self.free = {"user": per_user, "addr": per_address}
        self.first_lock_s, self.max_lock_s, self.forget_s, self.clock = first_lock_s, max_lock_s, forget_s, clock
        self._failures: dict[str, tuple[int, float, float]] = {}  # key -> (count, last failure, locked until)
        self._lock = threading.Lock()

    @staticmethod
    def _keys(user: str, address: str) -> list[str]:
        return [f"user:{user[:200]}", f"addr:{address}"]

    def wait_s(self, user: str, address: str) -> tuple[float, str]:
        """(seconds until this login may be tried, "user" | "addr" that is locked); (0, "") when it may now."""
        now = self.clock()
        with self._lock:
            waits = [(self._failures.get(k, (0, 0, 0))[2] - now, k.split(":")[0]) for k in self._keys(user, address)]
        wait, kind = max(waits)
        return (wait, kind) if wait > 0 else (0.0, "")

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key in self._keys(user, address):
                count, last, _ = self._failures.get(key, (0, 0.0, 0.0))
                count = 1 if now - last > self.forget_s else count + 1
                over = count - self.free[key.split(":")[0]]
                locked = now + min(self.max_lock_s, self.first_lock_s * 2 ** (over - 1)) if over > 0 else 0.0
                self._failures[key] = (count, now, locked)
            if len(self._failures) > self.MAX_KEYS:
                for key in sorted(self._failures, key=lambda k: self._failures[k][1])[: len(self._failures) // 2]:
                    del self._failures[key]

    def succeeded(self, user: str, address: str) -> None:
        with self._lock:
            self._failures.pop(self._keys(user, address)[0], None)


def make_auth(users: list[tuple[str, str]], throttle: LoginThrottle | None = None) -> Callable[[str, str], bool]:
    """Gradio's `auth=` callable for these (user, password) pairs, throttled by `throttle`."""
    from fastapi import HTTPException

    table = {user: password.encode() for user, password in users}
    throttle = throttle or LoginThrottle()

    def check(username: str, password: str) -> bool:
        address = CLIENT_ADDRESS.get()
        wait, kind = throttle.wait_s(username, address)
        if wait > 0:
            who = f"user '{username}'" if kind == "user" else f"address {address}"
            raise HTTPException(status_code=429, detail=f"Too many failed logins for {who}: try again in "
                                                        f"{math.ceil(wait)} s.")
        known = table.get(username)
        ok = hmac.compare_digest(password.encode(), known if known is not None else b"\0" * 16) and known is not None
        (throttle.succeeded if ok else throttle.failed)(username, address)
        return ok

    return check


def launch_kwargs(users: list[tuple[str, str]], throttle: LoginThrottle | None = None,
                  outputs: str | Path | None = None) -> dict:
    """Keyword arguments for `Blocks.launch`: the throttled login, the middleware that tells it the client's
    address and, given `outputs`, the one that serves run files to their owners only; {} without users (a local
    server needs no login, and all its runs are its one user's)."""
    from starlette.middleware import Middleware

    if not users:
        return {}
    middleware = [Middleware(ClientAddress)] + ([Middleware(RunFilesForOwner, outputs=outputs)] if outputs else [])
    return {"auth": make_auth(users, throttle), "app_kwargs": {"middleware": middleware}}
