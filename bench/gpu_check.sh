#!/usr/bin/env bash
# The GPU check of issue #21, as one prepared script (under 8 minutes on an H100/H200):
#   pytest -m gpu; training speed SD1.5 (batch 1/4/16) and SDXL (batch 1/4), eager vs fast path; QLoRA 4-bit vs
#   bf16 memory and speed; the preview's adapter swap with and without compile + hot-swap.
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md (OUT defaults to a new temporary folder).
#
#   bash bench/gpu_check.sh                       # on a GPU machine, every part
#   bash bench/gpu_check.sh --parts sd15,swap     # some parts (see bench/gpu_check.py --help)
#   bash bench/gpu_check.sh --cpu-smoke           # tiny models on the CPU in ~2 minutes: the test suite runs this
#   bash bench/gpu_check.sh --arch sd35m          # SD3.5 Medium only (random, 1024 px, batch 1): eager, + gradient
#                                                 # checkpointing, + T5-XXL, fast path; sd35l for Large (< 9 min each)
#
# The lent GPU machine has torch, transformers, peft and accelerate but cannot download: whatever else is needed
# (diffusers, pydantic, bitsandbytes, ...) travels as wheels in .whl/ (see docs/benchmarks.md) and is installed
# here into /tmp/site, first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ " $* " != *" --cpu-smoke "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" bench/gpu_check.py "$@"
