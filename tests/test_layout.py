"""The layout rules, kept by tests: imports between trainer's packages go only the way each package's __init__ says
(its "May import:" line), no module imports itself back through others (no cycle, lazy imports included), and no
code outside trainer/families/ names a base family: everything that differs between bases lives in its family module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

TRAINER = ROOT / "trainer"
LEAVES = {"trainer.config", "trainer.config_lora", "trainer.events", "trainer.io", "trainer.versions"}
TOP = {"trainer.cli", "trainer.__main__"}  # the command line imports any package
# Base names a code string may still hold outside families/: names of other things (a builtin base, a preset, a hub
# id), never a test of which base a run has.
ALLOWED = ("builtin:tiny-sd15", "tiny-sd15", "builtin:tiny-sd35", "tiny-sd35", "sd15-style",
           "stable-diffusion-v1-5/stable-diffusion-v1-5")
BASE_NAME = re.compile(r"(?i)(?<![a-z0-9])(sd[ _-]?(1|2|3)(\.[x05]|5)?|sdxl|sd3\.5|sd35[ml]?|stable diffusion (1|2|xl|3))"
                       r"(?![a-z0-9])")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = TRAINER) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path], package: str = "trainer") -> set[str]:
    """Every `package` module `path` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(package)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            for alias in node.names:  # `from trainer.x import y`: the module trainer.x.y when there is one
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def allowed_imports(package: str) -> set[str]:
    """The 'May import:' line of a package's __init__ docstring (it may wrap onto following lines)."""
    init = TRAINER / package.split(".", 1)[1] / "__init__.py" if package != "trainer" else TRAINER / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    assert "May import:" in doc, f"{init.relative_to(ROOT)}: its docstring must say what the package may import"
    return set(re.findall(r"trainer(?:\.\w+)?", doc.split("May import:", 1)[1]))


def test_packages_import_only_what_their_init_allows():
    known = modules()
    wrong = []
    for module, path in known.items():
        package = package_of(module)
        if module in TOP or package == "trainer":
            continue
        allowed = LEAVES if module in LEAVES else allowed_imports(package) | {package}
        if module in LEAVES:
            allowed = allowed_imports("trainer") | {module}
        for target in imports_of(path, known):
            if package_of(target) not in allowed:
                wrong.append(f"{module} imports {target} ({package} may import {', '.join(sorted(allowed))})")
    assert not wrong, "imports against the stated direction:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", ["trainer", "app"])
def test_no_import_cycles(package):
    known = modules(ROOT / package)
    graph = {m: {t for t in imports_of(p, known, package) if t in known and t != m} for m, p in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def code_words(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant that is not a docstring and every name defined or used in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            words.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            words.append((node.lineno, node.arg))
        elif isinstance(node, ast.alias):
            words.append((getattr(node, "lineno", 0), node.asname or node.name))
    return words


def base_names(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for line, text in code_words(path):
            for allowed in ALLOWED:
                text = text.replace(allowed, "")
            if match := BASE_NAME.search(text):
                found.append(f"{path.name}:{line}: {match.group(0)!r} in {text[:80]!r}")
    return found


def test_base_names_appear_only_in_families():
    outside = [p for p in sorted([*TRAINER.rglob("*.py"), *(ROOT / "app").rglob("*.py")])
               if (TRAINER / "families") not in p.parents]
    found = base_names(outside)
    assert not found, ("ask the base's family (trainer/families/) instead of naming a base:\n" + "\n".join(found))


def test_the_base_name_check_catches_a_branch(tmp_path):
    """The check sees a base named in code (a string, a name, an f-string), and not in a comment or a docstring."""
    probe = tmp_path / "probe.py"
    probe.write_text('"""Docstrings may say SDXL."""\n# comments too: sd1\n\ndef f(base, sd2_scale):\n'
                     '    return base.kind == "sdxl" or f"SD 1.x {base}"\n', encoding="utf-8")
    assert sorted(base_names([probe])) == ["probe.py:4: 'sd2' in 'sd2_scale'", "probe.py:5: 'SD 1.x' in 'SD 1.x '",
                                           "probe.py:5: 'sdxl' in 'sdxl'"]
