#!/usr/bin/env bash
# Multi-host GPU training: run this same script on every host (by hand, pdsh, or one SLURM task per
# host). Each process drives all GPUs of its host; JAX's multi-controller runtime joins them.
#
#   COORDINATOR=host0:1234 NUM_HOSTS=4 HOST_ID=<0..3> tpu_scripts/gpu_multihost.sh MODEL_DIR [flags...]
#
# Under SLURM (srun --ntasks-per-node=1 tpu_scripts/gpu_multihost.sh MODEL_DIR), leave the three
# variables unset: jax.distributed.initialize() reads SLURM's environment itself.
# Install first on every host: pip install 'jax[cuda12]~=0.10.2' && pip install -e .
set -euo pipefail
model_dir=${1:?usage: gpu_multihost.sh MODEL_DIR [hashmoe train flags...]}
shift
cd "$(dirname "$0")/.."
args=(train --distributed=on --gin_file=configs/runs/gpu_multihost.gin
      "--gin.MODEL_DIR='$model_dir'")
if [[ -n "${COORDINATOR:-}" ]]; then
  args+=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_HOSTS:?}"
         --process_id="${HOST_ID:?}")
fi
exec hashmoe "${args[@]}" "$@"
