"""One process at a time per workdir, and resumes that cannot fit refused before any write."""

import hashlib
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config

from gan import trainer, workdir_lock
from gan.errors import UserError


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
  first = rf"in use by a trainer \(pid {os.getpid()} on "
  with (
    workdir_lock.hold(str(tmp_path), "a trainer"),
    pytest.raises(UserError, match=first),
    workdir_lock.hold(str(tmp_path), "a rollback by hand"),
  ):
    pass
  with workdir_lock.hold(str(tmp_path), "a rollback by hand"):  # free again once released
    pass


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\nfrom gan import workdir_lock\n"
      "with workdir_lock.hold(sys.argv[1], 'a trainer'):\n  print('held', flush=True)\n"
      "  time.sleep(600)",
      str(tmp_path),
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert holder.stdout.readline().strip() == "held"
  with (
    pytest.raises(UserError, match=f"pid {holder.pid}"),
    workdir_lock.hold(str(tmp_path), "a trainer"),
  ):
    pass
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=60)
  with workdir_lock.hold(str(tmp_path), "a trainer"):
    pass


@pytest.mark.slow
def test_a_trainer_is_refused_while_another_holds_the_workdir(workdir):
  os.makedirs(workdir)
  with workdir_lock.hold(workdir, "a trainer"), pytest.raises(UserError, match="in use by"):
    trainer.train_and_evaluate(tiny_config("dense", train__num_steps=2), workdir)


def _digests(directory: str) -> dict[str, str]:
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      if name not in ("train.log", workdir_lock.LOCK_FILE):  # the log and the holder's name
        with open(path, "rb") as f:
          digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.mark.slow
@pytest.mark.parametrize(
  "changes, named",
  [
    ({"model__g_widths": (64,)}, "model.g_widths"),
    ({"data__resolution": 16}, "data.resolution"),
  ],
)
def test_a_resume_with_other_networks_is_refused_and_writes_nothing(workdir, changes, named):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=2), workdir)
  before = _digests(workdir)
  with pytest.raises(UserError, match=rf"other networks than this config's \({named}"):
    trainer.train_and_evaluate(tiny_config("dense", **changes), workdir)
  assert _digests(workdir) == before
