"""The scripts' shared wrapper: what it keeps off the user's terminal and what it lets through."""

import asyncio
import gc
import logging
import subprocess
import sys
import types

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


def _collected_unraisables(coroutine_function) -> list:
  """What reaches the scripts' sys.unraisablehook when a suspended coroutine of this function,
  which raises on being closed (as Orbax's pending reads do), is collected."""
  reached = []
  before = sys.unraisablehook
  sys.unraisablehook = cli._unraisable(reached.append)
  try:
    coroutine = coroutine_function()
    coroutine.send(None)  # suspended at its await
    del coroutine
    gc.collect()
  finally:
    sys.unraisablehook = before
  return reached


class _Pending:
  def __await__(self):
    yield


async def _read_array_index_and_device_put():  # the name of Orbax's read
  try:
    await _Pending()
  except GeneratorExit as e:
    raise Exception("Encountered error while reading array index") from e


async def _some_other_read():
  try:
    await _Pending()
  except GeneratorExit as e:
    raise Exception("an error of ours") from e


def test_tfds_warning_that_a_dataset_is_not_prepared_yet_is_dropped_and_its_others_kept(tmp_path):
  import tensorflow_datasets as tfds
  from absl import logging as absl_logging

  records = []
  handler = logging.Handler()
  handler.emit = records.append
  handler.addFilter(cli._NotYetPrepared())
  absl_logging.get_absl_logger().addHandler(handler)
  try:
    for version in ("1.0.0", "latest"):  # not prepared yet; not a version at all
      tfds.core.utils.file_utils.is_valid_variant_dir(tmp_path / "anime_faces" / version)
  finally:
    absl_logging.get_absl_logger().removeHandler(handler)
  (kept,) = [r.getMessage() for r in records]
  assert kept.endswith("has invalid version latest")


def test_orbax_leftovers_are_dropped_and_other_unraisables_reach_the_hook():
  assert _collected_unraisables(_read_array_index_and_device_put) == []
  (other,) = _collected_unraisables(_some_other_read)
  assert str(other.exc_value) == "an error of ours"
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
  assert cli.is_orbax_leftover(closed)
  assert not cli.is_orbax_leftover(types.SimpleNamespace(exc_value=RuntimeError("x"), object=None))


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


# A script whose Ctrl-C lands in a garbage-collection callback, where Python ignores errors.
_CTRL_C_IN_GC = """
import gc, signal, time
from gan import cli

def main(argv):
  def callback(phase, info):
    gc.callbacks.remove(callback)
    signal.default_int_handler(signal.SIGINT, None)  # what Ctrl-C does, here
  gc.callbacks.append(callback)
  gc.collect()
  time.sleep(0.5)
  print("went on")

cli.run(main)
"""


@pytest.mark.slow
def test_ctrl_c_that_lands_in_a_garbage_collection_callback_still_stops_the_script():
  ran = subprocess.run(
    [sys.executable, "-c", _CTRL_C_IN_GC], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert ran.returncode == 2, ran.stderr
  assert ran.stderr.strip().splitlines()[-1].startswith("error: interrupted"), ran.stderr
  assert "went on" not in ran.stdout


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
