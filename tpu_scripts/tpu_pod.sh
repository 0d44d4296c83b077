#!/usr/bin/env bash
# tpu_pod.sh: train hashmoe (or t5x) on a Cloud TPU VM slice, from this checkout.
#
# Usage: tpu_scripts/tpu_pod.sh COMMAND [OPTIONS] [-- ARGS...]
#
# Commands, in the order of a run:
#   create   create the slice: `tpu-vm create`, or a queued resource (--queued, waits for ACTIVE)
#   setup    copy this checkout (git archive REF) to every worker; install Python 3.11, jax[tpu]
#            at setup.cfg's pin and hashmoe (and t5x with --t5x) in a virtualenv; check the slice
#   data     copy training data from Cloud Storage to a local folder on every worker (hashmoe's
#            readers take local files; the model dir can be gs://)
#   prepare  `hashmoe prepare` on every worker, in the foreground: the workers split the shards
#            among them (--distributed=on) and write the packed rows once to PREPARED_DIR (default
#            gs://BUCKET/prepared); run it again after an interruption: finished shards are kept
#   launch   start the same training command on every worker, detached, one log per worker; it
#            reads the prepared rows from PREPARED_DIR where they exist (else streams the task)
#   status   the slice's state, and each worker's run (running, or its exit code)
#   logs     stream worker 0's training log (--worker=all: every worker's, prefixed by host)
#   stop     SIGTERM the run on every worker and wait: hashmoe finishes its step, writes a
#            checkpoint and exits 143; `launch` with the same model dir resumes from it
#   delete   stop the run (best effort), then delete the slice (or its queued resource)
#   exec     run a shell command on the workers, from their home folder
#
# Every command takes (a flag wins over the environment variable in brackets):
#   --project=ID          [PROJECT]    Google Cloud project (required)
#   --zone=ZONE           [ZONE]       e.g. us-central2-b (required)
#   --tpu-name=NAME       [TPU_NAME]   the slice's name (required)
#   --internal-ip                      ssh/scp over internal IPs (from a VM in the same network)
#   --dry-run                          print every command, one per line, shell-quoted exactly as
#                                      it would run, and run nothing (even when placed after --)
#   -h, --help                         this text
# create:
#   --accelerator-type=T  [ACCELERATOR_TYPE]  v4-32, v5litepod-16, v5p-32, v6e-16, ... (required)
#   --runtime-version=V   [RUNTIME_VERSION]   default by generation: v2-v4 tpu-ubuntu2204-base,
#                         v5litepod/v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --queued              [TPU_QUEUED=1]  go through a queued resource named like the slice (the
#                         way to get large or spot slices); status and delete need it too
#   --no-wait             return once the queued resource is requested, not when it is ACTIVE
#   --spot | --preemptible | --reserved   capacity kind (--preemptible: tpu-vm create only)
#   -- GCLOUD_FLAGS       more flags for the create command (--network=..., --service-account=...)
# setup:
#   --ref=REF             the git revision copied (HEAD); uncommitted changes are not copied
#   --python=PY           [TPU_PYTHON] interpreter on the workers (python3.11; apt-get installs it)
#   --jax-spec=SPEC       [JAX_TPU_SPEC] default jax[tpu] at setup.cfg's pin of jax
#   --t5x[=REF]           also install t5x from GitHub at REF (main)
#   --no-verify           skip the final check that every worker sees the whole slice
#   --force               replace the code even while a run is active
# data:
#   --copy=SRC            (repeatable) gs://BUCKET/PATH, or PATH in --bucket; wildcards and folders
#   --bucket=NAME         [BUCKET]
#   --data-dir=DIR        [DATA_DIR] the local folder on every worker (/tmp/hashmoe_data)
# prepare:
#   --prepared-dir=URL    [PREPARED_DIR] where the rows go (default gs://BUCKET/prepared)
#   --bucket=NAME         [BUCKET]
#   --gin-file=FILE       hashmoe's run config (configs/runs/tpu_pod.gin), as for launch
#   -- FLAGS              `hashmoe prepare` flags, verbatim: the run's --gin_file=... and
#                         --gin.KEY=VALUE, --num_shards=N (8; at least the number of workers)
# launch:
#   --trainer=NAME        [TRAINER] hashmoe (default) or t5x
#   --model-dir=DIR       [MODEL_DIR] checkpoints and logs; default gs://BUCKET/runs/RUN_NAME
#   --bucket=NAME         [BUCKET]
#   --run-name=NAME       [RUN_NAME] names the worker logs (default: the model dir's last part)
#   --gin-file=FILE       hashmoe's run config (configs/runs/tpu_pod.gin)
#   --prepared-dir=URL    [PREPARED_DIR] prepared rows to read (default gs://BUCKET/prepared when
#                         --bucket is given; hashmoe trainer only)
#   --t5x-gin-file=FILE   [T5X_GIN_FILE] the t5x gin file (required with --trainer=t5x)
#   --env=KEY=VALUE       (repeatable) environment for the trainer (LIBTPU_INIT_ARGS=..., ...)
#   --force               SIGKILL a run still active, and whatever holds the TPU, first
#   --follow              then stream worker 0's log
#   -- FLAGS              trainer flags, verbatim: --gin_file=..., --gin.KEY=VALUE, ...
# logs:   --worker=N|all (0)  --lines=N (100)  --no-follow  --run-name=NAME (the current run)
# stop:   --grace=SECONDS (600) to wait for the checkpoint; --kill: SIGKILL after that
# delete: --queued  --no-stop (do not try to stop the run first)
# exec:   --worker=N|all (all)  -- COMMAND
# On the workers everything lives in the home folder: the code in $REMOTE_REPO (hashmoe), the
# virtualenv in $REMOTE_VENV (hashmoe_venv), run logs in $REMOTE_LOGS (hashmoe_logs); the worker
# side of each command is tpu_scripts/tpu_worker.sh.
#
# Example, the paper's Hash layer (64 experts) on pushshift.io Reddit, on a v4-32 (4 workers):
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=hashmoe-v4-32 BUCKET=my-bucket
#   tpu_scripts/tpu_pod.sh create --accelerator-type=v4-32
#   tpu_scripts/tpu_pod.sh setup
#   tpu_scripts/tpu_pod.sh data --copy=reddit/RC_2019-01.zst
#   tpu_scripts/tpu_pod.sh prepare -- --gin_file=configs/tasks/reddit.gin \
#     --gin.REDDIT_COMMENTS="['/tmp/hashmoe_data/RC_2019-01.zst']"
#   tpu_scripts/tpu_pod.sh launch --run-name=hash64 -- \
#     --gin_file=configs/models/paper/hash_64.gin --gin_file=configs/tasks/reddit.gin \
#     --gin.REDDIT_COMMENTS="['/tmp/hashmoe_data/RC_2019-01.zst']"
#   tpu_scripts/tpu_pod.sh logs
#   tpu_scripts/tpu_pod.sh stop
#   tpu_scripts/tpu_pod.sh delete
# Exit codes: 0 done, 1 a command failed, 2 a usage error (nothing was run).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

REMOTE_REPO=${REMOTE_REPO:-hashmoe}
REMOTE_VENV=${REMOTE_VENV:-hashmoe_venv}
REMOTE_LOGS=${REMOTE_LOGS:-hashmoe_logs}
REMOTE_ARCHIVE=hashmoe-src.tar.gz
WORKER_SCRIPT=tpu_scripts/tpu_worker.sh
DEFAULT_RUN_GIN=configs/runs/tpu_pod.gin
# Seconds between two looks at a queued resource's state.
POLL_SECONDS=${HM_POLL_SECONDS:-30}

# Options and the commands that take them.
declare -A TAKES=(
  [accelerator-type]=create [runtime-version]=create [no-wait]=create [spot]=create
  [preemptible]=create [reserved]=create [queued]="create status delete"
  [ref]=setup [python]=setup [jax-spec]=setup [t5x]=setup [no-verify]=setup
  [force]="setup launch" [copy]=data [data-dir]=data [bucket]="data prepare launch"
  [prepared-dir]="prepare launch"
  [trainer]=launch [model-dir]=launch [run-name]="launch logs" [gin-file]="prepare launch"
  [t5x-gin-file]=launch [env]=launch [follow]=launch
  [worker]="logs exec" [lines]=logs [no-follow]=logs
  [grace]=stop [kill]=stop [no-stop]=delete
)
COMMANDS="create setup data prepare launch status logs stop delete exec"

# Settings: environment first, flags override below.
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
TPU_QUEUED=${TPU_QUEUED:-0}
TPU_PYTHON=${TPU_PYTHON:-python3.11}
JAX_TPU_SPEC=${JAX_TPU_SPEC:-}
BUCKET=${BUCKET:-}
DATA_DIR=${DATA_DIR:-/tmp/hashmoe_data}
PREPARED_DIR=${PREPARED_DIR:-}
TRAINER=${TRAINER:-hashmoe}
MODEL_DIR=${MODEL_DIR:-}
RUN_NAME=${RUN_NAME:-}
T5X_GIN_FILE=${T5X_GIN_FILE:-}
INTERNAL_IP=0 CAPACITY="" NO_WAIT=0 REF=HEAD T5X_REF="" VERIFY=1 FORCE=0 FOLLOW=0
RUN_GIN=$DEFAULT_RUN_GIN WORKER="" LINES=100 NO_FOLLOW=0 GRACE=600 KILL=0 NO_STOP=0
COPIES=() ENVS=() PASSTHROUGH=()

usage_error() {
  hm_die "$1 (tpu_scripts/tpu_pod.sh --help)"
}

parse_args() {
  COMMAND=${1:-}
  case $COMMAND in
    "" | -h | --help) hm_usage "${BASH_SOURCE[0]}"; exit 0 ;;
  esac
  [[ " $COMMANDS " == *" $COMMAND "* ]] ||
    usage_error "unknown command $(hm_quote "$COMMAND"); one of: $COMMANDS"
  shift
  local arg name value has_value
  while (($#)); do
    arg=$1
    shift
    if [[ $arg == -- ]]; then
      # --dry-run counts wherever it is, so a misplaced one can never let commands run.
      local rest
      for rest in "$@"; do
        if [[ $rest == --dry-run ]]; then HM_DRY_RUN=1; else PASSTHROUGH+=("$rest"); fi
      done
      break
    fi
    case $arg in
      -h | --help) hm_usage "${BASH_SOURCE[0]}"; exit 0 ;;
      --*=*) name=${arg%%=*} value=${arg#*=} has_value=1 ;;
      --*) name=$arg value="" has_value=0 ;;
      *) usage_error "unexpected argument $(hm_quote "$arg"); trainer flags and extra gcloud flags go after --" ;;
    esac
    name=${name#--}
    if [[ -n ${TAKES[$name]:-} && " ${TAKES[$name]} " != *" $COMMAND "* ]]; then
      usage_error "--$name applies to: ${TAKES[$name]} (not $COMMAND)"
    fi
    case $name in
      # Options with a value, given as --name=value or --name value.
      project | zone | tpu-name | accelerator-type | runtime-version | ref | python | jax-spec | \
        copy | bucket | data-dir | prepared-dir | trainer | model-dir | run-name | gin-file | \
        t5x-gin-file | env | worker | lines | grace)
        if ((!has_value)); then
          (($#)) || usage_error "--$name needs a value"
          value=$1
          shift
        fi
        [[ -n $value ]] || usage_error "--$name needs a non-empty value"
        case $name in
          project) PROJECT=$value ;;
          zone) ZONE=$value ;;
          tpu-name) TPU_NAME=$value ;;
          accelerator-type) ACCELERATOR_TYPE=$value ;;
          runtime-version) RUNTIME_VERSION=$value ;;
          ref) REF=$value ;;
          python) TPU_PYTHON=$value ;;
          jax-spec) JAX_TPU_SPEC=$value ;;
          copy) COPIES+=("$value") ;;
          bucket) BUCKET=$value ;;
          data-dir) DATA_DIR=$value ;;
          prepared-dir) PREPARED_DIR=$value ;;
          trainer) TRAINER=$value ;;
          model-dir) MODEL_DIR=$value ;;
          run-name) RUN_NAME=$value ;;
          gin-file) RUN_GIN=$value ;;
          t5x-gin-file) T5X_GIN_FILE=$value ;;
          env) ENVS+=("$value") ;;
          worker) WORKER=$value ;;
          lines) LINES=$value ;;
          grace) GRACE=$value ;;
        esac
        ;;
      t5x) T5X_REF=${value:-main} ;;
      *)
        ((!has_value)) || usage_error "--$name takes no value"
        case $name in
          internal-ip) INTERNAL_IP=1 ;;
          dry-run) HM_DRY_RUN=1 ;;
          queued) TPU_QUEUED=1 ;;
          no-wait) NO_WAIT=1 ;;
          spot | preemptible | reserved)
            [[ -z $CAPACITY || $CAPACITY == "$name" ]] ||
              usage_error "--$CAPACITY and --$name exclude each other"
            CAPACITY=$name ;;
          no-verify) VERIFY=0 ;;
          force) FORCE=1 ;;
          follow) FOLLOW=1 ;;
          no-follow) NO_FOLLOW=1 ;;
          kill) KILL=1 ;;
          no-stop) NO_STOP=1 ;;
          *) usage_error "unknown option --$name" ;;
        esac
        ;;
    esac
  done
  if ((${#PASSTHROUGH[@]})) && [[ " create prepare launch exec " != *" $COMMAND "* ]]; then
    usage_error "$COMMAND takes no arguments after --"
  fi
}

check_common() {
  local missing=()
  [[ -n $PROJECT ]] || missing+=("--project (or PROJECT)")
  [[ -n $ZONE ]] || missing+=("--zone (or ZONE)")
  [[ -n $TPU_NAME ]] || missing+=("--tpu-name (or TPU_NAME)")
  if ((${#missing[@]})); then
    local IFS=,
    usage_error "$COMMAND needs ${missing[*]}"
  fi
  # Cloud TPU names follow Compute Engine's rule for resource names.
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    usage_error "--tpu-name=$(hm_quote "$TPU_NAME") is not a valid name (lowercase letters, digits, '-'; starts with a letter)"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    usage_error "--zone=$(hm_quote "$ZONE") is not a zone such as us-central2-b"
  [[ $TPU_QUEUED == 0 || $TPU_QUEUED == 1 ]] || usage_error "TPU_QUEUED=$(hm_quote "$TPU_QUEUED") must be 0 or 1"
  hm_check_remote_path REMOTE_REPO "$REMOTE_REPO"
  hm_check_remote_path REMOTE_VENV "$REMOTE_VENV"
  hm_check_remote_path REMOTE_LOGS "$REMOTE_LOGS"
  # The flags naming the slice's place, shared by every gcloud command.
  WHERE=(--project="$PROJECT" --zone="$ZONE")
}


# on_workers WORKER COMMAND: run the shell COMMAND on worker WORKER (a number, or all at once).
on_workers() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}")
  cmd+=(--worker="$1")
  if ((INTERNAL_IP)); then cmd+=(--internal-ip); fi
  cmd+=(--command="$2")
  hm_run "${cmd[@]}"
}

# worker_cmd SUBCOMMAND ARGS...: the shell command running tpu_worker.sh on a worker.
worker_cmd() {
  hm_join bash "$REMOTE_REPO/$WORKER_SCRIPT" "$@"
}

check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+$ ]] || usage_error "--worker=$(hm_quote "$1") must be a worker number or all"
}

default_runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) return 1 ;;
  esac
}

cmd_create() {
  [[ -n $ACCELERATOR_TYPE ]] || usage_error "create needs --accelerator-type (or ACCELERATOR_TYPE), e.g. v4-32"
  [[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    usage_error "--accelerator-type=$(hm_quote "$ACCELERATOR_TYPE") is not a type such as v4-32 or v5litepod-16"
  local version=$RUNTIME_VERSION
  if [[ -z $version ]]; then
    version=$(default_runtime_version "$ACCELERATOR_TYPE") ||
      usage_error "no default runtime version for $ACCELERATOR_TYPE; give --runtime-version"
  fi
  local cmd
  if ((TPU_QUEUED)); then
    [[ $CAPACITY != preemptible ]] || usage_error "queued resources take --spot, not --preemptible"
    cmd=(gcloud compute tpus queued-resources create "$TPU_NAME" "${WHERE[@]}")
    cmd+=(--node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version")
  else
    ((!NO_WAIT)) || usage_error "--no-wait applies to --queued only (tpu-vm create returns when the slice is ready)"
    cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}")
    cmd+=(--accelerator-type="$ACCELERATOR_TYPE" --version="$version")
  fi
  if [[ -n $CAPACITY ]]; then cmd+=("--$CAPACITY"); fi
  hm_run "${cmd[@]}" "${PASSTHROUGH[@]}"
  if ((TPU_QUEUED && !NO_WAIT)); then wait_active; fi
}

# Waits until the queued resource is ACTIVE (its slice created); fails on a state it cannot leave.
wait_active() {
  local details=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}")
  local describe=("${details[@]}" --format="value(state.state)")
  if ((HM_DRY_RUN)); then
    hm_run "${describe[@]}"
    return 0
  fi
  local state
  while :; do
    state=$(hm_run "${describe[@]}")
    case $state in
      ACTIVE) printf 'queued resource %s is ACTIVE\n' "$TPU_NAME" >&2; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        hm_die "queued resource $TPU_NAME is $state; details: $(hm_join "${details[@]}")" 1 ;;
    esac
    printf 'queued resource %s is %s; looking again in %ss (Ctrl-C stops waiting, not the request)\n' \
      "$TPU_NAME" "${state:-unknown}" "$POLL_SECONDS" >&2
    sleep "$POLL_SECONDS"
  done
}

jax_tpu_spec() {
  if [[ -n $JAX_TPU_SPEC ]]; then
    printf '%s' "$JAX_TPU_SPEC"
    return 0
  fi
  # The TPU install must match the jax pin hashmoe was tested with.
  local pin
  pin=$(sed -n -E 's/^[[:space:]]*jax[[:space:]]*((~=|==|>=)[^[:space:];,]+).*/\1/p' \
    "$ROOT/setup.cfg" | head -n 1)
  [[ -n $pin ]] || usage_error "found no 'jax~=...' pin in $ROOT/setup.cfg; give --jax-spec"
  printf 'jax[tpu]%s' "$pin"
}

cmd_setup() {
  local spec
  spec=$(jax_tpu_spec)
  local archive=${TMPDIR:-/tmp}/hashmoe-src-$TPU_NAME.tar.gz
  if ((!HM_DRY_RUN)); then
    git -C "$ROOT" rev-parse --verify --quiet "$REF^{commit}" >/dev/null ||
      usage_error "--ref=$(hm_quote "$REF") is not a commit of $ROOT"
    git -C "$ROOT" cat-file -e "$REF:$WORKER_SCRIPT" 2>/dev/null ||
      usage_error "--ref=$(hm_quote "$REF") has no $WORKER_SCRIPT (it predates these scripts)"
    if [[ $REF == HEAD && -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
      hm_warn "uncommitted changes in $ROOT are not copied (git archive $REF)"
    fi
  fi
  hm_run git -C "$ROOT" archive --format=tar.gz --output="$archive" "$REF"
  local scp=(gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:$REMOTE_ARCHIVE" "${WHERE[@]}"
    --worker=all)
  if ((INTERNAL_IP)); then scp+=(--internal-ip); fi
  hm_run "${scp[@]}"
  local new=$REMOTE_REPO.new
  local worker=(bash "$new/$WORKER_SCRIPT" setup --from="$new" --repo="$REMOTE_REPO"
    --venv="$REMOTE_VENV" --logs="$REMOTE_LOGS" --python="$TPU_PYTHON" --jax-spec="$spec")
  if [[ -n $T5X_REF ]]; then worker+=(--t5x="$T5X_REF"); fi
  if ((!VERIFY)); then worker+=(--no-verify); fi
  if ((FORCE)); then worker+=(--force); fi
  # Unpack beside the old code; the worker script swaps them once no run is using it.
  local remote
  remote="$(hm_join rm -rf "$new") && $(hm_join mkdir -p "$new")"
  remote+=" && $(hm_join tar -xzf "$REMOTE_ARCHIVE" -C "$new") && $(hm_join rm -f "$REMOTE_ARCHIVE")"
  remote+=" && $(hm_join "${worker[@]}")"
  on_workers all "$remote"
  hm_run rm -f "$archive"
}

cmd_data() {
  ((${#COPIES[@]})) || usage_error "data needs --copy=gs://BUCKET/PATH (or --copy=PATH with --bucket)"
  local sources=() src
  for src in "${COPIES[@]}"; do
    if [[ $src == gs://* ]]; then
      sources+=("$src")
    else
      [[ -n $BUCKET ]] || usage_error "--copy=$(hm_quote "$src") is not a gs:// URL; give --bucket (or BUCKET) or a full URL"
      sources+=("gs://${BUCKET%/}/${src#/}")
    fi
  done
  [[ $DATA_DIR == /* ]] || usage_error "--data-dir=$(hm_quote "$DATA_DIR") must be absolute: the trainer reads it from its own folder"
  hm_check_remote_path --data-dir "$DATA_DIR"
  # --no-clobber: running `data` again copies only what is missing.
  local copy=(gcloud storage cp --no-clobber --recursive "${sources[@]}" "$DATA_DIR/")
  on_workers all "$(hm_join mkdir -p "$DATA_DIR") && $(hm_join "${copy[@]}")"
  if ((!HM_DRY_RUN)); then
    for src in "${sources[@]}"; do
      printf 'on every worker: %s/%s\n' "$DATA_DIR" "${src##*/}" >&2
    done
  fi
}

# prepared_dir: PREPARED_DIR, else gs://BUCKET/prepared, else empty; checked as a gin string.
prepared_dir() {
  local dir=$PREPARED_DIR
  if [[ -z $dir && -n $BUCKET ]]; then dir=gs://${BUCKET%/}/prepared; fi
  [[ $dir != *[\'\"\\]* && $dir != *$'\n'* ]] ||
    usage_error "--prepared-dir=$(hm_quote "$dir") must not hold quotes, backslashes or newlines"
  printf '%s' "$dir"
}

cmd_prepare() {
  local dir
  dir=$(prepared_dir)
  [[ -n $dir ]] || usage_error "prepare needs --prepared-dir (or PREPARED_DIR), or --bucket (or BUCKET)"
  [[ -f $ROOT/$RUN_GIN ]] || usage_error "--gin-file=$RUN_GIN does not exist in $ROOT"
  # Every worker runs the same command; each prepares its own shards, the last writes the manifest.
  local prepare=(hashmoe prepare --distributed=on --gin_file="$RUN_GIN" "--gin.PREPARED_DIR='$dir'")
  on_workers all "$(worker_cmd run --repo="$REMOTE_REPO" --venv="$REMOTE_VENV" -- \
    "${prepare[@]}" "${PASSTHROUGH[@]}")"
  if ((!HM_DRY_RUN)); then
    printf 'prepared rows in %s; launch reads them with the same task flags\n' "$dir" >&2
  fi
}

cmd_launch() {
  local model_dir=$MODEL_DIR
  if [[ -z $model_dir ]]; then
    [[ -n $BUCKET && -n $RUN_NAME ]] ||
      usage_error "launch needs --model-dir (or MODEL_DIR), or --bucket and --run-name"
    model_dir=gs://${BUCKET%/}/runs/$RUN_NAME
  fi
  # The model dir becomes a gin string literal: quotes or backslashes in it would end it early.
  [[ $model_dir != *[\'\"\\]* && $model_dir != *$'\n'* ]] ||
    usage_error "--model-dir=$(hm_quote "$model_dir") must not hold quotes, backslashes or newlines"
  local run=${RUN_NAME:-}
  if [[ -z $run ]]; then
    run=${model_dir%/}
    run=${run##*/}
    run=${run//[^A-Za-z0-9_.-]/_}
    run=${run#[.-]}
  fi
  [[ $run =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || usage_error "--run-name=$(hm_quote "$run") must be a plain name"
  local trainer
  case $TRAINER in
    hashmoe)
      [[ -f $ROOT/$RUN_GIN ]] || usage_error "--gin-file=$RUN_GIN does not exist in $ROOT"
      trainer=(hashmoe train --distributed=on --gin_file="$RUN_GIN" "--gin.MODEL_DIR='$model_dir'")
      local prepared
      prepared=$(prepared_dir)
      if [[ -n $prepared ]]; then trainer+=("--gin.PREPARED_DIR='$prepared'"); fi
      ;;
    t5x)
      [[ -n $T5X_GIN_FILE ]] ||
        usage_error "--trainer=t5x needs --t5x-gin-file (or T5X_GIN_FILE), e.g. a file of configs/t5x/"
      if [[ $T5X_GIN_FILE != /* && ! -f $ROOT/$T5X_GIN_FILE ]]; then
        usage_error "--t5x-gin-file=$T5X_GIN_FILE does not exist in $ROOT"
      fi
      # t5x initialises multi-host TPU by itself; its --multiprocess_gpu is for GPUs only.
      trainer=(python3 -m t5x.train --gin_file="$T5X_GIN_FILE" "--gin.MODEL_DIR='$model_dir'")
      ;;
    *) usage_error "--trainer=$(hm_quote "$TRAINER") must be hashmoe or t5x" ;;
  esac
  local worker=(start --repo="$REMOTE_REPO" --venv="$REMOTE_VENV" --logs="$REMOTE_LOGS" --run="$run")
  local env
  for env in "${ENVS[@]}"; do
    [[ $env =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env takes KEY=VALUE, got $(hm_quote "$env")"
    worker+=(--env="$env")
  done
  if ((FORCE)); then worker+=(--force); fi
  on_workers all "$(worker_cmd "${worker[@]}" -- "${trainer[@]}" "${PASSTHROUGH[@]}")"
  if ((!HM_DRY_RUN)); then
    printf 'model dir %s; worker logs in ~/%s/%s/train.log\n' "$model_dir" "$REMOTE_LOGS" "$run" >&2
  fi
  if ((FOLLOW)); then
    WORKER=0 RUN_NAME=$run
    cmd_logs
  fi
}

cmd_status() {
  if ((TPU_QUEUED)); then
    local queued=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}")
    hm_run "${queued[@]}" --format="value(state.state)"
  fi
  local describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}")
  hm_run "${describe[@]}" --format="table(name.basename(),acceleratorType,state,health)"
  on_workers all "$(worker_cmd status --logs="$REMOTE_LOGS")"
}

cmd_logs() {
  local target=${WORKER:-0}
  check_worker "$target"
  hm_is_uint "$LINES" || usage_error "--lines=$(hm_quote "$LINES") must be a count"
  local args=(logs --logs="$REMOTE_LOGS" --lines="$LINES")
  if [[ -n $RUN_NAME ]]; then args+=(--run="$RUN_NAME"); fi
  if ((!NO_FOLLOW)); then args+=(--follow); fi
  if [[ $target == all ]]; then args+=(--prefix); fi
  on_workers "$target" "$(worker_cmd "${args[@]}")"
}

cmd_stop() {
  hm_is_uint "$GRACE" || usage_error "--grace=$(hm_quote "$GRACE") must be whole seconds"
  local args=(stop --logs="$REMOTE_LOGS" --grace="$GRACE")
  if ((KILL)); then args+=(--kill); fi
  on_workers all "$(worker_cmd "${args[@]}")"
}

cmd_delete() {
  if ((!NO_STOP)); then
    # A slice that is already gone (preempted) or never came up cannot be reached: go on.
    cmd_stop || hm_warn "could not stop the run (unreachable workers?); deleting anyway"
  fi
  local cmd
  if ((TPU_QUEUED)); then
    # --force deletes the slice along with the request.
    cmd=(gcloud compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}")
    cmd+=(--force --quiet)
  else
    cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}")
    cmd+=(--quiet)
  fi
  hm_run "${cmd[@]}"
}

cmd_exec() {
  local target=${WORKER:-all}
  check_worker "$target"
  ((${#PASSTHROUGH[@]})) || usage_error "exec needs a command after --"
  # Like ssh, the words after -- are joined into one shell command line.
  on_workers "$target" "${PASSTHROUGH[*]}"
}

main() {
  parse_args "$@"
  check_common
  "cmd_$COMMAND"
}

main "$@"
