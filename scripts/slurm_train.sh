#!/usr/bin/env bash
# Multi-node training on SLURM that resumes itself after pre-emption or the time limit.
#
#   sbatch --nodes 2 scripts/slurm_train.sh experiment=paper model=llamagen_xl head=masc
#
# Every node runs one `accelerate launch` with 8 processes. The run directory is derived from the overrides (no
# timestamps), so the requeued job finds its own checkpoints and continues at the exact step (train.resume=true).
# SLURM sends SIGTERM shortly before the limit (--signal); the trainer saves a checkpoint and exits, and the job
# requeues itself.
#SBATCH --job-name=masc-llamagen
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${SLURM_NNODES:-1}
PY=${PYTHON:-python}
OVERRIDES=("$@")

# Forward SLURM's warning signal to the trainers, wait for their checkpoint, then requeue.
requeue() {
  echo "SIGTERM received: asking trainers to checkpoint, then requeueing job $SLURM_JOB_ID"
  kill -TERM "$child" 2>/dev/null || true
  wait "$child" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue TERM

srun --kill-on-bad-exit=1 bash -c "
  $PY -m accelerate.commands.launch \
    --multi_gpu --num_machines $NNODES --num_processes $((NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    --rdzv_backend static --same_network \
    train.py ${OVERRIDES[*]} train.resume=true
" &
child=$!
wait "$child"
