#!/usr/bin/env bash
# Starts one training run on every host of the slice (JAX's multi-controller runtime: every host
# runs the same command; jax.distributed.initialize() finds the slice by itself on TPU VMs).
# Usage: tpu_scripts/launch_tpu.sh gs://BUCKET/model_dir [extra hashmoe train flags...]
#   e.g. tpu_scripts/launch_tpu.sh gs://my-bucket/hash64 --gin_file=configs/models/paper/hash_64.gin
set -euo pipefail
source "$(dirname "$0")/common.sh"
model_dir=${1:?usage: launch_tpu.sh MODEL_DIR [hashmoe train flags...]}
shift
extra=$(printf ' %q' "$@")
# Logs go to each host's ~/hashmoe_train.log; the run resumes from MODEL_DIR if relaunched.
tpu_ssh "cd $REPO_DIR && nohup hashmoe train --distributed=on \
  --gin_file=configs/runs/tpu_pod.gin --gin.MODEL_DIR=\"'$model_dir'\"$extra \
  > ~/hashmoe_train.log 2>&1 &"
echo "launched on $TPU_NAME; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/hashmoe_train.log'"
