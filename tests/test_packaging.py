"""A non-editable install carries every gin config, and the CLI finds them without a checkout.

`configs/` stays at the top of the repository and is installed as the package `hashmoe.configs`
(setup.py's package_dir mapping). The test builds the wheel `pip install .` would install, checks
that it holds exactly the repository's gin files, unpacks it into a folder that is not a checkout
and asks a fresh interpreter where the configs are and to resolve an include chain from them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("wheel")
  # Built from a copy of the checkout's files (tracked, or new and not ignored): setuptools reuses a
  # checkout's build/ folder, whose stale copies of deleted configs would otherwise land in the wheel.
  source = tmp_path_factory.mktemp("source")
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
  for name in filter(None, listed):
    if (ROOT / name).is_file():
      (source / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, source / name)
  # --no-build-isolation: the build uses this environment's setuptools (no index access).
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(out), str(source)], check=True, capture_output=True, text=True)
  wheels = list(out.glob("hashmoe-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def test_wheel_holds_every_gin_file(wheel):
  expected = {"hashmoe/configs/" + p.relative_to(ROOT / "configs").as_posix()
              for p in (ROOT / "configs").rglob("*.gin")}
  assert len(expected) > 30
  names = set(zipfile.ZipFile(wheel).namelist())
  assert expected <= names, sorted(expected - names)
  assert {n for n in names if n.endswith(".gin")} == expected


def test_installed_cli_finds_configs_without_a_checkout(wheel, tmp_path):
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  env = {k: v for k, v in os.environ.items() if k not in ("HASHMOE_CONFIGS", "PYTHONPATH")}
  env["PYTHONPATH"] = str(site)
  code = (
      "import gin\n"
      "from hashmoe import cli\n"
      "print(cli.configs_dir())\n"
      # A run config whose includes (model, task) must resolve inside the installed package; the
      # docs' configs/-prefixed spelling too.
      "cli.parse_gin(['configs/runs/cpu_tiny.gin'], [\"MODEL_DIR = '/nonexistent'\"])\n"
      "print(gin.query_parameter('%TRAIN_STEPS'))\n")
  run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  assert lines[0] == str(site / "hashmoe" / "configs")
  assert int(lines[1]) > 0
