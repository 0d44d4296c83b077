#!/usr/bin/env bash
# Stops any run (SIGTERM: hashmoe writes a checkpoint before exiting) and deletes the slice.
set -euo pipefail
source "$(dirname "$0")/common.sh"
tpu_ssh "pkill -TERM -f 'hashmoe train' || true; sleep 60" || true
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
