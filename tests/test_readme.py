"""The README's example is documentation that must keep running."""
import pathlib
import re

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
      namespace["counts"], minlength=namespace["vocab"]))["max_over_mean"] < 1.2


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
