"""The readable-core rules, kept by a test: files under 400 lines and functions under 100 in trainer/ and app/, and
every event the trainer writes named by a constant of trainer/events.py (the protocol between trainer and UI)."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 100


def sources():
    for folder in ("trainer", "app"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_files_and_functions_stay_short():
    too_long = []
    for path in sources():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "split these into named top-level steps:\n" + "\n".join(too_long)


def test_events_are_emitted_by_their_constant_names():
    bare = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in sources()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"\.emit\(\s*[\"']", line)]
    assert not bare, "use the kind constants of trainer/events.py:\n" + "\n".join(bare)
