"""Whole runs: the smoke configs through the real script, restarts, and user mistakes."""

import glob
import importlib
import json
import os
import signal
import sys

import numpy as np
import pytest
from conftest import ROOT, plain_leaves, read_until, run_script, start_script, tiny_config
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from gan import config as config_lib
from gan import inference, models, trainer
from gan.errors import UserError


def _events(workdir):
  """TensorBoard's own reader over the run's event files: {tag: [(step, value)]}."""
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  return {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}


def _saved_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "dense"])
def test_smoke_config_leaves_checkpoints_events_and_samples(family, workdir):
  # DCGAN with XLA's convolutions where no C++ compiler can be found; dense as `auto` picks.
  args, env = [], {}
  if family == "dcgan":
    args, env = ["--config.model.conv_impl=xla"], {"CXX": "/nonexistent", "CC": "/nonexistent"}
    env["PATH"] = os.path.dirname(sys.executable)  # the venv's scripts only: no g++ or cc
  result = run_script(
    "train.py", f"--config=configs/{family}.py:smoke", f"--workdir={workdir}", *args, env=env
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  # The implementation that computed the run, never 'auto'.
  expected = "xla" if family == "dcgan" else models.resolve_conv_impl("auto", "float32")
  assert config["model"]["conv_impl"] == expected
  num_steps = config["train"]["num_steps"]
  assert _saved_steps(workdir)[-1] == num_steps

  events = _events(workdir)
  for tag in [
    "1_train/d_loss",
    "1_train/g_loss",
    "1_train/d_real",
    "1_train/d_fake",
    "1_train/g_grad_norm",
    "1_train/d_param_norm",
    "1_train/g_lr",
    "1_train/images_per_second",
    "eval/swd_mean",
    "eval_raw/swd_mean",
    "health/ms_ssim",
    "health/modes_covered",
    "health/verdict",
  ]:
    assert events[tag][-1].step == num_steps, tag
    value = float(np.asarray(tensor_util.make_ndarray(events[tag][-1].tensor_proto)))
    assert np.isfinite(value), tag
  assert [e.step for e in events["config"]] == [0]  # the Text tab's config, once
  grid_events = events["samples"]
  assert grid_events[-1].step == num_steps
  encoded = tensor_util.make_ndarray(grid_events[-1].tensor_proto)
  width, height = int(encoded[0]), int(encoded[1])  # the image plugin stores [w, h, png...]
  assert width > config["data"]["resolution"] and height > config["data"]["resolution"]

  pngs = sorted(glob.glob(os.path.join(workdir, "samples", "step_*.png")))
  assert os.path.basename(pngs[-1]) == f"step_{num_steps:07d}.png"
  assert "step" in result.stderr and "img/s" in result.stderr and "ETA" in result.stderr


@pytest.mark.slow
def test_restart_resumes_where_the_last_run_stopped_and_matches_an_unbroken_run(tmp_path):
  broken, unbroken = str(tmp_path / "broken"), str(tmp_path / "unbroken")
  trainer.train_and_evaluate(tiny_config("dcgan", train__num_steps=2), broken)
  assert _saved_steps(broken) == [2]
  resumed = trainer.train_and_evaluate(tiny_config("dcgan", train__num_steps=4), broken)
  assert _saved_steps(broken) == [2, 4]
  straight = trainer.train_and_evaluate(tiny_config("dcgan", train__num_steps=4), unbroken)
  for a, b in zip(plain_leaves(resumed), plain_leaves(straight), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_restore_step_starts_from_an_earlier_checkpoint(workdir):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=6), workdir)
  assert _saved_steps(workdir) == [2, 4, 6]
  config = tiny_config("dense", train__num_steps=6)
  config.restore_step = 2
  trainer.train_and_evaluate(config, workdir)
  assert _saved_steps(workdir) == [2, 4, 6]
  assert glob.glob(os.path.join(workdir, "checkpoints_aside", "*", "4"))


@pytest.mark.slow
def test_restore_step_that_was_never_saved_is_one_clear_error(workdir):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=2), workdir)
  config = tiny_config("dense")
  config.restore_step = 3
  with pytest.raises(UserError, match="no checkpoint at step 3.*saved steps: 2"):
    trainer.train_and_evaluate(config, workdir)


@pytest.mark.slow
@pytest.mark.parametrize(
  ("flag", "message"),
  [
    ("--config.train.batchsize=3", "batchsize"),
    ("--config.train.batch_size=-1", "train.batch_size must be positive"),
    ("--config.data.source=imagenet", "imagenet"),
    ("--config.model.wobble=3", "model.wobble"),
    ("--config.model=3", "model"),
    ("--config=configs/default.py", "no model section"),
  ],
)
def test_user_mistakes_are_one_line_without_a_traceback(flag, message, workdir):
  result = run_script("train.py", "--config=configs/dense.py:smoke", f"--workdir={workdir}", flag)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert message in line and line == result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_termination_signal_saves_after_the_current_step_and_exits_cleanly(sig, workdir):
  process = start_script(
    "train.py",
    "--config=configs/dense.py:smoke",
    f"--workdir={workdir}",
    "--config.train.num_steps=100000",
    "--config.checkpoint.every=1000",
    "--config.eval.every=1000",
  )
  read_until(process, "img/s")  # training has started once a progress line appears
  process.send_signal(sig)
  rest = process.stderr.read()
  assert process.wait(timeout=120) == 0, rest[-2000:]
  assert f"Stopped by {sig.name}" in rest
  (step,) = _saved_steps(workdir)
  assert 0 < step < 100000


@pytest.mark.slow
def test_load_run_gives_back_the_config_and_the_saved_state(workdir):
  final = trainer.train_and_evaluate(tiny_config("dense", train__num_steps=4), workdir)
  config, nets, state = inference.load_run(workdir)
  assert config.model.name == "dense" and nets.latent_dim == config.model.latent_dim
  for a, b in zip(plain_leaves(state), plain_leaves(final), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(inference.load_run(workdir, step=2)[2].step) == 2
  with pytest.raises(UserError, match="no training run"):
    inference.load_run(os.path.join(workdir, "missing"))


# default.py holds the shared settings, not a recipe.
_RECIPES = sorted(
  f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f[0] != "_" and f != "default.py"
)


@pytest.mark.parametrize("name", _RECIPES)
def test_every_recipe_has_a_valid_smoke_run_on_synthetic_faces(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config("smoke")
  config_lib.validate(config)
  assert config.data.source == "synthetic_faces"
  assert config.train.num_steps <= 100
