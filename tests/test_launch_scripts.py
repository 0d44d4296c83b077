"""TPU pod and GPU multi-host launch scripts: valid bash, and every config they name exists."""
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "tpu_scripts").glob("*.sh"))


def test_scripts_exist():
  names = {p.name for p in SCRIPTS}
  assert {"create_tpu.sh", "setup_tpu.sh", "launch_tpu.sh", "teardown_tpu.sh",
          "gpu_multihost.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_named_gin_files_exist(script):
  for path in re.findall(r"configs/[\w/]+\.gin", script.read_text()):
    assert (ROOT / path).is_file(), f"{script.name} names {path}, which does not exist"


def test_gpu_script_requires_a_model_dir():
  out = subprocess.run(["bash", str(ROOT / "tpu_scripts" / "gpu_multihost.sh")],
                       capture_output=True, text=True)
  assert out.returncode != 0
  assert "usage: gpu_multihost.sh MODEL_DIR" in out.stderr
