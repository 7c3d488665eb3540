"""Start-up check of the installed library versions against combinations known not to work together.

Read from the installed package metadata (no import of torch, transformers or peft), so `python -m trainer` and
`python -m app` can say it in one line before anything loads. The locked versions (requirements.lock, installed by
`make install`) never trigger it; a hand-upgraded environment can.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

FIX = "reinstall the locked versions with `make install` (or `pip install -r requirements.lock`)"

# (package, versions, other package, its versions, what breaks): every pair that matches is a known failure.
KNOWN_BAD = [
    ("transformers", ">=5.24", "peft", "<0.22",
     "transformers {transformers} refuses LoRA on the text encoder with peft {peft} (it needs peft >= 0.22)"),
]


def installed(package: str) -> Version | None:
    try:
        return Version(version(package))
    except PackageNotFoundError:
        return None


def incompatible_versions() -> str | None:
    """One line naming the first known-incompatible combination installed and the fix, or None."""
    for package, spec, other, other_spec, what in KNOWN_BAD:
        have, other_have = installed(package), installed(other)
        if have is None or other_have is None:
            continue
        if have in SpecifierSet(spec) and other_have in SpecifierSet(other_spec):
            return f"incompatible versions: {what.format(**{package: have, other: other_have})}; {FIX}"
    return None
