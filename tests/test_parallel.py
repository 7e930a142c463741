"""Data parallelism: 8 emulated CPU devices compute what 1 does, checkpoints move between device
counts, and two processes on this machine train as one with jax.distributed."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, plain_leaves, run_script

from gan import checkpointing, inference, parallel, rollback
from gan import state as state_lib
from gan.errors import UserError
from gan.health import verdict

# Runs in a fresh Python that sees 8 CPU devices; prints one JSON line of results.
_ON_EIGHT_DEVICES = """
import json, sys
import jax, numpy as np
from conftest import plain_leaves, tiny_config
from gan import trainer
from gan.errors import UserError

workdir = sys.argv[1]

def run(name, devices, steps):
  config = tiny_config("dcgan", train__num_steps=steps, mesh__data_axis_size=devices)
  config.eval.metrics = ()  # the state is compared, not the quality metrics
  return trainer.train_and_evaluate(config, f"{workdir}/{name}")

def gap(a, b):
  pairs = zip(plain_leaves(a), plain_leaves(b), strict=True)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in pairs)

# Four steps: GAN training amplifies float rounding (Adam divides tiny gradients by their own
# scale), so longer runs drift apart by more than rounding even when every step is right.
one, eight = run("one", 1, 4), run("eight", 8, 4)
sharding = plain_leaves(eight)[1].sharding
results = {
  "devices": len(jax.devices()),
  "state_devices": len(sharding.device_set),
  "eight_vs_one": gap(one, eight),
}
run("two_then_one", 8, 2)
run("one_then_eight", 1, 2)
results["saved_on_eight_resumed_on_one"] = gap(one, run("two_then_one", 1, 4))
results["saved_on_one_resumed_on_eight"] = gap(one, run("one_then_eight", 8, 4))
try:
  trainer.train_and_evaluate(tiny_config("dcgan", train__batch_size=12), f"{workdir}/uneven")
except UserError as e:
  results["uneven_error"] = str(e)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_eight_devices_match_one_and_checkpoints_move_between_them(tmp_path):
  result = subprocess.run(
    [sys.executable, "-c", _ON_EIGHT_DEVICES, str(tmp_path)],
    cwd=os.path.join(ROOT, "tests"),
    env={
      **os.environ,
      "PYTHONPATH": ROOT,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    },
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(result.stdout.strip().splitlines()[-1])
  assert results["devices"] == results["state_devices"] == 8
  # The same global batch of 8: one image per device against all 8 on one device, with
  # BatchNorm over the whole batch; only the order of float sums differs.
  assert results["eight_vs_one"] < 1e-5
  assert results["saved_on_eight_resumed_on_one"] < 1e-5
  assert results["saved_on_one_resumed_on_eight"] < 1e-5
  assert "batch_size 12 does not split over the 8 devices" in results["uneven_error"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


_TINY = [
  "--config=configs/dense.py:smoke",
  "--config.train.batch_size=8",
  "--config.data.num_examples=128",
  "--config.model.g_widths=(32,)",
  "--config.model.d_widths=(32,)",
  "--config.train.log_every=2",
  "--config.checkpoint.every=4",
  "--config.eval.every=4",
  "--config.eval.metrics=()",
]


def _two_processes(workdir: str, num_steps: int, *flags: str) -> list[subprocess.CompletedProcess]:
  """Trains as 2 processes of 2 CPU devices each, coordinated over localhost."""
  port = _free_port()
  script = os.path.join(ROOT, "scripts", "train.py")
  children = [
    subprocess.Popen(
      [
        sys.executable,
        script,
        *_TINY,
        f"--workdir={workdir}",
        f"--config.train.num_steps={num_steps}",
        *flags,
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=ROOT,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  results = []
  for child in children:
    stdout, stderr = child.communicate(timeout=600)
    results.append(subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr))
  return results


# Only a non-finite value is out of bounds, from step 0 (as in test_collapse).
_JUDGE_ONLY_NON_FINITE = [
  "--config.collapse.warmup_steps=0",
  "--config.collapse.max_ms_ssim_gap=1.0",
  "--config.collapse.max_duplicate_rate=1.0",
  "--config.collapse.min_mode_coverage=0.0",
  "--config.collapse.max_ndb_fraction=1.0",
]


@pytest.fixture(scope="module")
def four_steps_on_two(tmp_path_factory):
  """A run's first 4 steps as 2 processes; each test goes on from a copy of it."""
  workdir = str(tmp_path_factory.mktemp("parallel") / "two")
  processes = _two_processes(workdir, 4, *_JUDGE_ONLY_NON_FINITE)
  return workdir, processes


def _copy(run, tmp_path) -> str:
  source, processes = run
  for process in processes:
    assert process.returncode == 0, process.stderr[-3000:]
  workdir = str(tmp_path / "two")
  shutil.copytree(source, workdir)
  return workdir


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # goes on from the shared start: one worker
def test_two_processes_train_as_one_write_one_set_of_logs_and_resume(four_steps_on_two, tmp_path):
  workdir = _copy(four_steps_on_two, tmp_path)
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 1
  assert os.listdir(os.path.join(workdir, "samples")) == ["step_0000004.png"]
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [4]

  first, second = _two_processes(workdir, 8, *_JUDGE_ONLY_NON_FINITE)
  assert first.returncode == second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
  assert "Restored the checkpoint of step 4" in first.stderr  # process 0 reports for both
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [4, 8]
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 2  # one per run

  # The same run on one process, one device: the same global batches, the same result.
  single = run_script(
    "train.py",
    *_TINY,
    *_JUDGE_ONLY_NON_FINITE,
    f"--workdir={tmp_path / 'one'}",
    "--config.train.num_steps=8",
  )
  assert single.returncode == 0, single.stderr[-3000:]
  assert _gap(str(tmp_path / "one"), workdir) < 1e-4


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")
def test_two_processes_roll_back_together(four_steps_on_two, tmp_path):
  workdir = _copy(four_steps_on_two, tmp_path)
  # A checkpoint at step 5 whose learning rates make the next step non-finite (as in
  # test_collapse), written here on one device: checkpoints move between device counts.
  config, _, _ = inference.load_run(workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  _, template = state_lib.create_train_state(config)
  state = ckpt.restore(4, template).replace(step=jax.numpy.int32(5))
  suspect = {verdict.VERDICT_METRIC: verdict.VERDICTS.index("suspect")}
  ckpt.save(5, state_lib.with_hyperparams(state, learning_rate=(1e30, 1e30)), suspect)
  ckpt.wait()
  ckpt.close()

  first, second = _two_processes(workdir, 8, *_JUDGE_ONLY_NON_FINITE)
  assert first.returncode == second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
  with open(os.path.join(workdir, rollback.ROLLBACKS_FILE)) as f:
    (event,) = [json.loads(line) for line in f]  # one rollback, written once for both
  assert (event["from_step"], event["to_step"]) == (6, 4) and "non-finite" in event["reason"]
  _, _, final = inference.load_run(workdir)
  assert int(final.step) == 8
  assert all(np.isfinite(np.asarray(x)).all() for x in plain_leaves(final))
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()[-1] == 8


def _gap(workdir_a: str, workdir_b: str) -> float:
  _, _, a = inference.load_run(workdir_a)
  _, _, b = inference.load_run(workdir_b)
  pairs = zip(plain_leaves(a), plain_leaves(b), strict=True)
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs
  )


@pytest.mark.parametrize("size", [-1, len(jax.devices()) + 1])
def test_a_mesh_larger_than_the_devices_is_one_clear_error(size):
  with pytest.raises(UserError, match=f"mesh.data_axis_size is {size} but"):
    parallel.create_mesh(size)
