"""SHA-256 of the tensors of every adapter file from fixed-seed runs on the tiny bases: a refactor that must not
change behaviour prints the same table before and after.

    python scripts/adapter_hashes.py [--out outputs/adapter-hashes] > hashes.txt

Runs `python -m trainer train presets/tiny-test.toml` (8 steps, seed fixed by the preset) on builtin:tiny-sd15, a
tiny SD2 v-prediction base and a tiny SDXL base, with plain LoRA and a few variants whose files take other code
paths (DoRA, LoCon, LoHa, LoKr). For each .safetensors a run writes, one line: run, file, tensor hash and a hash of
the metadata without the keys that hold the date or the run folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (base kind, extra --set values)
    "sd1-lora": ("sd1", []),
    "sd1-dora": ("sd1", ["lora.variant=\"dora\""]),
    "sd1-lokr": ("sd1", ["lora.variant=\"lokr\""]),
    "sd2-lora": ("sd2", []),
    "sdxl-lora": ("sdxl", []),
    "sdxl-locon": ("sdxl", ["lora.conv_rank=2"]),
    "sdxl-loha": ("sdxl", ["lora.variant=\"loha\""]),
}
# Header entries that differ between two runs of the same code: times, and the hashes kohya computes over the header.
VOLATILE = ("date", "started_at", "finished_at", "sshs_")


def tensor_hash(path: Path, out: Path) -> tuple[str, str]:
    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
        meta = {k: v for k, v in (f.metadata() or {}).items() if not any(w in k for w in VOLATILE)}
    meta_text = json.dumps(meta, sort_keys=True).replace(str(out), "OUT")  # run folders differ between runs
    return digest.hexdigest()[:16], hashlib.sha256(meta_text.encode()).hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "outputs" / "adapter-hashes"))
    args = parser.parse_args()
    out = Path(args.out)
    bases = {"sd1": "builtin:tiny-sd15"}
    for kind in ("sd2", "sdxl"):
        folder = out / f"tiny-{kind}"
        if not folder.is_dir():
            subprocess.run([sys.executable, "-m", "trainer", "build-tiny", str(folder), "--kind", kind], check=True,
                           cwd=ROOT, stdout=subprocess.DEVNULL)
        bases[kind] = str(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, (kind, extra) in RUNS.items():
        run_dir = out / name
        if not (run_dir / "events.jsonl").is_file() or '"done"' not in (run_dir / "events.jsonl").read_text():
            sets = [f"model.path=\"{bases[kind]}\"", "train.steps=8", "train.checkpoint_every=4", "train.save_every=4",
                    "sample.every=0", *extra]
            cmd = [sys.executable, "-m", "trainer", "train", "presets/tiny-test.toml", "--run-dir", str(run_dir)]
            for s in sets:
                cmd += ["--set", s]
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        for path in sorted(run_dir.glob("*.safetensors")):
            tensors, meta = tensor_hash(path, out)
            print(f"{name:12s} {path.name:42s} tensors {tensors} meta {meta}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
