#!/usr/bin/env bash
# Copies this checkout to every host of the slice and installs it with jax[tpu].
# Usage: tpu_scripts/setup_tpu.sh   (after create_tpu.sh)
set -euo pipefail
source "$(dirname "$0")/common.sh"
top=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tar.gz)
git -C "$top" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:hashmoe.tar.gz" --zone="$ZONE" \
  --project="$PROJECT" --worker=all
tpu_ssh "rm -rf $REPO_DIR && mkdir -p $REPO_DIR && tar -xzf hashmoe.tar.gz -C $REPO_DIR && \
  pip install -U pip && pip install '$JAX_TPU_SPEC' && pip install -e $REPO_DIR"
rm -f "$archive"
