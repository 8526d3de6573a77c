#!/usr/bin/env bash
# What `make test-gpu` runs: the tiny end-to-end tests marked gpu_e2e (tests/conftest.py) on CUDA, once in bf16
# and once in fp16, with one process per GPU unless NUM_PROCESSES says otherwise. For the record, each
# precision's junit XML and log, a summary and the machine's GPU and package versions go to runs/test-gpu/.
#
#   bash scripts/test_gpu.sh [pytest arguments]    (PYTHON, NUM_PROCESSES, PRECISIONS, TEST_GPU_DIR, WORKERS may be set)
#   make test-gpu PYTHON=python3 ARGS="-k llava"   # the same through make, in an environment of your own
#   WORKERS=7 make test-gpu                        # 7 tests at a time (pytest-xdist): ~4 minutes a precision on one
#                                                  # H200 instead of ~12 (the tests' own times added up); each tiny
#                                                  # launch uses little of the GPU
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
PRECISIONS=${PRECISIONS:-bf16 fp16}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "${gpus:-0}" -eq 0 ]; then
    echo "make test-gpu: no CUDA GPU is visible (nvidia-smi -L lists none); on a CPU, make test runs the suite" >&2
    exit 2
fi
NUM_PROCESSES=${NUM_PROCESSES:-$gpus}
"$PYTHON" - <<'EOF' || exit 2
import importlib.util
import os
import sys

needed = ("torch", "transformers", "accelerate", "deepspeed", "peft", "tensorboard", "pytest", "psutil")
needed += ("xdist",) if os.environ.get("WORKERS") else ()
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"make test-gpu: {sys.executable} lacks {', '.join(missing)}: pip install -r requirements-dev.txt "
             "(on an offline node, the wheels of `make wheelhouse`)")
import torch

if not torch.cuda.is_available():
    sys.exit(f"make test-gpu: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU")
EOF

# WORKERS: tests side by side, each given to whichever worker is free (a module's shared run is then made once per
# worker that needs it, which costs a launch or two and saves minutes)
parallel=()
[ -n "${WORKERS:-}" ] && parallel=(-n "$WORKERS" --dist load)

OUT=${TEST_GPU_DIR:-runs/test-gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# DeepSpeed builds its C++/CUDA ops (cpu_adam, fused_adam) on first use, about a minute each: once, here.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    echo "processes per launch: $NUM_PROCESSES"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
    "$PYTHON" -c 'import platform, torch, transformers, accelerate, deepspeed, peft
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"deepspeed {deepspeed.__version__}, peft {peft.__version__}")' 2>/dev/null | grep '^python '
} >"$OUT/environment.txt"
cat "$OUT/environment.txt"

status=0
: >"$OUT/summary.txt"
for precision in $PRECISIONS; do
    echo "== make test-gpu: the gpu_e2e tests in $precision, $NUM_PROCESSES process(es) per launch"
    start=$(date +%s)
    (
        VLM_TEST_PRECISION=$precision VLM_TEST_NUM_PROCESSES=$NUM_PROCESSES "$PYTHON" -m pytest -m gpu_e2e \
            --junitxml="$OUT/$precision.xml" -o junit_suite_name="gpu_e2e-$precision" \
            --durations=0 --durations-min=5 "${parallel[@]}" "$@"
        echo $? >"$OUT/$precision.rc"
    ) 2>&1 | tee "$OUT/$precision.log"
    rc=$(cat "$OUT/$precision.rc")
    result=$(grep -E '^=+ .*(passed|failed|error|skipped).* in [0-9.]+s' "$OUT/$precision.log" | tail -n 1 | tr -d '=')
    echo "$precision: exit $rc, $(($(date +%s) - start)) s wall:$result" >>"$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
done

echo "== make test-gpu summary (junit XML and logs in $OUT)"
cat "$OUT/summary.txt"
exit $status
