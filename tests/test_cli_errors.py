"""What `hashmoe` says when the command line, the config or the machine is wrong (issue 10).

Each mistake must end in one or two lines that name the flag, file, line or path at fault and the
fix, with exit code 2 for a usage error (and nothing written to MODEL_DIR: the run is refused
before any work) or 1 for a runtime error; `--debug` / HASHMOE_DEBUG=1 adds the traceback. The
expected messages are written out in full here. Every call but one runs `cli.main` in this
process; the exception is a real `hashmoe` process whose stderr must hold nothing but the error
line (TensorFlow and CUDA print their start-up lines straight to file descriptor 2).
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hashmoe import cli, gin_utils, hash_functions
from test_cli import REPO, gin_flags
from textdata import write_text_folder

NO_CACHE = "--compilation_cache_dir=none"
DEBUG_ENV = "HASHMOE_DEBUG"


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  return write_text_folder(tmp_path_factory.mktemp("texts"), files=3, paragraphs=10)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def cache(cache_dir, monkeypatch):
  """One vocabulary cache for the file (the runs that get as far as the data share it)."""
  monkeypatch.setenv("HASHMOE_CACHE", str(cache_dir))
  monkeypatch.delenv(DEBUG_ENV, raising=False)


def run(argv, capsys):
  """`hashmoe ARGV` in this process: (exit code, stdout, stderr)."""
  capsys.readouterr()
  code = cli.main(list(argv) + [NO_CACHE])
  out, err = capsys.readouterr()
  return code, out, err


def error_line(command, message):
  return f"hashmoe {command}: error: {message}\n"


# --------------------------------------------------------------------------------------------------
# Case 4: a binding nothing uses is an error, not a silently ignored flag.


@pytest.mark.parametrize("flag, message", [
    ("--gin.TRAIN_STEPZ=5",
     "--gin.TRAIN_STEPZ=5 sets TRAIN_STEPZ, a macro nothing in the config reads (did you mean "
     "TRAIN_STEPS?)"),
    ("--gin_bindings=TRAIN_STEPZ = 5",
     "--gin_bindings='TRAIN_STEPZ = 5' sets TRAIN_STEPZ, a macro nothing in the config reads (did "
     "you mean TRAIN_STEPS?)"),
    # text_dir.gin sets TransformerConfig.num_encoder_layers itself, so %ENCODER_LAYERS of the
    # model file is read by nothing: the flag would change nothing.
    ("--gin.ENCODER_LAYERS=2",
     "--gin.ENCODER_LAYERS=2 sets ENCODER_LAYERS, a macro nothing in the config reads"),
    ("--gin.train.train_stepz=5",
     "--gin.train.train_stepz=5: train has no parameter train_stepz (did you mean train_steps?)"),
    ("--gin.trian.train_steps=5",
     "--gin.trian.train_steps=5: no configurable named trian (did you mean train?)"),
], ids=["macro", "gin_bindings", "overridden_macro", "parameter", "configurable"])
def test_an_unused_or_unknown_binding_is_refused_before_training(texts, tmp_path, capsys, flag,
                                                                 message):
  model_dir = tmp_path / "run"
  code, out, err = run(["train", *gin_flags(texts, model_dir), flag], capsys)
  assert (code, out, err) == (2, "", error_line("train", message))
  assert not model_dir.exists()


# --------------------------------------------------------------------------------------------------
# Case 6: everyday mistakes, one or two lines each.


def test_an_unquoted_string_says_gin_strings_need_inner_quotes(texts, tmp_path, capsys):
  flags = [f for f in gin_flags(texts, tmp_path / "run") if not f.startswith("--gin.MODEL_DIR")]
  code, out, err = run(["train", *flags, "--gin.MODEL_DIR=runs/x"], capsys)
  assert (code, out) == (2, "")
  assert err == error_line("train", "--gin.MODEL_DIR=runs/x: runs/x is not a gin value; gin "
                           "strings need inner quotes: --gin.MODEL_DIR=\"'runs/x'\"")
  assert not (tmp_path / "run").exists() and not Path("runs/x").exists()


@pytest.mark.parametrize("flag, message", [
    ("--gin.TRAIN_STEPS=abc", "--gin.TRAIN_STEPS=abc: abc is not a gin value; TRAIN_STEPS is a "
     "number (200 in the config), e.g. --gin.TRAIN_STEPS=200"),
    ("--gin.TRAIN_STEPS='abc'", "--gin.TRAIN_STEPS='abc': TRAIN_STEPS is a number (200 in the "
     "config), not the string 'abc'; e.g. --gin.TRAIN_STEPS=200"),
], ids=["bare_word", "string"])
def test_a_value_of_the_wrong_type_names_the_expected_one(texts, tmp_path, capsys, flag, message):
  model_dir = tmp_path / "run"
  code, out, err = run(["train", *gin_flags(texts, model_dir), flag], capsys)
  assert (code, out, err) == (2, "", error_line("train", message))
  assert not model_dir.exists()


def test_a_missing_required_setting_names_the_macro(texts, tmp_path, capsys):
  flags = [f for f in gin_flags(texts, tmp_path / "run") if not f.startswith("--gin.MODEL_DIR")]
  code, out, err = run(["train", *flags], capsys)
  assert (code, out) == (2, "")
  assert err == error_line("train", "MODEL_DIR is required: add --gin.MODEL_DIR=\"'/path'\" (gin "
                           "strings need inner quotes)")


def test_bare_train_says_which_config_to_give(capsys):
  code, out, err = run(["train"], capsys)
  assert (code, out) == (2, "")
  assert err == error_line(
      "train", "no config given: hashmoe train needs gin files, e.g. "
      "--gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR=\"'/tmp/tiny'\" (a run config from "
      "configs/runs/, then optional model and task files from configs/models/, configs/tasks/)")


def test_a_model_dir_that_is_a_file_is_refused(texts, tmp_path, capsys):
  model_dir = tmp_path / "run"
  model_dir.write_text("not a run\n")
  code, out, err = run(["train", *gin_flags(texts, model_dir)], capsys)
  assert (code, out) == (2, "")
  assert err == error_line("train", f"MODEL_DIR {model_dir} is a file, not a directory: give a "
                           "directory (a new one, or an earlier run's to resume it)")
  assert model_dir.read_text() == "not a run\n"


def test_a_read_only_parent_of_model_dir_is_refused(texts, tmp_path, capsys, monkeypatch):
  # The tests may run as root, whom permission bits do not stop: the read-only folder is what the
  # system would report for one (access() says no, mkdir fails with EACCES).
  parent = tmp_path / "readonly"
  parent.mkdir()
  model_dir = parent / "run"
  access, mkdir = os.access, os.mkdir

  def no_access(path, mode, **kw):
    return False if Path(path) == parent else access(path, mode, **kw)

  def no_mkdir(path, *a, **kw):
    if str(path).startswith(str(parent)):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return mkdir(path, *a, **kw)

  monkeypatch.setattr(os, "access", no_access)
  monkeypatch.setattr(os, "mkdir", no_mkdir)
  code, out, err = run(["train", *gin_flags(texts, model_dir)], capsys)
  assert (code, out) == (2, "")
  assert err == error_line("train", f"MODEL_DIR {model_dir} is not writable: permission denied on "
                           f"{parent}; choose a writable place or change the folder's permissions")
  assert not model_dir.exists()


@pytest.mark.parametrize("body, message", [
    ("include 'runs/cpu_tiny.gin'\nBATCH_SIZE = (8\n",
     "{file}:2: `BATCH_SIZE = (8` opens a bracket or string that the file never closes"),
    ("include 'runs/cpu_tiny.gin'\nTRAIN_STEPS = abc\n",
     "{file}:2: gin cannot parse `TRAIN_STEPS = abc`: abc is not a gin value; TRAIN_STEPS is a "
     "number (200 in the config), e.g. TRAIN_STEPS = 200"),
    ("include 'runs/cpu_tiny.gin'\ntrain.train_stepz = 3\n",
     "{file}:2: train has no parameter train_stepz (did you mean train_steps?) in "
     "`train.train_stepz = 3`"),
    ("include 'runs/cpu_tinny.gin'\n",
     "{file}:1: include 'runs/cpu_tinny.gin' not found in the gin search path (., {configs}, "
     "{folder}) (did you mean runs/cpu_tiny.gin?); add its folder with --gin_search_path"),
], ids=["unclosed_bracket", "bad_value", "unknown_parameter", "bad_include"])
def test_a_broken_gin_file_names_the_file_line_and_text(tmp_path, capsys, body, message):
  config = tmp_path / "mine.gin"
  config.write_text(body)
  model_dir = tmp_path / "run"
  code, out, err = run(["train", f"--gin_file={config}", f"--gin.MODEL_DIR='{model_dir}'"], capsys)
  assert (code, out) == (2, "")
  assert err == error_line("train", message.format(file=config, configs=cli.configs_dir(),
                                                   folder=tmp_path))
  assert not model_dir.exists()


def test_build_hash_refuses_a_directory_as_output_and_leaves_no_temporary(texts, tmp_path, capsys):
  out_dir = tmp_path / "tables"
  out_dir.mkdir()
  code, out, err = run(["build-hash", *gin_flags(texts, tmp_path / "unused"), "--kind=balanced",
                        f"--output={out_dir}"], capsys)
  assert (code, out) == (2, "")
  assert err == error_line("build-hash", f"--output {out_dir} is a directory; give the file to "
                           f"write, e.g. --output={out_dir / 'balanced.npz'}")
  assert not list(out_dir.iterdir()) and not (tmp_path / "unused").exists()
  # The table writer itself, given that directory (the CLI no longer lets it get there), fails
  # without leaving its temporary `.tables.tmp-<pid>` beside it.
  table = hash_functions.build_table("random", num_experts=4, vocab_size=16)
  with pytest.raises(OSError):
    table.save(out_dir)
  assert [p.name for p in tmp_path.iterdir()] == ["tables"]


@pytest.fixture
def fresh_text_tasks():
  """The text-folder tasks unregistered before and after: seqio's registry is global, and an
  earlier in-process run (tests/test_cli.py) registered them on another folder."""
  import seqio

  def remove():
    for name in list(seqio.TaskRegistry.names()):
      if name.startswith("hashmoe_text_"):
        seqio.TaskRegistry.remove(name)

  remove()
  yield
  remove()


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "wrapped"])
@pytest.mark.usefixtures("fresh_text_tasks")
def test_a_full_disk_is_one_line_naming_the_path(texts, tmp_path, capsys, monkeypatch, wrapped):
  # The disk fills when the checkpoint folder is created (inside orbax); `wrapped` raises the
  # OSError under another exception, as orbax and TensorFlow wrap theirs.
  model_dir = tmp_path / "run"
  full = model_dir / "checkpoints"
  mkdir = os.mkdir

  def mkdir_on_a_full_disk(path, *a, **kw):
    if str(path).startswith(str(full)):
      error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
      if wrapped:
        raise RuntimeError("could not create the checkpoint directory") from error
      raise error
    return mkdir(path, *a, **kw)

  monkeypatch.setattr(os, "mkdir", mkdir_on_a_full_disk)
  code, out, err = run(["train", *gin_flags(texts, model_dir), "--gin.TRAIN_STEPS=2"], capsys)
  assert (code, out) == (1, "")
  assert err == error_line("train", f"no space left on device while writing {full}; free some "
                           "space (or point MODEL_DIR elsewhere) and run the same command again: "
                           "training resumes from the last checkpoint")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(texts, tmp_path, capsys, monkeypatch, how):
  extra = ["--debug"] if how == "flag" else []
  if how == "env":
    monkeypatch.setenv(DEBUG_ENV, "1")
  code, out, err = run(["train", *gin_flags(texts, tmp_path / "run"), "--gin.TRAIN_STEPZ=5",
                        *extra], capsys)
  assert (code, out) == (2, "")
  assert err.startswith("Traceback (most recent call last):\n")
  assert "in parse_gin" in err  # where the check raised
  assert err.endswith(error_line("train", "--gin.TRAIN_STEPZ=5 sets TRAIN_STEPZ, a macro nothing "
                                 "in the config reads (did you mean TRAIN_STEPS?)"))


# --------------------------------------------------------------------------------------------------
# Case 9: no TensorFlow/CUDA start-up lines unless asked.


def test_a_real_process_prints_only_its_error_line(tmp_path):
  """`hashmoe train` imports TensorFlow, JAX and orbax, then refuses a misspelt macro; stderr must
  hold that one line, none of the native start-up lines ("Could not find cuda drivers", "failed
  call to cuInit", ...) that TensorFlow writes to file descriptor 2 whatever its log level."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", DEBUG_ENV)}
  env["HASHMOE_CACHE"] = str(tmp_path / "cache")
  command = shutil.which("hashmoe")
  command = [command] if command else [sys.executable, "-m", "hashmoe.cli"]
  done = subprocess.run(command + ["train", "--gin_file=configs/runs/cpu_tiny.gin",
                                   f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPZ=5",
                                   NO_CACHE],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert (done.returncode, done.stdout) == (2, "")
  assert done.stderr == error_line("train", "--gin.TRAIN_STEPZ=5 sets TRAIN_STEPZ, a macro nothing "
                                   "in the config reads (did you mean TRAIN_STEPS?)")
  assert not (tmp_path / "run").exists()


def test_a_configs_prefixed_file_resolves_from_any_folder(tmp_path, monkeypatch):
  # The docs write `--gin_file=configs/runs/cpu_tiny.gin` from a checkout; from another folder that
  # name was refused with a "did you mean" naming the same string.
  monkeypatch.chdir(tmp_path)
  resolved = gin_utils._resolve_gin_file("configs/runs/cpu_tiny.gin", [cli.configs_dir()])
  assert resolved == str(cli.configs_dir() / "runs" / "cpu_tiny.gin")
