"""A weight change as a plain LoRA no larger than the weights it changes: exact where that fits, else the rank an
error target asks for, under that size cap, with the error measured.

The SVDs are exact and cheap where the change has structure, never a full SVD of a large ΔW:
- LoKr, ΔW = kron(w1, w2): the singular values are the products of those of w1 and w2, the singular vectors the
  Kronecker products of theirs (two SVDs of factors about √out × √in);
- anything given as up·down of rank k (LoHa's closed form): two QRs and the SVD of a k × k matrix;
- a dense change (DoRA's re-normalised weight): torch.svd_lowrank of the top singular triplets the cap allows,
  the full SVD where the matrix is small, the error measured on the reconstruction.
"""

from __future__ import annotations

import time

import torch

EXACT = 1e-5  # relative error below which a truncation is the change itself, up to float32 round-off
LOWRANK_FROM = 512  # dense changes with min(out, in) above this use torch.svd_lowrank for the top triplets


class OutOfTime(RuntimeError):
    """An optional export's SVDs ran past its time budget (trainer.lora_files.export): nothing of it is written."""

    def __init__(self, budget_s: float, spent_s: float, done: int, layers: int):
        super().__init__(f"stopped after {done} of {layers} layers: {spent_s:.1f} s spent of a {budget_s:.1f} s budget")
        self.budget_s, self.spent_s, self.done, self.layers = budget_s, spent_s, done, layers

    def report(self) -> dict:
        return {"budget_s": round(self.budget_s, 1), "spent_s": round(self.spent_s, 1), "layers_done": self.done,
                "layers": self.layers}


class Deadline:
    """A time budget for one save's optional exports, checked between layers (None: no limit). The clock is
    time.monotonic from when the Deadline is made."""

    def __init__(self, budget_s: float | None):
        self.budget_s, self.start = budget_s, time.monotonic()

    def check(self, done: int, layers: int) -> None:
        """Raise OutOfTime when the budget is spent (`done` of `layers` layers finished)."""
        if self.budget_s is None:
            return
        spent = time.monotonic() - self.start
        if spent > self.budget_s:
            raise OutOfTime(self.budget_s, spent, done, layers)


def rank_cap(out: int, inner: int) -> int:
    """The largest rank whose factors [out, k] + [k, inner] hold no more numbers than the weight [out, inner]."""
    return max(1, out * inner // (out + inner))


def dropped_energy(s: torch.Tensor) -> torch.Tensor:
    """after[k - 1] = Σ s_i² for i ≥ k: what keeping the top k singular values loses (s sorted, descending)."""
    energy = s.double().pow(2)
    after = energy.flip(0).cumsum(0).flip(0)
    return torch.cat([after[1:], after.new_zeros(1)])


def choose_rank(s: torch.Tensor, cap: int, max_error: float, rest: float = 0.0) -> int:
    """The rank to keep of a change with singular values `s` (descending): the exact rank when it is within `cap`,
    else the smallest rank whose relative Frobenius error is at most `max_error`, never above `cap`.
    `rest`: ‖ΔW‖² that `s` does not hold (when it holds only the top singular values)."""
    after = dropped_energy(s) + rest
    total = float(s.double().pow(2).sum()) + rest
    if total == 0.0:
        return 1
    exact = int((after > EXACT**2 * total).sum()) + 1
    if exact <= cap:
        return min(exact, s.numel())
    return min(int((after > max_error**2 * total).sum()) + 1, cap, s.numel())


def product_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD (float64) of up [out, k] @ down [k, in] from two QRs and the SVD of a k × k matrix."""
    q1, r1 = torch.linalg.qr(up.double())
    q2, r2 = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, vh @ q2.T


def kron_truncated(w1: torch.Tensor, w2: torch.Tensor, cap: int,
                   max_error: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up, down, lost, total) of kron(w1, w2) [a·b, c·d] truncated by choose_rank; lost/total are ‖·‖² from the
    exact spectrum (the products of w1's and w2's singular values)."""
    u1, s1, vh1 = torch.linalg.svd(w1.double(), full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(w2.double(), full_matrices=False)
    s, order = torch.sort(torch.outer(s1, s2).flatten(), descending=True)
    k = choose_rank(s, cap, max_error)
    i, j = order[:k] // s2.numel(), order[:k] % s2.numel()
    root = s[:k].sqrt()
    up = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(-1, k) * root
    down = root[:, None] * (vh1[i][:, :, None] * vh2[j][:, None, :]).reshape(k, -1)
    return up, down, float(dropped_energy(s)[k - 1]), float(s.pow(2).sum())


def product_truncated(up: torch.Tensor, down: torch.Tensor, cap: int,
                      max_error: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up, down, lost, total) of up @ down truncated by choose_rank (exact SVD, lost from its spectrum)."""
    u, s, vh = product_svd(up, down)
    k = choose_rank(s, cap, max_error)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], float(dropped_energy(s)[k - 1]), float(s.pow(2).sum())


def dense_svd(delta: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
    """(u, s, vh, ‖ΔW‖², complete) of a dense change [out, in] (float32): its top q singular triplets from
    torch.svd_lowrank where the matrix is large and q small against it (complete False), else the full SVD (all of
    them, complete True). Keeping the top j loses exactly ‖ΔW‖² − Σ_{i<j} s_i² either way (both are projections of
    ΔW onto orthonormal vectors); lost_at takes the complete spectrum's tail instead, free of cancellation."""
    matrix = delta.float()
    total = float(matrix.double().pow(2).sum())
    if min(matrix.shape) > LOWRANK_FROM and q < min(matrix.shape) // 2:
        u, s, v = torch.svd_lowrank(matrix, q=min(q + 8, min(matrix.shape)), niter=2)
        return u[:, :q], s[:q], v[:, :q].T, total, False
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh, total, True


def lost_at(s: torch.Tensor, total: float, k: int, complete: bool) -> float:
    """‖ΔW − ΔW_k‖² of the top-k truncation, from dense_svd's singular values and ‖ΔW‖²."""
    if complete:
        return float(s[k:].double().pow(2).sum())
    return max(total - float(s[:k].double().pow(2).sum()), 0.0)


def error_report(lost: dict[str, float], total: dict[str, float], max_error: float, numbers: int,
                 weight_numbers: int) -> dict:
    """What a compact file's header says: {"exact", "max_error" (the target), "rel_error": {part: ‖ΔW − ΔW_k‖/‖ΔW‖
    over the part}, "max_layer_rel_error", "worst_layer", "bytes" (its fp32 factors), "weight_bytes" (the fp32
    weights it changes)} from per-layer squared errors keyed "part.module"."""
    parts_lost: dict[str, float] = {}
    parts_total: dict[str, float] = {}
    worst = (0.0, "")
    for name, miss in lost.items():
        part = name.split(".", 1)[0]
        parts_lost[part] = parts_lost.get(part, 0.0) + miss
        parts_total[part] = parts_total.get(part, 0.0) + total[name]
        worst = max(worst, ((miss / total[name]) ** 0.5 if total[name] else 0.0, name))
    rel = {p: (parts_lost[p] / parts_total[p]) ** 0.5 if parts_total[p] else 0.0 for p in parts_lost}
    return {"exact": worst[0] <= EXACT, "max_error": max_error, "rel_error": rel, "max_layer_rel_error": worst[0],
            "worst_layer": worst[1], "bytes": 4 * numbers, "weight_bytes": 4 * weight_numbers}


def meets_target(report: dict) -> bool:
    """Does a compact file come near exact: every part's relative error within the target?"""
    return all(err <= report["max_error"] for err in report["rel_error"].values())


def _sizes(f) -> tuple[int, int, int]:
    """(out, in·kh·kw, rank) of one layer's factors."""
    return f.up.shape[0], f.down[0].numel(), f.down.shape[0]


def _compact_layer(f, max_error: float):
    """One LyCORIS layer's factors truncated by choose_rank under its own cap; (factors, lost, total)."""
    from dataclasses import replace

    out, inner, _ = _sizes(f)
    cap = rank_cap(out, inner)
    if f.kron is not None:
        up, down, lost, total = kron_truncated(*f.kron, cap, max_error)
    else:
        up, down, lost, total = product_truncated(f.scale * f.up.flatten(1), f.down.flatten(1), cap, max_error)
    if f.down.dim() == 4:
        up, down = up[:, :, None, None], down.reshape(-1, *f.down.shape[1:])
    return replace(f, up=up.float().contiguous(), down=down.float().contiguous(), scale=1.0, kron=None), lost, total


def compact_factors(factors: dict, max_error: float, deadline: Deadline | None = None) -> tuple[dict, dict | None]:
    """LyCORIS layers' factors no larger in total than the weights they change: the exact closed forms when they all
    fit; else each layer's closed form where it fits its own weight, the others truncated (exact SVD, rank by
    `max_error`, under the per-layer cap). Returns (factors, error_report of the LyCORIS layers or None).
    `deadline`: checked before each truncated layer (raises OutOfTime)."""
    lycoris = {n: f for n, f in factors.items() if f.lycoris}
    if not lycoris:
        return factors, None
    weight = {n: _sizes(f)[0] * _sizes(f)[1] for n, f in lycoris.items()}
    exact = {n: _sizes(f)[2] * (_sizes(f)[0] + _sizes(f)[1]) for n, f in lycoris.items()}
    fits_whole = sum(exact.values()) <= sum(weight.values())
    out, lost, total = dict(factors), {}, {}
    for i, (name, f) in enumerate(lycoris.items()):
        if fits_whole or exact[name] <= weight[name]:
            up, down = f.up.flatten(1).double(), f.down.flatten(1).double()  # ‖s·up·down‖² without forming ΔW
            lost[name], total[name] = 0.0, f.scale**2 * float(((up.T @ up) * (down @ down.T)).sum())
            continue
        if deadline is not None:
            deadline.check(i, len(lycoris))
        out[name], lost[name], total[name] = _compact_layer(f, max_error)
    numbers = sum(_sizes(out[n])[2] * (_sizes(out[n])[0] + _sizes(out[n])[1]) for n in lycoris)
    return out, error_report(lost, total, max_error, numbers, sum(weight.values()))
