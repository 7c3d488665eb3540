"""The GPU check (issue #21): every GPU-only test and benchmark in one run, results in one JSON and one table.

Run it through bench/gpu_check.sh (which installs carried wheels first). Parts, in order:
  env          torch / CUDA / library versions and the GPU
  pytest       `pytest -m gpu` (fast path on CUDA, QLoRA, compiled preview hot-swap), beside the compile warm-up
               of the timed fast-path configurations (see warm_commands)
  sd15         bench/train_speed.py: SD1.5 at 512 px, batch 1/4/16, eager vs fast path, LoRA r16 on UNet + TE
  sd15-before  the same (fast path, batch 1) with the trainer code in .baseline/ (the code before tuning), if there
  sdxl         SDXL at 1024 px, batch 1/4, eager vs fast, LoRA r16 on the UNet only
  qlora        QLoRA (4-bit nf4 UNet) at batch 1, SD1.5 (eager and fast) and SDXL (eager): memory and speed vs bf16
  swap         bench/preview_swap.py: adapter swap in the preview, multi-adapter / hot-swap / compiled hot-swap
  sd35m        SD3.5 Medium (random, full size) at 1024 px, batch 1, LoRA r16 on the MMDiT's joint attention: eager
               without T5, with gradient checkpointing, with a T5-XXL-sized encoder, and the fast path; these
               replace the peak-memory estimates of docs/benchmarks.md (bench/sd35_memory.py). Not in the default
               parts: ask for it with `--arch sd35m` (or --parts)
  sd35l        the same for SD3.5 Large (`--arch sd35l`)
Each part runs in its own processes with a time limit; a failing part is recorded and the others still run.
`--cpu-smoke` runs the same parts on tiny models on the CPU (the test suite does, so this script never rots).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["env", "pytest", "sd15", "sd15-before", "sdxl", "qlora", "swap"]  # the default run
ARCH_PARTS = ["sd35m", "sd35l"]  # asked for by name: `--arch sd35m` is `--parts env,sd35m`
GIB_PER_GB = 1e9 / 2**30
# Targets of issue #21 (same GPU, random-weight models, bf16, rank 16).
TARGETS = [
    # (label, rows filter, measured field, comparison, target)
    ("SD1.5 512 px, batch 1, fast path", dict(arch="sd15", batch=1, path="fast", variant="lora"), "steps_s", ">=", 30),
    ("SD1.5 512 px, batch 16, fast path", dict(arch="sd15", batch=16, path="fast", variant="lora"), "images_s", ">=", 200),
    ("SDXL 1024 px UNet only, batch 1, fast path", dict(arch="sdxl", batch=1, path="fast", variant="lora"), "steps_s", ">=", 8),
    ("SDXL 1024 px UNet only, batch 4, fast path", dict(arch="sdxl", batch=4, path="fast", variant="lora"), "images_s", ">=", 20),
    ("SDXL batch 1 peak memory (GiB; 15 GB)", dict(arch="sdxl", batch=1, path="fast", variant="lora"), "peak_mem_gib", "<=",
     round(15 * GIB_PER_GB, 2)),
]


def run_part(name: str, commands: list[list[str]], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run one part's commands, output appended to the log: {rc, seconds, tail, output}. The part "pytest" starts
    its commands together (the tests beside the compile warm-up, see plan()) and its rc is the tests' (a failed
    warm-up shows in the timed runs); any other part runs them one after another and fails if one does."""
    t0, together = time.time(), name == "pytest"
    started = []  # (command, its output file, its process)
    for cmd in commands:
        out = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        RUNNING.append(proc)
        started.append((cmd, out, proc))
        if not together:
            _wait(proc, t0 + timeout)
    results = []
    with open(log, "a") as f:
        for cmd, out, proc in started:
            rc = _wait(proc, t0 + timeout)  # already ended for a sequence: its return code
            out.seek(0)
            output = out.read() + (f"\n[gpu_check] {name}: stopped at its {timeout:.0f} s limit\n" if rc == 124 else "")
            f.write(f"\n===== {name}: {' '.join(cmd)} (rc {rc})\n{output}")
            results.append((rc, output))
    seconds = round(time.time() - t0, 1)
    output = results[0][1]
    rc = results[0][0] if together else next((r for r, _ in results if r), 0)
    tail = [line for line in output.strip().splitlines() if line.strip()][-4:]
    print(f"[gpu_check] {name}: rc={rc} in {seconds} s ({len(commands)} command(s))", flush=True)
    return {"rc": rc, "seconds": seconds, "tail": tail, "output": output}


RUNNING: list[subprocess.Popen] = []  # every process group started, so that none outlives this script


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # with its children (train_speed runs one process per configuration)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait(proc: subprocess.Popen, deadline: float) -> int:
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        return 124


def _stop_all(signum, frame) -> None:
    """Stopped from outside (e.g. `timeout`): the parts run in their own sessions, so they must be ended here or
    they would go on measuring beside whatever runs next on the GPU."""
    for proc in RUNNING:
        if proc.poll() is None:
            _kill(proc)
    sys.exit(128 + signum)


def env_info(smoke: bool) -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpu_smoke": smoke}
    for package in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "triton"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    return info


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def speed(work: Path, *args: str) -> list[str]:
    return [sys.executable, "bench/train_speed.py", "--out", str(work / "train.jsonl"), *args]


WARM_MARKS = Path(tempfile.gettempdir()) / "gpu_check_warm"  # configurations whose compile cache is filled


def warm_commands(parts: list[str]) -> list[list[str]]:
    """One short fast-path run per compiled configuration of these parts not warmed yet on this machine, to start
    together: they fill inductor's on-disk caches (FX graphs, autograd graphs, Triton kernels) in parallel on all
    CPU cores, so the timed runs after them, one at a time, compile from the cache instead of for minutes each.
    Nothing they measure is kept; each leaves a mark so a later call on the same machine skips it."""
    configs = {"sd15": [("sd15", b) for b in (1, 4, 16)], "sd15-before": [("sd15", 1)],
               "sdxl": [("sdxl", b) for b in (1, 4)]}
    wanted = sorted({c for p in parts for c in configs.get(p, []) if not (WARM_MARKS / f"{c[0]}-{c[1]}").exists()})
    return [["bash", "-c", f'"$0" bench/train_speed.py --one --arch {arch} --batch {batch} --paths fast --warmup 1 '
             f'--steps 1 && mkdir -p {WARM_MARKS} && touch {WARM_MARKS}/{arch}-{batch}', sys.executable]
            for arch, batch in wanted]


def plan(smoke: bool, parts: list[str], work: Path, warm: list[str]) -> list[tuple[str, list[list[str]], float, dict]]:
    """(part, commands, time limit, extra environment) for each part asked for. The part "pytest" runs its
    commands at the same time (the tests and the compile warm-up of `warm`'s configurations: none of them is
    timed); the other parts one after another."""
    has_baseline = (ROOT / ".baseline").is_dir()
    pytest = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    swap = [sys.executable, "bench/preview_swap.py", "--out", str(work / "swap.jsonl")]
    if smoke:  # tiny models on the CPU; aot_eager: the compiled path without inductor's CPU code generation
        env = {"STYLE_LORA_COMPILE_BACKEND": "aot_eager"}
        tiny = ["--tiny", "--warmup", "1", "--steps", "2", "--timeout", "240"]
        steps = {
            "pytest": [pytest],
            "sd15": [speed(work, *tiny, "--arch", "sd15", "--batch", "1", "--paths", "eager", "fast")],
            "sd15-before": [speed(work, *tiny, "--arch", "sd15", "--batch", "1", "--paths", "fast", "--code", ".baseline")],
            "sdxl": [speed(work, *tiny, "--arch", "sdxl", "--batch", "1", "--paths", "eager")],
            "swap": [swap + ["--tiny", "--modes", "multi,hotswap", "--repeats", "2"]],
        }
        for arch in ARCH_PARTS:
            steps[arch] = [speed(work, *tiny, "--arch", arch, "--batch", "1", "--paths", "eager"),
                           speed(work, *tiny, "--arch", arch, "--batch", "1", "--paths", "eager", "--t5", "on",
                                 "--gradient-checkpointing")]
        return [(p, steps[p], 300, env) for p in parts if p in steps and (p != "sd15-before" or has_baseline)]
    sd15 = ["--arch", "sd15", "--warmup", "5", "--steps", "25", "--timeout", "200"]
    sdxl = ["--arch", "sdxl", "--warmup", "3", "--steps", "10", "--timeout", "240"]
    warm_up, run_tests = warm_commands(warm), "pytest" in parts
    if warm_up and not run_tests:
        parts = ["pytest", *parts]  # the warm-up alone
    full = {
        "pytest": (([pytest + ["tests/test_speed.py", "tests/test_optimizers.py"]] if run_tests else [["true"]])
                   + warm_up, 300),
        "sd15": ([speed(work, *sd15, "--batch", "1", "16", "--paths", "eager"),
                  speed(work, *sd15, "--batch", "1", "4", "16", "--paths", "fast")], 600),
        "sd15-before": ([speed(work, *sd15, "--batch", "1", "--paths", "fast", "--code", ".baseline")], 240),
        "sdxl": ([speed(work, *sdxl, "--batch", "1", "--paths", "eager"),
                  speed(work, *sdxl, "--batch", "1", "4", "--paths", "fast")], 600),
        "qlora": ([speed(work, "--variant", "qlora", "--arch", "sd15", "sdxl", "--batch", "1", "--paths", "eager",
                         "--warmup", "3", "--steps", "10", "--timeout", "240")], 400),
        "swap": ([swap + ["--modes", "multi,hotswap,compile", "--repeats", "6", "--steps", "10"]], 400),
    }
    for arch in ARCH_PARTS:  # batch 1: without T5, + gradient checkpointing, + T5-XXL (cached, then offloaded), fast
        # most wanted first: the part stops at its limit (under the lent machine's 10 minutes per command)
        sd35 = ["--arch", arch, "--batch", "1", "--warmup", "3", "--steps", "8", "--timeout", "200"]
        full[arch] = ([speed(work, *sd35, "--paths", "eager"),
                       speed(work, *sd35, "--paths", "eager", "--gradient-checkpointing"),
                       speed(work, *sd35, "--paths", "eager", "--t5", "on"),
                       speed(work, *sd35, "--paths", "fast")], 540)
    return [(p, *full[p], {}) for p in parts if p in full and (p != "sd15-before" or has_baseline)]


def markdown(result: dict) -> str:
    out = [f"GPU check, {result['date']}: {result['env'].get('gpu') or 'CPU smoke run'}, torch {result['env']['torch']}"
           f" (CUDA {result['env'].get('cuda')}), diffusers {result['env'].get('diffusers')}, peft "
           f"{result['env'].get('peft')}, transformers {result['env'].get('transformers')}", ""]
    out += ["| part | rc | seconds |", "| --- | --- | --- |"]
    out += [f"| {name} | {p['rc']} | {p['seconds']} |" for name, p in result["parts"].items()]
    if "pytest" in result["parts"]:
        out += ["", "pytest -m gpu: " + (result["parts"]["pytest"]["tail"] or ["no output"])[-1]]
    rows = [r for r in result["train"] if "failed" not in r]
    if rows:
        from bench.train_speed import TABLE_HEAD, table_row

        out += ["", "Training speed (bench/train_speed.py; code: this checkout unless marked 'before')", "", TABLE_HEAD]
        out += [table_row(r).replace(f"| {r['path']} |", f"| {r['path']}{' (before)' if r.get('code', '').endswith('.baseline') else ''} |")
                for r in rows]
    for r in result["train"]:
        if "failed" in r:
            out.append(f"\nfailed: {r['arch']} batch {r['batch']} {r['path']} {r['variant']}: {r['failed'][:600]}")
    if result["swap"]:
        out += ["", "Preview adapter swap (bench/preview_swap.py)", "",
                "| mode | device | swap A↔B median / max ms | to base ms | image median ms | first image s | graphs added by swaps |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['mode']} | {r['device']} | {r['swap_ms_median']} / {r['swap_ms_max']} | {r['to_base_ms']} | "
                f"{r['gen_ms_median']} | {r['first_gen_s']} | {r.get('graphs_added_by_swaps', '-')} |" for r in result["swap"]]
    if result["targets"]:
        out += ["", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
        out += [f"| {t['target']} | {t['measured']} | {t['comparison']} {t['goal']} | {t['met']} |" for t in result["targets"]]
    return "\n".join(out) + "\n"


def check_targets(rows: list[dict], swap: list[dict]) -> list[dict]:
    checks = []
    for label, where, field, comparison, goal in TARGETS:
        row = next((r for r in rows if "failed" not in r and r.get("code", "this checkout") == "this checkout"
                    and all(r.get(k) == v for k, v in where.items())), None)
        value = row.get(field) if row else None
        met = None if value is None else (value >= goal if comparison == ">=" else value <= goal)
        checks.append({"target": label, "measured": value, "comparison": comparison, "goal": goal, "met": met})
    compiled = next((r for r in swap if r["mode"] == "compile"), None)
    if compiled:
        checks.append({"target": "preview swap, compiled hot-swap (ms), no recompile", "comparison": "<=", "goal": 500,
                       "measured": f"{compiled['swap_ms_max']} max, {compiled.get('graphs_added_by_swaps')} graphs added",
                       "met": compiled["swap_ms_max"] <= 500 and compiled.get("graphs_added_by_swaps") == 0})
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: checks the script works")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma list of {','.join(PARTS + ARCH_PARTS)} (default: {','.join(PARTS)})")
    parser.add_argument("--arch", nargs="+", choices=ARCH_PARTS, default=None,
                        help="only these architectures' parts (and env): --arch sd35m = --parts env,sd35m")
    parser.add_argument("--warm", default=None, help="parts whose compiled configurations to warm up first "
                        "(default: the timed parts asked for); e.g. sd15,sdxl to fill the cache for a later call")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check-")))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_all)
    signal.signal(signal.SIGINT, _stop_all)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.arch:
        parts = ["env", *args.arch]
    unknown = sorted(set(parts) - set(PARTS + ARCH_PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS + ARCH_PARTS)}")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --cpu-smoke for the tiny CPU run", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu_check.log"
    result = {"date": time.strftime("%Y-%m-%d"), "env": env_info(args.cpu_smoke), "parts": {}, "train": [],
              "swap": [], "targets": []}
    print("[gpu_check] " + json.dumps(result["env"]), flush=True)
    work = args.out  # rows are appended there as each configuration ends: a run stopped from outside keeps them
    warm = parts if args.warm is None else [p.strip() for p in args.warm.split(",")]
    for name, cmd, timeout, env in plan(args.cpu_smoke, [p for p in parts if p != "env"], work, warm):
        part = run_part(name, cmd, timeout, log, env)
        if name == "pytest":
            summary = [line for line in part["output"].splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
            part["tail"] = summary[-1:] or part["tail"]
        part.pop("output")
        result["parts"][name] = part
        result["train"], result["swap"] = read_rows(work / "train.jsonl"), read_rows(work / "swap.jsonl")
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))  # partial results survive a kill
    result["targets"] = [] if args.cpu_smoke else check_targets(result["train"], result["swap"])
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if all(p["rc"] == 0 for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
