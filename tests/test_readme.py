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
