#!/usr/bin/env bash
# What `make multi-gpu` runs on a node with 2 or more GPUs: the checks that only mean something on several GPUs
# over NCCL, then the real-size scaling benchmark. Neither has run on GPUs yet, so their durations are unknown;
# the tests part is about 11 recipe launches (split it with -k where a sitting is short).
#
#   bash scripts/validate_multi_gpu.sh tests [pytest arguments]
#                                                  # the multi-process end-to-end tests, N processes over NCCL:
#                                                  # loss parity 1 vs N processes, a rank with only text-only
#                                                  # batches, the multi-node config as 2 "nodes" on this host,
#                                                  # DDP and FSDP2, preflight shared out, kill-and-resume
#   bash scripts/validate_multi_gpu.sh benchmark [MODEL ...]
#                                                  # zero3_offload on 1 GPU, then on N, same per-GPU micro-batch:
#                                                  # step time, tokens/s per GPU, scaling efficiency, GPU and
#                                                  # host peaks per process (default models: qwen2.5-vl-3b,
#                                                  # llava-1.5-7b)
#
# Environment (all optional): NUM_GPUS (default: all that nvidia-smi lists), PYTHON (default python),
# PRECISION (tests; default bf16), OUT_DIR (default runs/multi-gpu), STEPS (benchmark; default 6),
# BENCHMARK_ARGS (more scripts/benchmark.py arguments, e.g. "--recipe_args '--skip_memory_check true'" on a VM
# whose RAM grows as it is used, where MemAvailable reads low at the start).
# NCCL settings come from the environment as they are (NCCL_NVLS_ENABLE=0 etc. where the machine sets them):
# every launch here passes the environment on unchanged.
set -uo pipefail
cd "$(dirname "$0")/.."

PART=${1:-}
[ "$PART" = tests ] || [ "$PART" = benchmark ] || {
    echo "usage: bash scripts/validate_multi_gpu.sh tests|benchmark [MODEL ...]" >&2
    exit 2
}
shift
PYTHON=${PYTHON:-python}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
NUM_GPUS=${NUM_GPUS:-$gpus}
if [ "${gpus:-0}" -lt 2 ] || [ "$NUM_GPUS" -lt 2 ] || [ "$NUM_GPUS" -gt "$gpus" ]; then
    echo "make multi-gpu: needs 2 or more GPUs; nvidia-smi lists ${gpus:-0}, NUM_GPUS=$NUM_GPUS" >&2
    exit 2
fi
OUT_DIR=${OUT_DIR:-runs/multi-gpu}
mkdir -p "$OUT_DIR"
# DeepSpeed builds its CPU Adam and FusedAdam on first use, about a minute each: once for every launch here.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(cd "$OUT_DIR" && pwd)/torch_extensions}
env | grep -E '^(NCCL_|TORCH_SYMM_MEM|NVSHMEM_)' | sort | sed 's/^/environment: /'

if [ "$PART" = tests ]; then
    # The tests that skip with one process, and the 1-vs-N loss parity; the rest of the suite is `make test-gpu`.
    # A -k among the arguments replaces this selection (pytest keeps the last -k).
    selection="one_and_several_processes or text_batches or multi_node or preflight or two_processes or sigkill"
    selection="$selection or (other_accelerate_configs and not single_gpu)"
    PRECISIONS=${PRECISION:-bf16} NUM_PROCESSES=$NUM_GPUS TEST_GPU_DIR="$OUT_DIR/tests" PYTHON="$PYTHON" \
        bash scripts/test_gpu.sh -k "$selection" "$@"
    exit $?
fi

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(qwen2.5-vl-3b llava-1.5-7b)
status=0
for model in "${models[@]}"; do
    seq_len=512
    [ "$model" = llava-1.5-7b ] && seq_len=1024  # its 576 image tokens leave room for text
    for processes in 1 "$NUM_GPUS"; do
        # eval, so that BENCHMARK_ARGS may hold quoted arguments (--recipe_args '--skip_memory_check true')
        eval "\"$PYTHON\" scripts/benchmark.py run --model $model --configs zero3_offload --seq_len $seq_len \
            --steps ${STEPS:-6} --num_processes $processes --results \"$OUT_DIR/results.jsonl\" \
            --work_dir \"$OUT_DIR/work\" ${BENCHMARK_ARGS:-}" || status=1
    done
done
"$PYTHON" scripts/benchmark.py report "$OUT_DIR/results.jsonl"
exit $status
