"""MODEL_DIR: the names of what a run writes there, one run at a time, and earlier runs' files.

One run per MODEL_DIR (`ModelDirLock`): process 0 locks `MODEL_DIR/hashmoe.lock` before anything is
written, and a second run on the directory fails at once naming the first one's pid and host.

A resumed run whose config changed keeps the checkpoint's config as `config.gin.<step>`
(`keep_config_history`); a fresh run in a MODEL_DIR that holds logs of an earlier run (its
checkpoints deleted) keeps them as `<name>.<timestamp>.bak` before starting over, with a warning
(`set_aside_earlier_logs`).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time
import warnings
from typing import Any, Mapping, Optional, Union

import jax
from etils import epath

from hashmoe.training import multihost
from hashmoe.training.errors import ModelDirInUseError

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)

# What a run writes under MODEL_DIR.
CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CONFIG_FILE = "config.gin"
TENSORBOARD_SUBDIR = "tensorboard"
LOCK_FILE = "hashmoe.lock"


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is on an object store (gs://, s3://, ...), where files cannot be appended to."""
  return "://" in os.fspath(path)


class ModelDirLock:
  """MODEL_DIR's lock: one run at a time writes to a MODEL_DIR.

  `acquire` takes an exclusive `fcntl.flock` on MODEL_DIR/hashmoe.lock (the kernel drops it when
  the process ends, however it ends) and writes the owner's pid, host and start time into the file,
  for the message a second run prints; `release` deletes the file and drops the lock. `train`
  takes it on process 0 before it writes anything, and releases it when the run ends, exceptions
  included.

  A lock file that exists but is not locked was left by a run that ended without releasing it
  (SIGKILL, a crash). Written on this host, that run is certainly gone: the lock is taken over with
  a warning. Written on another host, it may not be (not every network filesystem carries flock
  between hosts, and this host cannot ask whether a process there lives): the run refuses and says
  to delete the file if that run is gone. There is no heartbeat rule on purpose: a run that only
  stalls would lose its lock to a second one.

  Object stores (gs://, s3://) have no locks: there the lock is skipped (logged), and one run per
  MODEL_DIR is up to the launcher. Where flock itself fails (a filesystem without locks) the run
  goes on unlocked, with a warning.
  """

  def __init__(self, model_dir: PathLike):
    self.model_dir = epath.Path(model_dir)
    self.path = self.model_dir / LOCK_FILE
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _read_owner(self, fd: int, wait: bool = False) -> dict[str, Any]:
    # A holder writes its owner right after locking; `wait` gives it that moment.
    for _ in range(20 if wait else 1):
      raw = os.pread(fd, 1 << 16, 0)
      if raw:
        try:
          owner = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
          owner = None
        return owner if isinstance(owner, dict) else {"pid": "?", "host": "?",
                                                      "started": "? (unreadable lock file)"}
      if wait:
        time.sleep(0.05)
    return {}

  def _describe(self, owner: Mapping[str, Any]) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} "
            f"(started {owner.get('started', '?')})")

  def acquire(self) -> "ModelDirLock":
    """Takes the lock, or raises ModelDirInUseError naming the run that holds it."""
    if is_remote(self.model_dir):
      logger.info("MODEL_DIR %s is on an object store, which has no locks: make sure no other run "
                  "writes to it", self.model_dir)
      return self
    path = os.fspath(self.path)
    host = socket.gethostname()
    for _ in range(10):
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = self._read_owner(fd, wait=True)
        os.close(fd)
        who = self._describe(owner) if owner else "another run (it has not written its pid yet)"
        raise ModelDirInUseError(
            f"MODEL_DIR {self.model_dir} is in use by {who}: one run at a time may write to a "
            "MODEL_DIR. Wait for that run to end (or stop it), or give this run another "
            "MODEL_DIR.") from None
      except OSError as e:
        os.close(fd)
        message = (f"cannot lock MODEL_DIR {self.model_dir} ({e}); going on unlocked: make sure no "
                   "other run writes to it")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
        return self
      try:
        current = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        current = False
      if not current:  # Its owner released and deleted it meanwhile: lock the file now there.
        os.close(fd)
        continue
      owner = self._read_owner(fd)
      if owner and owner.get("host") != host:
        os.close(fd)
        raise ModelDirInUseError(
            f"MODEL_DIR {self.model_dir} is locked by {self._describe(owner)}, and this host "
            f"({host}) cannot check whether that run is still going. If no run is using the "
            f"directory, delete {path} and run again.")
      if owner:
        message = (f"taking over the stale lock of MODEL_DIR {self.model_dir}: "
                   f"{self._describe(owner)} ended without releasing it")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
      started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
      data = json.dumps({"pid": os.getpid(), "host": host, "started": started}).encode()
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
      os.fsync(fd)
      self._fd = fd
      return self
    raise ModelDirInUseError(f"could not lock MODEL_DIR {self.model_dir}: {path} kept being "
                             "replaced; is another run starting there?")

  def release(self) -> None:
    """Deletes the lock file and drops the lock (nothing when not held)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
        os.unlink(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(fd)

  def __enter__(self) -> "ModelDirLock":
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


def lock_model_dir(model_dir: epath.Path) -> Optional[ModelDirLock]:
  """Process 0 takes MODEL_DIR's lock; every process raises if it could not (so that no host goes
  on to wait for the others in a collective)."""
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = ModelDirLock(model_dir).acquire()
    except ModelDirInUseError as e:
      error = str(e)
  if jax.process_count() > 1:
    error = next((e for e in multihost.allgather_json(error) if e), "")
  if error:
    if lock is not None:
      lock.release()
    raise ModelDirInUseError(error)
  return lock


def keep_config_history(model_dir: epath.Path, step: int, saved_text: str,
                         config_text: str) -> None:
  """Before config.gin takes a resumed run's changed config, the checkpoint's is kept as
  config.gin.<step> (the config that trained up to that step); an existing one is not replaced:
  a run that stopped before its next checkpoint trained nothing that was kept."""
  if not saved_text or saved_text == config_text:
    return
  kept = model_dir / f"{CONFIG_FILE}.{step}"
  if not kept.exists():
    kept.write_text(saved_text)
    logger.info("the config of the checkpoint at step %d is kept as %s", step, kept)


def set_aside_earlier_logs(model_dir: epath.Path) -> None:
  """A fresh run in a MODEL_DIR that holds logs of an earlier run (whose checkpoints were deleted)
  would overwrite them: they are renamed `<name>.<timestamp>.bak` first, with a warning. The
  TensorBoard folder is left as it is (TensorBoard tells the runs apart by wall time)."""
  logs = [model_dir / name for name in (METRICS_FILE, EVAL_FILE)]
  records = {p.name: sum(1 for line in p.read_text().splitlines() if line.strip())
             for p in logs if p.exists()}
  if not any(records.values()):
    return
  stamp = time.strftime("%Y%m%d-%H%M%S")
  kept = []
  for path in logs + [model_dir / CONFIG_FILE]:
    if path.exists():
      target = path.parent / f"{path.name}.{stamp}.bak"
      path.rename(target)
      kept.append(target.name)
  message = (f"MODEL_DIR {model_dir} has no checkpoint but holds the logs of an earlier run "
             f"({', '.join(f'{n}: {c} records' for n, c in records.items())}); they are kept as "
             f"{', '.join(kept)} and this run starts over at step 0")
  warnings.warn(message, RuntimeWarning, stacklevel=3)
  logger.warning(message)
