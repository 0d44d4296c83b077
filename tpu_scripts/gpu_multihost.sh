#!/usr/bin/env bash
# gpu_multihost.sh: start one process of a multi-host GPU training run (hashmoe or t5x).
#
# Every process of the run executes this same script; JAX's multi-controller runtime
# (jax.distributed.initialize) joins them, and each process reads its own shard of the data.
# Run it from a checkout that every host sees at the same path (or one per host, same commit).
#
# Usage: tpu_scripts/gpu_multihost.sh --model-dir=DIR [OPTIONS] [-- TRAINER FLAGS...]
#
# Two ways to join the processes:
#   SLURM   one srun task per host (or per GPU); JAX reads SLURM's variables by itself. Submit
#           tpu_scripts/gpu_multihost.sbatch, or: srun --ntasks-per-node=1 tpu_scripts/gpu_multihost.sh ...
#           With one task per host, each task is given all of its host's GPUs
#           (JAX_LOCAL_DEVICE_IDS); with one task per GPU, JAX picks the task's own GPU.
#   Plain   on each of N hosts: --coordinator=HOST0:PORT --num-processes=N --process-id=I, I being
#           0 on HOST0 (whose PORT must be reachable from the others) and 1..N-1 elsewhere. Each
#           process drives every GPU of its host.
#
# Options (a flag wins over the environment variables in brackets, which are read in order):
#   --model-dir=DIR        [MODEL_DIR] checkpoints and logs, on a filesystem every host shares
#                          (NFS, Lustre, gs://); required
#   --trainer=NAME         [TRAINER] hashmoe (default) or t5x
#   --gin-file=FILE        hashmoe's run config (configs/runs/gpu_multihost.gin)
#   --t5x-gin-file=FILE    [T5X_GIN_FILE] the t5x gin file (required with --trainer=t5x)
#   --coordinator=H:P      [COORDINATOR, JAX_COORDINATOR_ADDRESS] process 0's host and port
#   --num-processes=N      [NUM_PROCESSES, JAX_NUM_PROCESSES] processes in the run
#   --process-id=I         [PROCESS_ID, JAX_PROCESS_ID] this process, 0 <= I < N
#   --dry-run              print the commands (cd, then the trainer), one per line, and run nothing
#   -h, --help             this text
#   -- FLAGS               trainer flags, verbatim: --gin_file=..., --gin.KEY=VALUE, ...
# The trainer is `hashmoe train --distributed=on ...` or `$PYTHON -m t5x.train --multiprocess_gpu
# ...` (PYTHON: python3), started with exec so that SIGTERM (scancel --signal=TERM, SLURM's
# --signal, kill) reaches it: hashmoe finishes its step, writes a checkpoint and exits 143, and
# the same command resumes. Under SLURM, JAX_COORDINATOR_PORT picks the coordinator's port.
#
# Example, 4 hosts of 8 GPUs without SLURM (the same line on each host, I = 0..3):
#   COORDINATOR=host0:8476 NUM_PROCESSES=4 PROCESS_ID=I tpu_scripts/gpu_multihost.sh \
#     --model-dir=/shared/runs/hash64 -- --gin_file=configs/models/paper/hash_64.gin \
#     --gin_file=configs/tasks/reddit.gin --gin.REDDIT_COMMENTS="['/shared/data/RC_2019-01.zst']"
# Exit codes: the trainer's; 2 for a usage error (nothing was run).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

usage_error() {
  hm_die "$1 (tpu_scripts/gpu_multihost.sh --help)"
}

MODEL_DIR=${MODEL_DIR:-}
TRAINER=${TRAINER:-hashmoe}
RUN_GIN=configs/runs/gpu_multihost.gin
T5X_GIN_FILE=${T5X_GIN_FILE:-}
COORDINATOR=${COORDINATOR:-${JAX_COORDINATOR_ADDRESS:-}}
NUM_PROCESSES=${NUM_PROCESSES:-${JAX_NUM_PROCESSES:-}}
PROCESS_ID=${PROCESS_ID:-${JAX_PROCESS_ID:-}}
PYTHON=${PYTHON:-python3}
PASSTHROUGH=()

parse_args() {
  local arg name value
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --)
        local rest
        for rest in "$@"; do
          # A misplaced --dry-run still means: run nothing.
          if [[ $rest == --dry-run ]]; then HM_DRY_RUN=1; else PASSTHROUGH+=("$rest"); fi
        done
        return 0 ;;
      -h | --help) hm_usage "${BASH_SOURCE[0]}"; exit 0 ;;
      --dry-run) HM_DRY_RUN=1; continue ;;
      --*=*) name=${arg%%=*} value=${arg#*=} ;;
      --*)
        name=$arg
        (($#)) || usage_error "$name needs a value"
        value=$1
        shift ;;
      *) usage_error "unexpected argument $(hm_quote "$arg"); trainer flags go after --" ;;
    esac
    [[ -n $value ]] || usage_error "$name needs a non-empty value"
    case $name in
      --model-dir) MODEL_DIR=$value ;;
      --trainer) TRAINER=$value ;;
      --gin-file) RUN_GIN=$value ;;
      --t5x-gin-file) T5X_GIN_FILE=$value ;;
      --coordinator) COORDINATOR=$value ;;
      --num-processes) NUM_PROCESSES=$value ;;
      --process-id) PROCESS_ID=$value ;;
      *) usage_error "unknown option $name" ;;
    esac
  done
}

# in_slurm: this process is a task of a SLURM job step (srun), which JAX detects by itself.
in_slurm() {
  [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_PROCID:-} && -n ${SLURM_NTASKS:-} && -n ${SLURM_LOCALID:-} ]]
}

# The GPUs this task should drive, for JAX_LOCAL_DEVICE_IDS; empty: leave it to JAX.
# JAX's SLURM detection gives each task the one GPU numbered SLURM_LOCALID, which is right for one
# task per GPU over unbound GPUs only: with one task per host it would leave all but GPU 0 idle,
# and with one GPU bound to each task (CUDA_VISIBLE_DEVICES=<one>) that GPU is device 0 of the task.
slurm_local_device_ids() {
  local tasks=${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}
  local nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-}}
  local visible=() count
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  fi
  if [[ -n $nodes && $tasks == "$nodes" ]]; then
    count=${#visible[@]}
    if ((count == 0)); then
      count=${SLURM_GPUS_ON_NODE:-0}
    fi
    if ! hm_is_uint "$count" || ((count == 0)); then
      hm_die "one task per host, but neither CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE says how many GPUs it has; ask for GPUs (--gpus-per-node) or set JAX_LOCAL_DEVICE_IDS"
    fi
    seq -s, 0 $((count - 1))
  elif ((${#visible[@]} == 1)); then
    printf '0\n'
  fi
}

main() {
  parse_args "$@"
  [[ -n $MODEL_DIR ]] || usage_error "needs --model-dir (or MODEL_DIR): where checkpoints go, shared by every host"
  # The model dir becomes a gin string literal: quotes or backslashes in it would end it early.
  [[ $MODEL_DIR != *[\'\"\\]* && $MODEL_DIR != *$'\n'* ]] ||
    usage_error "--model-dir=$(hm_quote "$MODEL_DIR") must not hold quotes, backslashes or newlines"

  local explicit=0 dist_args=() env_args=()
  if [[ -n $COORDINATOR || -n $NUM_PROCESSES || -n $PROCESS_ID ]]; then
    explicit=1
    local missing=()
    [[ -n $COORDINATOR ]] || missing+=(--coordinator)
    [[ -n $NUM_PROCESSES ]] || missing+=(--num-processes)
    [[ -n $PROCESS_ID ]] || missing+=(--process-id)
    if ((${#missing[@]})); then
      usage_error "a run without SLURM needs --coordinator, --num-processes and --process-id together; missing ${missing[*]}"
    fi
    [[ $COORDINATOR =~ ^[^:[:space:]]+:[0-9]+$ || $COORDINATOR =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]] ||
      usage_error "--coordinator=$(hm_quote "$COORDINATOR") must be HOST:PORT"
    if ! hm_is_uint "$NUM_PROCESSES" || ((NUM_PROCESSES == 0)); then
      usage_error "--num-processes=$(hm_quote "$NUM_PROCESSES") must be a positive integer"
    fi
    if ! hm_is_uint "$PROCESS_ID" || ((PROCESS_ID >= NUM_PROCESSES)); then
      usage_error "--process-id=$(hm_quote "$PROCESS_ID") must be an integer in [0, $NUM_PROCESSES)"
    fi
  elif in_slurm; then
    if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
      local ids
      ids=$(slurm_local_device_ids)
      if [[ -n $ids ]]; then env_args=(env "JAX_LOCAL_DEVICE_IDS=$ids"); fi
    fi
  else
    usage_error "not a SLURM task (no SLURM_JOB_ID/SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), and no --coordinator/--num-processes/--process-id (or COORDINATOR/NUM_PROCESSES/PROCESS_ID)"
  fi

  local trainer
  case $TRAINER in
    hashmoe)
      [[ -f $ROOT/$RUN_GIN || $RUN_GIN == /* && -f $RUN_GIN ]] ||
        usage_error "--gin-file=$RUN_GIN does not exist in $ROOT"
      if ((explicit)); then
        dist_args=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES"
          --process_id="$PROCESS_ID")
      fi
      trainer=(hashmoe train --distributed=on "${dist_args[@]}" --gin_file="$RUN_GIN"
        "--gin.MODEL_DIR='$MODEL_DIR'")
      ;;
    t5x)
      [[ -n $T5X_GIN_FILE ]] ||
        usage_error "--trainer=t5x needs --t5x-gin-file (or T5X_GIN_FILE), e.g. a file of configs/t5x/"
      [[ -f $ROOT/$T5X_GIN_FILE || $T5X_GIN_FILE == /* && -f $T5X_GIN_FILE ]] ||
        usage_error "--t5x-gin-file=$T5X_GIN_FILE does not exist in $ROOT"
      # t5x calls jax.distributed.initialize only under --multiprocess_gpu; without the three
      # flags it passes None for each, and JAX then reads SLURM's variables.
      if ((explicit)); then
        dist_args=(--coordinator_address="$COORDINATOR" --process_count="$NUM_PROCESSES"
          --process_index="$PROCESS_ID")
      fi
      trainer=("$PYTHON" -m t5x.train --multiprocess_gpu "${dist_args[@]}" --gin_file="$T5X_GIN_FILE"
        "--gin.MODEL_DIR='$MODEL_DIR'")
      ;;
    *) usage_error "--trainer=$(hm_quote "$TRAINER") must be hashmoe or t5x" ;;
  esac
  if ((!HM_DRY_RUN)) && ! command -v "${trainer[0]}" >/dev/null 2>&1; then
    hm_die "${trainer[0]} is not on PATH on $(hostname); activate the environment hashmoe was installed in (pip install -e .)" 1
  fi
  # Relative gin paths (configs/...) are relative to the checkout.
  hm_run cd "$ROOT"
  hm_exec "${env_args[@]}" "${trainer[@]}" "${PASSTHROUGH[@]}"
}

main "$@"
