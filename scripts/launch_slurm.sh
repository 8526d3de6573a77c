#!/usr/bin/env bash
# Launch a recipe across the nodes of a Slurm allocation: srun starts one `accelerate launch` per node, and
# each starts one training process per GPU. ZeRO-3 with CPU offload by default.
#
#   sbatch --nodes 2 --gpus-per-node 8 scripts/launch_slurm.sh recipes/llava.py --config recipes/configs/llava.yaml
#
# Environment (all optional): ACCELERATE_CONFIG (default accelerate_configs/multi_node_zero3_offload.yaml),
# GPUS_PER_NODE (default: counted with nvidia-smi), MAIN_PORT (default 29500), PYTHON (default python).
#SBATCH --job-name=vlm-finetune
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: sbatch scripts/launch_slurm.sh recipes/RECIPE.py [recipe arguments...]" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"   # the repository root: configs are named relative to it

NODES=${SLURM_NNODES:?run inside a Slurm allocation (sbatch or salloc)}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | grep -c '^GPU')}
# Node 0 hosts the rendezvous. (awk reads all lines: head would close the pipe, and pipefail stops the job.)
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
export MAIN_ADDR NODES GPUS_PER_NODE
export MAIN_PORT=${MAIN_PORT:-29500}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node_zero3_offload.yaml}
export PYTHON=${PYTHON:-python}
echo "launching $1 on $NODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous at $MAIN_ADDR:$MAIN_PORT"

# SLURM_NODEID differs per node, so it is read inside the per-node shell (single quotes), not here.
srun --kill-on-bad-exit=1 bash -c '
    exec "$PYTHON" -m accelerate.commands.accelerate_cli launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NODES" --num_processes "$((NODES * GPUS_PER_NODE))" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" "$@"' launch "$@"
