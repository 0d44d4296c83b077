#!/usr/bin/env bash
# tpu_worker.sh: the worker side of tpu_pod.sh. It runs on every host of a TPU slice (tpu_pod.sh
# calls it through `gcloud compute tpus tpu-vm ssh --worker=all`) and works the same on any Linux
# host. Paths are relative to $HOME unless absolute.
#
# Usage: tpu_scripts/tpu_worker.sh COMMAND [OPTIONS] [-- TRAINER COMMAND...]
#
#   setup  --from=DIR --repo=DIR --venv=DIR --python=PY --jax-spec=SPEC
#          [--t5x=GIT_REF] [--no-verify] [--force]
#       Replaces REPO by the freshly unpacked checkout FROM (refused while a run is active, unless
#       --force), creates the virtualenv VENV with PY (apt-get installs PY and its venv module when
#       PY is missing: TPU VM images ship Python 3.10, jax 0.10 needs >= 3.11), then pip installs
#       SPEC (jax[tpu] at setup.cfg's pin), t5x at GIT_REF with --t5x, and REPO in editable mode
#       (pinning SPEC again so nothing t5x pulls moves jax). Last it checks that every host sees
#       the whole slice (jax.distributed.initialize on every worker at once; skip: --no-verify).
#   start  --repo=DIR --venv=DIR --logs=DIR --run=NAME [--env=KEY=VALUE]... [--force] -- CMD...
#       Runs CMD in REPO with VENV/bin first on PATH, detached from the ssh session (setsid), its
#       output in LOGS/NAME/train.log; LOGS/NAME keeps `pid`, `command` and, once CMD ends,
#       `exit_code`; LOGS/current points at the run. Refused while a run is active; --force
#       kills it (SIGKILL) and any process holding the TPU, and removes libtpu's lock file.
#   run    --repo=DIR --venv=DIR -- CMD...
#       Runs CMD in REPO with VENV/bin first on PATH, in the foreground (its output goes to the
#       ssh session; its exit status is this command's): `hashmoe prepare`, which is resumable, so
#       a dropped session loses nothing but the shards then being written.
#   stop   --logs=DIR [--grace=SECONDS] [--kill]
#       SIGTERM to the active run, then waits up to SECONDS (600) for it to end: hashmoe finishes
#       its step, writes a checkpoint and exits 143. Still running after that: exit 1, or SIGKILL
#       with --kill.
#   status --logs=DIR
#       One line: the current run, running (pid) or its exit code.
#   logs   --logs=DIR [--run=NAME] [--lines=N] [--follow] [--prefix]
#       The last N (100) lines of the run's log (default: the current run); --follow keeps
#       streaming; --prefix starts each line with [hostname].
#
# --dry-run (setup, start, run) prints the commands, one per line, and runs nothing. --help: this
# text.
# Exit codes: 0 done, 1 failure, 2 usage error.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=lib.sh
source "$HERE/lib.sh"

# t5x is not on PyPI and its setup.py names git versions of flax/optax/seqio/clu, which would move
# hashmoe's pins: install the three git-only packages without dependencies, then the PyPI-only
# dependencies t5x imports on its training path (hashmoe already brings jax, flax, optax, orbax,
# seqio, clu, gin, tensorflow).
# Each entry NAME=REPOSITORY; t5x is installed at --t5x=REF, the others at their default branch.
T5X_GIT_PACKAGES=${T5X_GIT_PACKAGES:-"t5x=https://github.com/google-research/t5x
  airio=https://github.com/google/airio jestimator=https://github.com/google-research/jestimator"}
T5X_PYPI_PACKAGES=${T5X_PYPI_PACKAGES:-"cached-property chex fiddle grain jaxtyping"}

# Printed by `setup` on every worker: the slice is usable when each line reads N/N with the
# slice's full device count.
VERIFY_PY='import jax, hashmoe; jax.distributed.initialize(); '
VERIFY_PY+='print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, '
VERIFY_PY+='{jax.device_count()} global {jax.devices()[0].device_kind} devices", flush=True)'

abs_path() {  # abs_path PATH: PATH made absolute against $HOME.
  if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$HOME/$1"; fi
}

# active_pid LOGS: the pid of the current run if it is still running (exit status 1 otherwise).
active_pid() {
  local run_dir=$1/current pid
  [[ -f $run_dir/pid && ! -f $run_dir/exit_code ]] || return 1
  pid=$(<"$run_dir/pid")
  hm_is_uint "$pid" && kill -0 "$pid" 2>/dev/null || return 1
  printf '%s' "$pid"
}

describe_exit() {
  case $1 in
    0) printf 'finished' ;;
    143) printf 'ended by SIGTERM (hashmoe writes a checkpoint first; launch again to resume)' ;;
    137) printf 'killed (SIGKILL); it resumes from its last periodic checkpoint' ;;
    *) printf 'failed; see the log' ;;
  esac
}

cmd_setup() {
  local from="" repo="" venv="" python="" jax_spec="" t5x_ref="" verify=1 force=0
  local logs=hashmoe_logs arg
  for arg in "$@"; do
    case $arg in
      --from=*) from=${arg#*=} ;;
      --repo=*) repo=${arg#*=} ;;
      --venv=*) venv=${arg#*=} ;;
      --python=*) python=${arg#*=} ;;
      --jax-spec=*) jax_spec=${arg#*=} ;;
      --t5x=*) t5x_ref=${arg#*=} ;;
      --no-verify) verify=0 ;;
      --force) force=1 ;;
      --logs=*) logs=${arg#*=} ;;
      *) hm_die "setup: unknown option $(hm_quote "$arg") (see --help)" ;;
    esac
  done
  local name
  for name in from repo venv python jax_spec; do
    [[ -n ${!name} ]] || hm_die "setup needs --${name//_/-}=..."
  done
  hm_check_remote_path --from "$from"
  hm_check_remote_path --repo "$repo"
  hm_check_remote_path --venv "$venv"
  cd "$HOME"
  [[ -d $from ]] || hm_die "setup: $HOME/$from is not a folder (unpack the checkout there first)" 1
  local pid
  if pid=$(active_pid "$logs"); then
    ((force)) || hm_die "setup: a run is active (pid $pid); stop it first (tpu_pod.sh stop) or pass --force" 1
    hm_warn "replacing $repo under the active run $pid (--force)"
  fi

  # Swap rather than unpack over the old tree, so files deleted upstream do not linger.
  hm_run rm -rf "$repo.old"
  if [[ -e $repo ]]; then hm_run mv "$repo" "$repo.old"; fi
  hm_run mv "$from" "$repo"
  hm_run rm -rf "$repo.old"

  # Ubuntu splits `venv`'s ensurepip into python3.N-venv: an interpreter may be there without it.
  local apt=()
  if ! command -v "$python" >/dev/null 2>&1; then
    apt=("$python" "$python-venv")
  elif ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    apt=("$python-venv")
  fi
  if ((${#apt[@]})); then
    [[ $python =~ ^python3\.[0-9]+$ ]] ||
      hm_die "setup: $python is missing or has no venv module; give --python=python3.N (apt-get installs it)" 1
    hm_run sudo apt-get update -q
    hm_run sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt[@]}"
  fi
  # jax 0.10 (setup.cfg's pin) declares Requires-Python >= 3.11; fail here, not inside pip.
  if ((!HM_DRY_RUN)) && ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    hm_die "setup: $python is $("$python" -V 2>&1); jax 0.10 needs Python >= 3.11 (--python=python3.11)" 1
  fi
  if [[ ! -x $venv/bin/python ]]; then hm_run "$python" -m venv "$venv"; fi
  local pip=("$venv/bin/python" -m pip install --quiet)
  hm_run "${pip[@]}" --upgrade pip
  hm_run "${pip[@]}" "$jax_spec"
  if [[ -n $t5x_ref ]]; then
    local specs=() entry
    for entry in $T5X_GIT_PACKAGES; do
      # t5x itself at the requested ref; its companion libraries at their default branch.
      if [[ ${entry%%=*} == t5x ]]; then
        specs+=("${entry%%=*} @ git+${entry#*=}@$t5x_ref")
      else
        specs+=("${entry%%=*} @ git+${entry#*=}")
      fi
    done
    hm_run "${pip[@]}" --no-deps "${specs[@]}"
    local pypi
    read -r -a pypi <<<"$T5X_PYPI_PACKAGES"
    hm_run "${pip[@]}" "${pypi[@]}"
  fi
  # "./": pip reads a bare name after -e as a requirement, not a folder.
  local editable=$repo
  if [[ $repo != /* ]]; then editable=./$repo; fi
  hm_run "${pip[@]}" -e "$editable" "$jax_spec"
  if ((verify)); then
    hm_run timeout 600 "$venv/bin/python" -c "$VERIFY_PY"
  fi
}

cmd_start() {
  local repo="" venv="" logs="" run="" force=0 envs=()
  while (($#)); do
    case $1 in
      --repo=*) repo=${1#*=} ;;
      --venv=*) venv=${1#*=} ;;
      --logs=*) logs=${1#*=} ;;
      --run=*) run=${1#*=} ;;
      --env=*)
        [[ ${1#*=} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || hm_die "start: --env takes KEY=VALUE, got $(hm_quote "${1#*=}")"
        envs+=("${1#*=}") ;;
      --force) force=1 ;;
      --) shift; break ;;
      *) hm_die "start: unknown option $(hm_quote "$1") (the trainer command goes after --)" ;;
    esac
    shift
  done
  (($#)) || hm_die "start needs the trainer command after --"
  local name
  for name in repo venv logs run; do
    [[ -n ${!name} ]] || hm_die "start needs --$name=..."
  done
  hm_check_remote_path --repo "$repo"
  hm_check_remote_path --venv "$venv"
  hm_check_remote_path --logs "$logs"
  [[ $run =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || hm_die "start: --run=$(hm_quote "$run") must be a plain name"
  cd "$HOME"
  local pid
  if pid=$(active_pid "$logs"); then
    ((force)) || hm_die "start: run $(readlink "$logs/current" || true) is still running (pid $pid) on $(hostname); stop it first or pass --force" 1
    hm_run kill -KILL "$pid"
    # Its supervisor writes exit_code when it notices; let it, before a new run reuses the folder.
    local i
    for ((i = 0; i < 100 && !HM_DRY_RUN; i++)); do
      [[ -f $logs/current/exit_code ]] && break
      sleep 0.1
    done
  fi
  if ((force)); then
    # Another process (a run started by hand, a crashed one) may still hold the TPU: libtpu lets
    # one process per host open the chips (/dev/accel* on v2-v4, /dev/vfio/* from v5 on).
    local holders=()
    if command -v lsof >/dev/null 2>&1; then
      mapfile -t holders < <(sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u)
    fi
    if ((${#holders[@]})); then hm_run sudo -n kill -KILL "${holders[@]}"; fi
    hm_run rm -f /tmp/libtpu_lockfile
  fi
  [[ -d $repo ]] || hm_die "start: $HOME/$repo does not exist; run tpu_pod.sh setup first" 1
  [[ -d $venv/bin ]] || hm_die "start: $HOME/$venv/bin does not exist; run tpu_pod.sh setup first" 1

  local run_dir=$logs/$run
  local cmd=(env "PATH=$(abs_path "$venv")/bin:$PATH" PYTHONUNBUFFERED=1 "${envs[@]}" "$@")
  if ((HM_DRY_RUN)); then
    hm_run cd "$(abs_path "$repo")"
    hm_run "${cmd[@]}"
    return 0
  fi
  mkdir -p "$run_dir"
  rm -f "$run_dir/pid" "$run_dir/exit_code"
  ln -sfn "$run" "$logs/current"
  hm_join "$@" >"$run_dir/command"
  printf '\n' >>"$run_dir/command"
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$(<"$run_dir/command")" >>"$run_dir/train.log"
  # setsid: the run must outlive the ssh session that started it; every descriptor is redirected
  # so ssh does not wait for the run to close them.
  (cd "$(abs_path "$repo")" &&
    exec setsid bash "$SELF" _supervise "$(abs_path "$run_dir")" -- "${cmd[@]}") \
    </dev/null >/dev/null 2>&1 &
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -s $run_dir/pid ]] && break
    sleep 0.1
  done
  [[ -s $run_dir/pid ]] || hm_die "start: the run did not start on $(hostname); see $HOME/$run_dir/train.log" 1
  printf '%s: started run %s (pid %s), log %s\n' "$(hostname)" "$run" "$(<"$run_dir/pid")" \
    "$run_dir/train.log"
}

cmd_run() {
  local repo="" venv=""
  while (($#)); do
    case $1 in
      --repo=*) repo=${1#*=} ;;
      --venv=*) venv=${1#*=} ;;
      --) shift; break ;;
      *) hm_die "run: unknown option $(hm_quote "$1") (the command goes after --)" ;;
    esac
    shift
  done
  (($#)) || hm_die "run needs the command after --"
  local name
  for name in repo venv; do
    [[ -n ${!name} ]] || hm_die "run needs --$name=..."
  done
  hm_check_remote_path --repo "$repo"
  hm_check_remote_path --venv "$venv"
  cd "$HOME"
  if ((!HM_DRY_RUN)); then
    [[ -d $repo ]] || hm_die "run: $HOME/$repo does not exist; run tpu_pod.sh setup first" 1
    [[ -d $venv/bin ]] || hm_die "run: $HOME/$venv/bin does not exist; run tpu_pod.sh setup first" 1
  fi
  hm_run cd "$(abs_path "$repo")"
  hm_run env "PATH=$(abs_path "$venv")/bin:$PATH" PYTHONUNBUFFERED=1 "$@"
}

# _supervise RUN_DIR -- CMD...: runs CMD with its output appended to RUN_DIR/train.log, keeps its
# pid (stop signals CMD itself, so hashmoe's SIGTERM handler sees it) and its exit status.
cmd_supervise() {
  local run_dir=$1
  shift 2
  "$@" >>"$run_dir/train.log" 2>&1 </dev/null &
  local child=$! rc=0
  printf '%s\n' "$child" >"$run_dir/pid"
  wait "$child" || rc=$?
  printf '=== %s %s: exit code %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$rc" >>"$run_dir/train.log"
  printf '%s\n' "$rc" >"$run_dir/exit_code"
}

cmd_stop() {
  local logs="" grace=600 kill=0 arg
  for arg in "$@"; do
    case $arg in
      --logs=*) logs=${arg#*=} ;;
      --grace=*) grace=${arg#*=} ;;
      --kill) kill=1 ;;
      *) hm_die "stop: unknown option $(hm_quote "$arg")" ;;
    esac
  done
  [[ -n $logs ]] || hm_die "stop needs --logs=..."
  hm_is_uint "$grace" || hm_die "stop: --grace takes whole seconds, got $(hm_quote "$grace")"
  cd "$HOME"
  local host pid run
  host=$(hostname)
  if ! pid=$(active_pid "$logs"); then
    printf '%s: no active run\n' "$host"
    return 0
  fi
  run=$(readlink "$logs/current")
  printf '%s: SIGTERM to run %s (pid %s); waiting up to %ss\n' "$host" "$run" "$pid" "$grace"
  kill -TERM "$pid"
  local tenths=0
  while kill -0 "$pid" 2>/dev/null && ((tenths < grace * 10)); do
    sleep 0.1
    tenths=$((tenths + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    if ((!kill)); then
      printf '%s: run %s still running after %ss (pass --kill to SIGKILL it)\n' "$host" "$run" "$grace" >&2
      return 1
    fi
    kill -KILL "$pid" 2>/dev/null || true
  fi
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -f $logs/current/exit_code ]] && break
    sleep 0.1
  done
  local rc
  rc=$(cat "$logs/current/exit_code" 2>/dev/null || printf '?')
  printf '%s: run %s exit code %s: %s\n' "$host" "$run" "$rc" "$(describe_exit "$rc")"
}

cmd_status() {
  local logs="" arg
  for arg in "$@"; do
    case $arg in
      --logs=*) logs=${arg#*=} ;;
      *) hm_die "status: unknown option $(hm_quote "$arg")" ;;
    esac
  done
  [[ -n $logs ]] || hm_die "status needs --logs=..."
  cd "$HOME"
  local host pid run
  host=$(hostname)
  if [[ ! -L $logs/current ]]; then
    printf '%s: no run\n' "$host"
    return 0
  fi
  run=$(readlink "$logs/current")
  if pid=$(active_pid "$logs"); then
    printf '%s: run %s running (pid %s): %s\n' "$host" "$run" "$pid" "$(<"$logs/current/command")"
  elif [[ -f $logs/current/exit_code ]]; then
    local rc
    rc=$(<"$logs/current/exit_code")
    printf '%s: run %s exited with code %s: %s\n' "$host" "$run" "$rc" "$(describe_exit "$rc")"
  else
    printf '%s: run %s is not running and left no exit code (the host restarted?)\n' "$host" "$run"
  fi
}

cmd_logs() {
  local logs="" run="" lines=100 follow=0 prefix=0 arg
  for arg in "$@"; do
    case $arg in
      --logs=*) logs=${arg#*=} ;;
      --run=*) run=${arg#*=} ;;
      --lines=*) lines=${arg#*=} ;;
      --follow) follow=1 ;;
      --prefix) prefix=1 ;;
      *) hm_die "logs: unknown option $(hm_quote "$arg")" ;;
    esac
  done
  [[ -n $logs ]] || hm_die "logs needs --logs=..."
  hm_is_uint "$lines" || hm_die "logs: --lines takes a count, got $(hm_quote "$lines")"
  cd "$HOME"
  local file=$logs/${run:-current}/train.log
  [[ -f $file ]] || hm_die "logs: no log at $HOME/$file on $(hostname)" 1
  local tail_cmd=(tail -n "$lines")
  if ((follow)); then tail_cmd+=(-F); fi
  if ((prefix)); then
    local host
    host=$(hostname)
    "${tail_cmd[@]}" "$file" | sed -u "s/^/[$host] /"
  else
    "${tail_cmd[@]}" "$file"
  fi
}

main() {
  local command=${1:-}
  case $command in
    "" | -h | --help) hm_usage "$SELF"; return 0 ;;
  esac
  shift
  if [[ $command == _supervise ]]; then
    cmd_supervise "$@"
    return
  fi
  # Our own --dry-run/--help come before `--`; what follows it is the trainer's, kept verbatim.
  local args=() arg
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --dry-run) HM_DRY_RUN=1 ;;
      -h | --help) hm_usage "$SELF"; return 0 ;;
      --) args+=(-- "$@"); break ;;
      *) args+=("$arg") ;;
    esac
  done
  case $command in
    setup) cmd_setup "${args[@]}" ;;
    start) cmd_start "${args[@]}" ;;
    run) cmd_run "${args[@]}" ;;
    stop) cmd_stop "${args[@]}" ;;
    status) cmd_status "${args[@]}" ;;
    logs) cmd_logs "${args[@]}" ;;
    *) hm_die "unknown command $(hm_quote "$command"); one of setup, start, run, stop, status, logs" ;;
  esac
}

main "$@"
