"""The fast training path: torch.compile of the trained models, verified against the eager path before use.

Compiling the forward of the LoRA'd UNet / text encoders (their backward is compiled with them) removes Python and
kernel-launch overhead: on CUDA, mode "reduce-overhead" replays CUDA graphs, and dynamic=False keeps one static
graph per bucket shape (each bucket compiles on its first step). Compiled here rather than through accelerate's
dynamo plugin, which lives in the process-wide AcceleratorState that the first run of a process fixes.

Speed must not change the result, and compilers have bugs: with torch 2.13 on CPU, inductor's backward of
diffusers' UNet up block (resnet -> Upsample2D) returns wrong gradients (the mid block's LoRA gradients come out
zero; `aot_eager` is exact, so it is inductor's C++ code generation). So before training, one micro-batch runs
both ways and the gradients of all LoRA parameters are compared; if they disagree the run falls back to the eager
path and says so in its events. The check costs one extra eager forward+backward.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch

# Gradients of the compiled and the eager path may differ by rounding (bf16: ~1e-2 relative after a deep network);
# a miscompile shows up as tens of percent.
MAX_GRAD_ERROR = 0.1


def backend() -> str:
    # STYLE_LORA_COMPILE_BACKEND: tests and debugging (e.g. aot_eager: dynamo + autograd graphs, no code generation).
    return os.environ.get("STYLE_LORA_COMPILE_BACKEND", "inductor")


def compile_models(models: dict[str, torch.nn.Module], trained: set[str], device: torch.device) -> dict:
    """{name: compiled module} for the trained ones, the others as they are."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one graph per bucket
    # A graph that fails to compile (e.g. a later bucket's shape) runs eagerly instead of ending the run.
    torch._dynamo.config.suppress_errors = True
    mode = "reduce-overhead" if device.type == "cuda" and backend() == "inductor" else None
    return {n: torch.compile(m, backend=backend(), mode=mode, dynamic=False) if n in trained else m
            for n, m in models.items()}


def _lora_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for p in params])


def gradient_error(params: list[torch.nn.Parameter], eager_backward: Callable[[], None],
                   compiled_backward: Callable[[], None]) -> tuple[float, float]:
    """(relative L2 difference of all LoRA gradients, seconds the compiled pass took, i.e. mostly compiling)."""
    for p in params:
        p.grad = None
    eager_backward()
    reference = _lora_grads(params)
    for p in params:
        p.grad = None
    t0 = time.time()
    compiled_backward()
    seconds = time.time() - t0
    fast = _lora_grads(params)
    for p in params:
        p.grad = None
    return float((fast - reference).norm() / reference.norm().clamp_min(1e-30)), seconds


def enable(eager: dict[str, torch.nn.Module], trained: set[str], params: list[torch.nn.Parameter],
           device: torch.device, backward: Callable[[dict], None], mean_over_processes: Callable[[float], float],
           optimizer) -> tuple[dict, dict]:
    """Compile the trained models and check one micro-batch against the eager path before trusting them.
    `backward(models)`: one micro-batch's backward through `models` (the same batch each call). Returns (the models to
    train with: compiled, or eager when the check failed, the fast_path event's fields)."""
    compiled = compile_models(eager, trained, device)

    def backward_with(models: dict) -> None:
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        backward(models)

    try:
        error, seconds = gradient_error(params, lambda: backward_with(eager), lambda: backward_with(compiled))
        reason = f"compiled gradients differ from the eager path by {error:.1%}"
    except Exception as err:  # a compiler failure must not end the run: it trains on the eager path
        error, seconds, reason = float("inf"), 0.0, f"compiling failed: {type(err).__name__}: {str(err)[:300]}"
        optimizer.zero_grad(set_to_none=True)
    error = mean_over_processes(error)
    ok = error <= MAX_GRAD_ERROR
    return (compiled if ok else eager), {
        "enabled": ok, "grad_error": round(error, 6) if math.isfinite(error) else None,
        "compile_s": round(seconds, 1), "backend": backend(),
        "reason": None if ok else f"{reason}: training on the eager path"}
