"""Truncated SVD of one module's ΔW: a LoRA (up·down) of a fixed rank, or of the rank kohya sd-scripts'
networks/resize_lora.py chooses from the singular values (sv_ratio, sv_fro, sv_cumulative), with what it kept.

The split is kohya's: up = U·S, down = Vh, so a file written from it has alpha = rank (scale 1). A conv ΔW
[out, in, kh, kw] is factored as the matrix [out, in·kh·kw]; down keeps the kernel ([r, in, kh, kw]) and up is a 1×1
conv ([out, r, 1, 1]), the LoCon shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # kohya: a ΔW whose largest singular value is this small counts as zero and gets rank 1
SMALL = 1 << 20  # matrices up to this many elements are factored in float64 (exact to float32 rounding, still fast)
LOWRANK_MIN_DIM = 1024  # randomized SVD only for matrices this large and a fixed rank ≤ min(dim)/8


@dataclass
class LowRank:
    """A ΔW ≈ up·down. kept = sqrt(Σ s_i² kept / Σ s_i²); error = ‖ΔW − up·down‖_F / ‖ΔW‖_F measured on up, down."""

    down: torch.Tensor  # [r, in(, kh, kw)]
    up: torch.Tensor  # [out, r(, 1, 1)]
    kept: float
    error: float

    @property
    def rank(self) -> int:
        """The rank of up·down."""
        return self.down.shape[0]


def _index_sv_ratio(s: torch.Tensor, param: float) -> int:
    # kohya: the count of s > s_max/param, minus one (the +1 comes in choose_rank)
    return int(torch.sum(s > s[0] / param).item()) - 1


def _index_sv_fro(s: torch.Tensor, param: float) -> int:
    squared = s.pow(2)
    cumulative = torch.cumsum(squared, dim=0) / float(torch.sum(squared))
    return int(torch.searchsorted(cumulative, torch.tensor(param**2, dtype=cumulative.dtype)))


def _index_sv_cumulative(s: torch.Tensor, param: float) -> int:
    cumulative = torch.cumsum(s, dim=0) / float(torch.sum(s))
    return int(torch.searchsorted(cumulative, torch.tensor(param, dtype=cumulative.dtype)))


_INDEX = {"sv_ratio": _index_sv_ratio, "sv_fro": _index_sv_fro, "sv_cumulative": _index_sv_cumulative}


def choose_rank(singular_values: torch.Tensor, dynamic: str | None, param: float | None, max_rank: int | None) -> int:
    """The rank kohya's resize_lora.py rank_resize() gives: the method's index clamped to [0, len−1], plus one,
    capped at max_rank; rank 1 when the largest singular value is ≤ 1e-6. Without `dynamic`, max_rank (capped at the
    number of singular values). `singular_values` are sorted descending, as torch.linalg.svd returns them."""
    s = singular_values.detach().flatten()
    count = s.numel()
    if dynamic is None:
        if max_rank is None or max_rank < 1:
            raise ValueError(f"choose_rank: a rank ≥ 1 or a dynamic method ({', '.join(METHODS)}) is needed")
        return max(1, min(max_rank, count))
    if dynamic not in _INDEX:
        raise ValueError(f"choose_rank: unknown dynamic method {dynamic!r}; use one of {', '.join(METHODS)}")
    if param is None or param <= 0:
        raise ValueError(f"choose_rank: --dynamic {dynamic} needs a --param > 0")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"choose_rank: the largest rank must be ≥ 1, not {max_rank}")
    if count == 0 or float(s[0]) <= MIN_SV:
        return 1
    rank = max(0, min(_INDEX[dynamic](s, param), count - 1)) + 1
    return rank if max_rank is None else min(rank, max_rank)


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    if delta.ndim == 2:
        return delta
    if delta.ndim == 4:
        return delta.reshape(delta.shape[0], -1)
    raise ValueError(f"low_rank: a Linear [out, in] or Conv2d [out, in, kh, kw] ΔW is needed, not {tuple(delta.shape)}")


def _shaped(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """up [out, r] and down [r, in·kh·kw] in the module's shapes (conv: down keeps the kernel, up is 1×1)."""
    if delta.ndim == 4:
        return up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *delta.shape[1:])
    return up, down


def _factors(matrix: torch.Tensor, rank: int | None, dynamic: str | None, param: float | None):
    """(up [out, r], down [r, in], kept) in float32, by full SVD, or randomized SVD where only a small fixed rank of
    a large matrix is wanted (its quality is measured afterwards like any other)."""
    rows, cols = matrix.shape
    smallest = min(rows, cols)
    total_sq = float(matrix.double().pow(2).sum())
    if dynamic is None and rank is not None and smallest >= LOWRANK_MIN_DIM and rank <= smallest // 8:
        torch.manual_seed(0)  # the sketch is random; a fixed seed keeps a rerun's file identical
        u, s, v = torch.svd_lowrank(matrix.float(), q=min(2 * rank + 8, smallest), niter=4)
        vh = v.T
    else:
        work = matrix.double() if matrix.numel() <= SMALL else matrix.float()
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = choose_rank(s.float(), dynamic, param, rank)
    kept_sq = float(s[:r].double().pow(2).sum())
    kept = 1.0 if total_sq == 0 else min(1.0, (kept_sq / total_sq) ** 0.5)
    up = (u[:, :r] * s[:r]).float()
    down = vh[:r].float()
    return up, down, kept


def low_rank(delta: torch.Tensor, rank: int | None = None, dynamic: str | None = None,
             param: float | None = None) -> LowRank:
    """ΔW as a LoRA: at `rank` (capped at min(out, in·kh·kw)), or at the rank the `dynamic` method chooses with
    `param` (then `rank`, when given, is the largest allowed). A zero ΔW gives rank 1 zeros, kept 1, error 0."""
    matrix = _as_matrix(delta).detach()
    if not torch.is_floating_point(matrix):
        raise ValueError(f"low_rank: ΔW must be floating point, not {matrix.dtype}")
    if dynamic is None and (rank is None or rank < 1):
        raise ValueError(f"low_rank: a rank ≥ 1 or a dynamic method ({', '.join(METHODS)}) is needed")
    if not bool(matrix.any()):
        up, down = _shaped(delta, matrix.new_zeros(matrix.shape[0], 1, dtype=torch.float32),
                           matrix.new_zeros(1, matrix.shape[1], dtype=torch.float32))
        choose_rank(torch.zeros(1), dynamic, param, rank)  # the arguments are still checked
        return LowRank(down=down, up=up, kept=1.0, error=0.0)
    up, down, kept = _factors(matrix, rank, dynamic, param)
    error = relative_error(matrix, up, down)
    up, down = _shaped(delta, up, down)
    return LowRank(down=down.contiguous(), up=up.contiguous(), kept=kept, error=error)


def relative_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖ΔW − up·down‖_F / ‖ΔW‖_F (0 for a zero ΔW reproduced exactly), in float64 for small matrices."""
    matrix = delta.reshape(delta.shape[0], -1)
    dtype = torch.float64 if matrix.numel() <= SMALL else torch.float32
    matrix = matrix.to(dtype)
    residual = matrix - up.reshape(up.shape[0], -1).to(dtype) @ down.reshape(down.shape[0], -1).to(dtype)
    norm = float(torch.linalg.matrix_norm(matrix))
    rest = float(torch.linalg.matrix_norm(residual))
    if norm == 0:
        return 0.0 if rest == 0 else float("inf")
    return rest / norm
