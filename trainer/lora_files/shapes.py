"""Shape checks of a LoRA file's modules, on shapes alone: a safetensors header is enough, so the web UI checks an
upload without torch, and convert/preview check before anything is written or loaded.

Each module's down/up pair (kohya `lora_down`/`lora_up`, peft `lora_A`/`lora_B`) must be a Linear (2-D) or Conv2d
(4-D) pair of one rank: down [r, in(, kh, kw)], up [out, r(, 1, 1)]; alpha a single number; with a base model, the
pair must fit the base module's weight [out, in(, kh, kw)]. A file that breaks any of these would convert "fine"
and fail (or silently do nothing) in every consumer, so it is refused naming the module.
"""

from __future__ import annotations

PAIRS = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"))


def _pairs(shapes: dict[str, tuple]) -> dict[str, tuple[tuple, tuple, tuple | None]]:
    """{module: (down shape, up shape, alpha shape or None)} for every module that has a down or an up tensor."""
    modules: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        for suffix in (*(s for pair in PAIRS for s in pair), "alpha"):
            if key.endswith("." + suffix):
                modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = tuple(shape)
                break
    out = {}
    for name, group in modules.items():
        down, up = next(((group.get(d), group.get(u)) for d, u in PAIRS if d in group or u in group), (None, None))
        if down is not None or up is not None:
            out[name] = (down, up, group.get("alpha"))
    return out


def pair_problem(down: tuple | None, up: tuple | None, alpha: tuple | None = None) -> str:
    """"" when a module's tensors agree with each other, else what is wrong."""
    if down is None or up is None:
        return "has no down/up pair (one of the two tensors is missing)"
    if len(down) not in (2, 4) or len(up) != len(down):
        return f"down {list(down)} / up {list(up)} are not a Linear (2-D) or Conv2d (4-D) pair"
    if down[0] != up[1]:
        return f"down {list(down)} has rank {down[0]} but up {list(up)} has rank {up[1]}"
    if down[0] == 0:
        return f"down {list(down)} / up {list(up)} have rank 0 (empty tensors)"
    if len(up) == 4 and tuple(up[2:]) != (1, 1):
        return f"up {list(up)} of a Conv2d pair must be 1x1"
    if alpha is not None and alpha not in ((), (1,)):
        return f"alpha has shape {list(alpha)}; it must be one number"
    return ""


def base_problem(down: tuple, up: tuple, weight: tuple) -> str:
    """"" when a consistent pair fits a base weight [out, in(, kh, kw)], else what is wrong."""
    rank = down[0]
    want_down = (rank, *weight[1:]) if len(weight) == 4 else (rank, weight[1])
    want_up = (weight[0], rank, 1, 1) if len(weight) == 4 else (weight[0], rank)
    if tuple(down) != want_down or tuple(up) != want_up:
        return (f"down {list(down)} / up {list(up)} do not fit the base model's weight {list(weight)} "
                "(a LoRA for another base model?)")
    return ""


def check_shapes(label: str, shapes: dict[str, tuple]) -> None:
    """Raise ValueError naming `label` and the first module whose tensors disagree."""
    for name, (down, up, alpha) in sorted(_pairs(shapes).items()):
        if problem := pair_problem(down, up, alpha):
            raise ValueError(f"{label}: module {name}: {problem}; the file is broken")


def check_base_fit(label: str, peft_shapes: dict[str, tuple], base_shape) -> None:
    """Raise ValueError naming the first module of a peft-layout file (`part.module.lora_A.weight` ...) whose pair
    does not fit its base weight. `base_shape(part, module)`: that weight's shape (raises ValueError when absent)."""
    for name, (down, up, _) in sorted(_pairs(peft_shapes).items()):
        part, _, module = name.partition(".")
        if problem := base_problem(down, up, tuple(base_shape(part, module.removeprefix("text_model.")))):
            raise ValueError(f"{label}: module {name}: {problem}")
