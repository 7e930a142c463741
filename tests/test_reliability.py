"""Never lose a run: killed at any moment, or unable to write, the trainer keeps what it saved."""

import errno
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, plain_leaves, read_until, run_script, start_script, tiny_config

from configs import dcgan, dense
from gan import checkpointing, trainer
from gan import state as state_lib

# A run in a child process that can be killed: the tiny dense config, asynchronous saves.
_KILLABLE = """
import sys
from conftest import tiny_config
from gan import trainer
config = tiny_config("dense", **{k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])})
config.checkpoint.asynchronous = True
config.eval.metrics = ()
trainer.train_and_evaluate(config, sys.argv[1])
"""
_SETTINGS = {
  "train__num_steps": 60,  # beyond four kills, each about 1-3 checkpoints on: a run is left
  "checkpoint__every": 4,
  "eval__every": 4,
  "train__log_every": 4,
}


def _start(workdir: str, env: dict) -> subprocess.Popen:
  args = [f"{k}={v}" for k, v in _SETTINGS.items()]
  return subprocess.Popen(
    [sys.executable, "-c", _KILLABLE, workdir, *args],
    cwd=os.path.join(ROOT, "tests"),
    env={**os.environ, "PYTHONPATH": ROOT, **env},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_save(directory: str, step: int, child: subprocess.Popen, finished: bool) -> None:
  """Waits until the save of a step >= `step` has begun (its temporary directory appears) or,
  with `finished`, has ended (the directory has its final name, the step alone)."""
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and child.poll() is None:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    steps = [n if finished else n.split(".")[0] for n in names]
    if any(int(s) >= step for s in steps if s.isdigit()):
      return
    time.sleep(0.01)


def _leaves(state):
  return [np.asarray(x) for x in plain_leaves(jax.device_get(state))]


@pytest.mark.slow
def test_killed_four_times_the_run_resumes_and_ends_bit_for_bit_as_an_unbroken_one(tmp_path):
  workdir = str(tmp_path / "killed")
  cache = str(tmp_path / "xla_cache")  # the children share compiled programs: restarts are quick
  env = {
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    # No size limit, hence no access-time files, which a kill between an entry and its own
    # would leave missing: later writes would then fail (see NO_SHARED_CACHE in conftest).
    "JAX_COMPILATION_CACHE_MAX_SIZE": "-1",
  }
  rng = np.random.default_rng(20)
  progress = []
  for kill in range(4):
    start = progress[-1] if progress else 0
    child = _start(workdir, env)
    # Wait, however loaded the machine, until the save of a step 1-3 checkpoints ahead has begun
    # (every other kill: has ended, so the run moves on), then a random moment more: mid-save,
    # or steps later.
    ahead = start + _SETTINGS["checkpoint__every"] * rng.integers(1, 4)
    _wait_for_save(os.path.join(workdir, "checkpoints"), ahead, child, finished=kill % 2 == 0)
    time.sleep(rng.uniform(0.0, 0.3))
    child.send_signal(signal.SIGKILL)
    child.communicate()
    steps = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
    progress.append(steps[-1] if steps else 0)
  assert len(set(progress)) >= 2, f"the kills did not land at various steps: {progress}"

  finished = _start(workdir, env)
  _, stderr = finished.communicate(timeout=600)
  assert finished.returncode == 0, stderr[-3000:]

  config = tiny_config("dense", **_SETTINGS)
  config.eval.metrics = ()
  unbroken = trainer.train_and_evaluate(config, str(tmp_path / "unbroken"))
  _, template = state_lib.create_train_state(config)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  resumed = ckpt.restore(_SETTINGS["train__num_steps"], template)
  for a, b in zip(_leaves(resumed), _leaves(unbroken), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not [d for d in os.listdir(ckpt.directory) if "tmp" in d]


# Runs a script with files limited to LIMIT bytes: a write past it fails as on a full disk
# (SIGXFSZ ignored, so the write fails rather than the process). It keeps out of the shared
# compilation cache, where a compiled program cut short by the limit would stay, truncated and
# without its access-time file, failing every later process's writes to the cache.
_LIMITED = """
import os, resource, runpy, signal, sys
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_clear_error_and_earlier_ones_stay_good(
  workdir,
):
  # The smoke config's networks, saving and evaluating every 4 steps.
  every = ["--config.checkpoint.every=4", "--config.eval.every=4"]
  flags = [f"--workdir={workdir}", "--config=configs/dcgan.py:smoke", *every]
  first = run_script("train.py", *flags, "--config.train.num_steps=4")
  assert first.returncode == 0, first.stderr[-2000:]
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  _, template = state_lib.create_train_state(dcgan.get_config("smoke"))
  saved = _leaves(ckpt.restore(4, template))

  # Files may not grow past 500 kB: the events and samples fit, the next checkpoint does not.
  more = [*flags, "--config.train.num_steps=8"]
  script = os.path.join(ROOT, "scripts", "train.py")
  full = subprocess.run(
    [sys.executable, "-c", _LIMITED, "500000", script, *more],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )

  assert full.returncode == 2, full.stderr[-3000:]
  assert "Traceback" not in full.stderr, full.stderr[-3000:]
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith("error: could not save a checkpoint") and "File too large" in last
  assert "intact (steps 4)" in last and "resume from step 4" in last
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [4]
  for a, b in zip(_leaves(ckpt.restore(4, template)), saved, strict=True):
    np.testing.assert_array_equal(a, b)

  again = run_script("train.py", *more)
  assert again.returncode == 0, again.stderr[-2000:]
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 8


@pytest.mark.parametrize(
  ("error", "reason"),
  [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system"),
    (ValueError("Failed writing: x: Failed to write 9 bytes [os_error_code='28']"), "No space"),
    (ValueError("Failed to create directory [os_error_code='13']"), "Permission denied"),
    (ValueError("something else\nand more"), "ValueError: something else"),
  ],
)
def test_a_failed_write_is_reported_in_the_operating_system_s_words(error, reason):
  assert checkpointing.write_failure_reason(error).startswith(reason)


# A dense run whose state (about 120 MB with Adam's moments and the EMA) takes a while to save:
# long enough to send a second signal while the stop's save is being written.
_LARGE_STATE = (
  "--config=configs/dense.py:smoke",
  "--config.model.g_widths=(1024,1024)",
  "--config.model.d_widths=(1024,1024)",
  "--config.train.num_steps=100000",
  "--config.checkpoint.every=100000",
  "--config.eval.every=100000",
  "--config.eval.metrics=()",
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_during_the_stop_s_save_neither_cuts_it_short_nor_fails(sig, workdir):
  process = start_script("train.py", f"--workdir={workdir}", *_LARGE_STATE)
  read_until(process, "img/s")  # training has started once a progress line appears
  process.send_signal(sig)
  read_until(process, "Stopped by")  # the stop's save is under way, in the background
  # The same signal again, and again, as an impatient user would, until the save is complete:
  # some land while the trainer waits for it.
  directory = os.path.join(workdir, "checkpoints")
  sent = 0
  while process.poll() is None and any("tmp" in d for d in _listing(directory)):
    process.send_signal(sig)
    sent += 1
    time.sleep(0.01)
  assert sent, "the save was complete before a second signal could be sent"

  rest = process.stderr.read()
  assert process.wait(timeout=300) == 0, rest[-3000:]
  ckpt = checkpointing.Checkpointer(directory)
  (step,) = ckpt.all_steps()
  assert not [d for d in _listing(directory) if "tmp" in d]
  config = dense.get_config("smoke")
  config.model.g_widths = config.model.d_widths = (1024, 1024)
  _, template = state_lib.create_train_state(config)
  assert int(ckpt.restore(step, template).step) == step  # whole: its checksum matches


def _listing(directory: str) -> list[str]:
  return os.listdir(directory) if os.path.isdir(directory) else []
