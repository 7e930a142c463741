"""What importing the package does: load the library built at install, compile nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

kernels = pytest.importorskip("gan_cpu_kernels")

_USE = """
import os, numpy as np, jax, gan_cpu_kernels
x = np.ones((1, 4, 4, 2), np.float32)
y = gan_cpu_kernels.conv_k4s2(x, np.ones((4, 4, 2, 3), np.float32))
print(os.environ["OMP_WAIT_POLICY"], float(y.sum()))
"""


def _run(**env) -> str:
  """Imports the package in a fresh process with no C++ compiler to be found, and runs it."""
  environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
  bin_dir = str(Path(sys.executable).parent)
  environment.update(PATH=bin_dir, CXX="/nonexistent", CC="/nonexistent", **env)
  result = subprocess.run(
    [sys.executable, "-c", _USE], env=environment, capture_output=True, text=True, check=True
  )
  return result.stdout.split()


def test_the_library_is_in_the_installed_package():
  assert Path(kernels.__file__).with_name("libgan_cpu_kernels.so").is_file()


@pytest.mark.slow
def test_the_package_runs_with_no_compiler_and_lets_idle_openmp_workers_sleep():
  policy, total = _run()
  assert policy == "PASSIVE"
  # Ones by ones: each of the 2 x 2 x 3 outputs sums a 3 x 3 window of the image (the rest of its
  # 4 x 4 lies in the padding) over 2 channels.
  assert float(total) == 2 * 2 * 3 * (3 * 3 * 2)


@pytest.mark.slow
def test_a_wait_policy_already_set_is_kept():
  assert _run(OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE"
