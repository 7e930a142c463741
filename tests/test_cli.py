"""The scripts' shared wrapper: what it keeps off the user's terminal and what it lets through."""

import asyncio
import gc
import logging
import subprocess
import sys

import pytest
from conftest import ROOT, run_script

from gan import cli


@pytest.fixture
def asyncio_records():
  """What asyncio logs through a handler with the scripts' filter."""
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  handler.addFilter(cli._Orphans())
  logger = logging.getLogger("asyncio")
  logger.addHandler(handler)
  yield records
  logger.removeHandler(handler)


def test_failed_writes_nobody_waited_for_are_not_reported_again(asyncio_records):
  async def save():
    loop = asyncio.get_running_loop()
    for _ in range(3):  # as TensorStore fails them: set from outside, no Python traceback
      loop.create_future().set_exception(ValueError("OUT_OF_RANGE: Failed writing"))

  loop = asyncio.new_event_loop()
  loop.run_until_complete(save())
  loop.close()
  gc.collect()
  assert asyncio_records == []


def test_other_asyncio_errors_are_still_reported(asyncio_records):
  loop = asyncio.new_event_loop()
  loop.call_exception_handler({"message": "callback failed", "exception": OSError("disk")})
  loop.close()
  (record,) = asyncio_records
  assert "callback failed" in record.getMessage()


# A script whose main ends as `sys.argv[1]` says, after arranging for interpreter shutdown to
# print to stderr from Python and from below it (as TensorStore's C++ does).
_ENDING = """
import atexit, os, sys
from gan import cli
from gan.errors import UserError

def main(argv):
  atexit.register(lambda: print("late report from Python", file=sys.stderr))
  atexit.register(lambda: os.write(2, b"late report from C++\\\\n"))
  if sys.argv[1] == "error":
    raise UserError("the disk is full")

cli.run(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["error", "success"])
def test_a_user_error_is_the_last_line_whatever_shutdown_prints(ending):
  ran = subprocess.run(
    [sys.executable, "-c", _ENDING, ending], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  if ending == "error":
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines()[-1] == "error: the disk is full", ran.stderr
    assert "late report" not in ran.stderr
  else:  # only an error's line silences what follows it
    assert ran.returncode == 0, ran.stderr
    assert "late report from Python" in ran.stderr and "late report from C++" in ran.stderr
  assert "oneDNN" not in ran.stderr  # TensorFlow's start-up banner (cli.run imports it)


@pytest.mark.slow
@pytest.mark.parametrize(
  "script", ["train.py", "sample.py", "evaluate.py", "checkpoints.py", "benchmark.py"]
)
def test_help_prints_the_usage_and_the_flags_and_exits_zero(script):
  result = run_script(script, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  usage, _, flag_help = result.stdout.partition(f"scripts/{script}:")
  assert f"python scripts/{script}" in usage  # the docstring first
  assert "--workdir" in flag_help or "--config" in flag_help
