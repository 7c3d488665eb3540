"""Several concepts in one dataset: a `concept.toml` in a subfolder gives the images below it their own trigger
word, caption prefix and repeats.

    # my-data/2_castles/concept.toml
    trigger = "zkcastle"           # instead of data.trigger ("" = no trigger for these images)
    caption_prefix = "a castle"    # put before each caption of this folder (after the trigger)
    repeats = 4                    # instead of the folder's kohya 'N_' prefix and data.repeats

Every field is optional. The nearest concept.toml above an image that sets a field wins, so a nested folder can
override only what differs. No torch, no gradio: the UI reads and writes these files too.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import MAX_REPEATS
from trainer.io import atomic_write_text

CONCEPT_FILE = "concept.toml"


class ConceptError(ValueError):
    """A concept.toml that cannot be used; the message names the file."""


class Concept(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trigger: str | None = Field(None, description="Trigger word of this folder's images (replaces data.trigger).")
    caption_prefix: str | None = Field(None, description="Text put before each caption of this folder.")
    repeats: int | None = Field(None, ge=1, le=MAX_REPEATS, description="Times each image is seen per epoch.")


def read_concept(path: Path) -> Concept:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as err:
        raise ConceptError(f"{path}: not a readable TOML file: {err}") from None
    try:
        return Concept.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise ConceptError(f"{path}: {problems} (allowed keys: trigger, caption_prefix, repeats)") from None


def load_concepts(root: Path, files: list[Path]) -> dict[Path, Concept]:
    """{folder relative to root: Concept} for every concept.toml among `files` (the dataset's file list)."""
    root = Path(root)
    return {p.parent.relative_to(root): read_concept(p) for p in files if p.name == CONCEPT_FILE}


def concept_for(rel_parent: Path, concepts: dict[Path, Concept]) -> Concept:
    """The settings of an image in folder `rel_parent` (relative to the dataset root): for each field, the
    nearest enclosing concept.toml that sets it."""
    merged: dict = {}
    for folder in [rel_parent, *rel_parent.parents]:  # nearest first; parents of 'a/b' end with Path('.')
        if folder in concepts:
            for key, value in concepts[folder].model_dump(exclude_none=True).items():
                merged.setdefault(key, value)
    return Concept(**merged)


def write_concept(folder: Path, concept: Concept) -> Path | None:
    """Write folder/concept.toml (atomically); an all-empty concept removes the file. Returns the path written."""
    path = Path(folder) / CONCEPT_FILE
    fields = concept.model_dump(exclude_none=True)
    if not fields:
        path.unlink(missing_ok=True)
        return None
    import tomli_w

    atomic_write_text(path, tomli_w.dumps(fields))
    return path
