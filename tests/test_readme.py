"""The README's example is documentation that must keep running."""
import pathlib
import re

import pytest

from hashmoe import routers

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_states_the_test_command():
  assert 'pip install -e ".[test]" && pytest' in README.read_text()


def test_readme_python_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README.md has no python example"
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
  # The example builds a balanced table and a model whose hash layer adds no auxiliary loss.
  assert float(namespace["aux_loss"]) == 0.0
  assert namespace["logits"].shape == (2, 16, namespace["vocab"])
  assert namespace["table"].load_stats(namespace["np"].bincount(
      namespace["ids"], minlength=namespace["vocab"]))["max_over_mean"] < 1.2


# The example's own router and tables, which the README's other routers replace.
EXAMPLE_ROUTER = "router=routers.Hash()"
EXAMPLE_TABLES = 'hash_tables={"default": (table,)}'


def _router_edits() -> dict[str, dict[str, str]]:
  """{router family: {what the example prints: what replaces it}} as the README's text after its
  example says: a line naming `router=routers.R(...)` and `hash_tables=...` gives both edits."""
  section = README.read_text().split("## A hash layer in a few lines", 1)[1].split("\n## ", 1)[0]
  prose = re.sub(r"```.*?```", "", section, flags=re.S)
  edits = {}
  for item in re.split(r"\n(?=- )|\n\n", prose):
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", item)]
    tables = [s for s in spans if s.startswith("hash_tables=")]
    for span in spans:
      found = re.fullmatch(r"router=routers\.(\w+)\(.*\)", span)
      if found and span != EXAMPLE_ROUTER:
        name = getattr(routers, found.group(1)).name
        edits[name] = {EXAMPLE_ROUTER: span, **({EXAMPLE_TABLES: tables[0]} if tables else {})}
  return edits


# What the README says each router's aux_loss is: the load-balancing loss, or none.
BALANCE_LOSS = {"switch": True, "token_switch": True, "base": False, "hash_topk": False,
                "topk": True, "first_layers": False}


@pytest.mark.parametrize("router", [r for r in routers.REGISTRY if r != "hash"])
def test_readme_example_runs_with_every_router_it_names(router):
  """Each router in the example, with exactly the edits the README gives for it."""
  edits = _router_edits().get(router)
  assert edits is not None, f"README.md does not say how its example uses the {router!r} router"
  (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert EXAMPLE_ROUTER in block and EXAMPLE_TABLES in block
  for printed, replacement in edits.items():
    block = block.replace(printed, replacement)
  namespace = {}
  exec(compile(block, f"{README} ({router})", "exec"), namespace)  # noqa: S102
  config = namespace["config"]
  assert config.sparse.router.name == router
  assert namespace["logits"].shape == (2, 16, namespace["vocab"])
  aux_loss = float(namespace["aux_loss"])
  assert aux_loss > 0 if BALANCE_LOSS[router] else aux_loss == 0.0


def _scaling_up_commands(prefix):
  """The README's "Scaling up" shell lines starting with `prefix`, continuations joined."""
  section = README.read_text().split("## Scaling up", 1)[1].split("\n## ", 1)[0]
  text = "\n".join(re.findall(r"```\n(.*?)```", section, re.S)).replace("\\\n", " ")
  return [line for line in text.splitlines() if line.startswith(prefix)]


def test_readme_tpu_pod_commands_run_in_dry_run_mode():
  import os
  import shlex
  import subprocess
  root = README.parent
  (exports,) = _scaling_up_commands("export PROJECT=")
  env = dict(os.environ)
  env.update(pair.split("=", 1) for pair in shlex.split(exports)[1:])
  commands = _scaling_up_commands("tpu_scripts/tpu_pod.sh")
  assert {shlex.split(c, comments=True)[1] for c in commands} >= {"create", "setup", "data", "launch", "logs",
                                                   "stop", "delete"}
  for command in commands:
    argv = shlex.split(command, comments=True) + ["--dry-run"]
    out = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{command}\n{out.stderr}"
    assert "gcloud" in out.stdout, f"{command} printed no gcloud command:\n{out.stdout}"
