# Shared settings for the TPU scripts. Override any of them in the environment.
# shellcheck shell=bash
: "${TPU_NAME:=hashmoe-pod}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR_TYPE:=v4-32}"          # a pod slice: 4 hosts of 4 chips for v4-32
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_DIR:=hashmoe}"                 # where the code lives on every TPU host
# jax[tpu] must match the jax pin in setup.cfg (libtpu comes with it from PyPI).
: "${JAX_TPU_SPEC:=jax[tpu]~=0.10.2}"

tpu_ssh() {  # tpu_ssh "command" — runs on every host of the slice at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}
