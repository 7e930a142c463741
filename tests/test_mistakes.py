"""Each mistake a user can make around a workdir ends in one line and exit 2, losing nothing:
a nonsense config.json, a workdir that is a file, one that cannot be written, a disk that fills
while a sample grid or the events are written, Ctrl-C while the run starts."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import NO_SHARED_CACHE, ROOT, read_until, run_script, start_script
from test_reliability import _LIMITED  # a script run with files limited, as on a full disk

from gan import checkpointing, inference
from gan.errors import UserError

_SMOKE = ("--config=configs/dense.py:smoke", "--config.train.num_steps=20")


def _one_line(result: subprocess.CompletedProcess, *words: str) -> str:
  """The error line, checked to be the only one, the last one and to hold `words`."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert line == result.stderr.strip().splitlines()[-1]
  for word in words:
    assert word in line, line
  return line


@pytest.mark.parametrize("content", ["hello", "[1, 2]", "{}", '{"model": 3, "data": {}}'])
def test_a_config_json_that_is_no_runs_config_is_named(content, tmp_path):
  (tmp_path / "config.json").write_text(content)
  with pytest.raises(UserError, match=r"config\.json"):
    inference.read_config(str(tmp_path))


@pytest.mark.slow
def test_a_nonsense_config_json_stops_training_and_sampling_in_one_line(workdir):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write('{"train": ')
  _one_line(run_script("train.py", *_SMOKE, f"--workdir={workdir}"), "config.json")
  out = os.path.join(workdir, "samples.png")
  _one_line(run_script("sample.py", f"--workdir={workdir}", f"--out={out}"), "config.json")
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == '{"train": '  # left for the user to look at


@pytest.mark.slow
def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  _one_line(run_script("train.py", *_SMOKE, f"--workdir={path}"), str(path), "is a file")
  assert path.read_text() == "mine"


def _train_limited(limit: int, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _LIMITED, str(limit), os.path.join(ROOT, "scripts", "train.py"), *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_a_disk_that_fills_while_a_sample_grid_is_written_is_one_line(workdir):
  flags = (*_SMOKE, f"--workdir={workdir}", "--config.eval.every=10", "--config.eval.grid_size=64")
  # The grid of 64 faces is the largest file a run writes outside its checkpoints.
  full = _train_limited(40_000, *flags, "--config.checkpoint.every=10")
  _one_line(full, "File too large")
  assert not os.listdir(os.path.join(workdir, "samples"))


def _start_training(workdir: str, env=None) -> subprocess.Popen:
  return start_script("train.py", *_SMOKE, f"--workdir={workdir}", env=env)


@pytest.mark.slow
def test_ctrl_c_while_the_run_starts_saves_nothing_and_exits_cleanly(workdir):
  process = _start_training(workdir)
  read_until(process, "Compiling the train step")
  process.send_signal(signal.SIGINT)
  rest = process.stderr.read()
  assert process.wait(timeout=120) == 0, rest[-3000:]
  assert "Stopped by SIGINT during start-up" in rest
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == []


@pytest.mark.slow
def test_ctrl_c_before_the_trainer_runs_is_one_line(workdir):
  process = _start_training(workdir, env=NO_SHARED_CACHE)  # the interrupt may land in a write
  time.sleep(1.0)  # the script is importing its libraries
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
  _one_line(result, "interrupted")
  assert not os.path.exists(workdir)


def _read_only(workdir: str) -> list[str] | None:
  """A command prefix that runs a command with `workdir` read-only: a read-only bind mount in
  a user namespace (the real thing, which stops root too), else, for a user other than root,
  permissions; None where neither works here."""
  mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
  probe = (
    subprocess.run(["unshare", "-rm", "sh", "-c", mount, workdir, "true"], capture_output=True)
    if shutil.which("unshare")
    else None
  )
  if probe is not None and probe.returncode == 0:
    return ["unshare", "-rm", "sh", "-c", mount, workdir]
  if os.getuid() != 0:
    for root, folders, files in os.walk(workdir):
      for name in files:
        os.chmod(os.path.join(root, name), 0o444)
      for name in folders:
        os.chmod(os.path.join(root, name), 0o555)
    os.chmod(workdir, 0o555)
    return []
  return None


@pytest.mark.slow
def test_a_workdir_that_cannot_be_written_is_one_line_and_keeps_its_run(workdir):
  first = run_script("train.py", *_SMOKE, f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-2000:]
  before = _digests(workdir)
  prefix = _read_only(workdir)
  if prefix is None:
    pytest.skip("no way to make a folder read-only for root here (no user namespaces)")
  again = subprocess.run(
    [
      *prefix,
      sys.executable,
      os.path.join(ROOT, "scripts", "train.py"),
      *_SMOKE,
      "--config.train.num_steps=40",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  _one_line(again, workdir)
  assert "Read-only file system" in again.stderr or "Permission denied" in again.stderr
  assert _digests(workdir) == before


def _digests(directory: str) -> dict[str, str]:
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        digests[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(
          f.read()
        ).hexdigest()
  return digests
