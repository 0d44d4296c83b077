#!/usr/bin/env bash
# Creates a TPU VM pod slice. Usage: TPU_NAME=... ZONE=... ACCELERATOR_TYPE=v4-32 tpu_scripts/create_tpu.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
