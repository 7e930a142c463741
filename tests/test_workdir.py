"""One process at a time per workdir, and resumes that cannot fit refused before any write."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

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


def _read(workdir: str, name: str) -> str:
  with open(os.path.join(workdir, name)) as f:
    return f.read()


def test_a_resume_with_other_settings_keeps_the_previous_config_under_its_step(tmp_path):
  workdir = str(tmp_path)
  first, second, third = (tiny_config("dense", train__g_lr=rate) for rate in (1e-4, 2e-4, 3e-4))
  trainer._write_config(workdir, first, 0)
  trainer._write_config(workdir, second, 0)  # a fresh start: nothing trained with `first` is kept
  kept = _read(workdir, "config.json")
  # A resume with the same settings: nothing to keep, nothing changed.
  assert trainer._write_config(workdir, second, 4) == []
  assert sorted(os.listdir(workdir)) == ["config.json"]

  assert trainer._write_config(workdir, third, 4) == ["train.g_lr 0.0002 -> 0.0003"]
  assert _read(workdir, "config.4.json") == kept
  trainer._write_config(workdir, first, 4)  # another resume from step 4, other settings again
  assert json.loads(_read(workdir, "config.4-2.json"))["train"]["g_lr"] == 3e-4
  assert json.loads(_read(workdir, "config.json"))["train"]["g_lr"] == 1e-4
  assert sorted(os.listdir(workdir)) == ["config.4-2.json", "config.4.json", "config.json"]


@pytest.mark.slow
def test_resuming_with_a_changed_learning_rate_keeps_the_old_config_json(workdir):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=2), workdir)
  before = _read(workdir, "config.json")
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=4, train__g_lr=1e-5), workdir)
  assert _read(workdir, "config.2.json") == before
  assert json.loads(_read(workdir, "config.json"))["train"]["g_lr"] == 1e-5
  # TensorBoard's Text tab shows the new settings where they began, the changes first.
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  texts = {
    e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors("config")
  }
  assert sorted(texts) == [0, 2]
  assert texts[2].startswith(
    "Settings changed on resuming from step 2: train.g_lr 0.0002 -> 1e-05;"
  )
  assert "train.num_steps 2 -> 4" in texts[2] and "| `train.g_lr` | `1e-05` |" in texts[2]
