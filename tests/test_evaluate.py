"""Quality metrics during training, the best-checkpoint policy, and scripts/evaluate.py."""

import json
import os

import pytest
from conftest import run_script, tiny_config

from gan import checkpointing, trainer
from gan import state as state_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config("dense", train__num_steps=4)
  config.eval.num_samples = 16
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_every_checkpoint_stores_the_quality_metrics(run):
  ckpt = checkpointing.Checkpointer(os.path.join(run, "checkpoints"))
  for step in ckpt.all_steps():
    metrics = ckpt.metrics(step)
    assert {"eval/swd_mean", "eval/precision", "eval/recall"} <= set(metrics), step
    assert 0 <= metrics["eval/precision"] <= 1 and metrics["eval/swd_mean"] > 0


def test_policy_keeps_the_best_checkpoint_by_the_chosen_metric(tmp_path):
  config = tiny_config("dense")
  config.checkpoint.keep_latest = 1
  _, state = state_lib.create_train_state(config)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
  for step, swd in [(2, 50.0), (4, 10.0), (6, 30.0), (8, 40.0)]:
    ckpt.save(step, state, {"eval/swd_mean": swd})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8]


@pytest.mark.slow
def test_evaluate_prints_the_weight_free_metrics_as_json(run):
  result = run_script("evaluate.py", f"--workdir={run}", "--num_samples=16")
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads(result.stdout)
  assert scores["step"] == 4 and scores["num_samples"] == 16
  assert scores["swd_mean"] > 0 and 0 <= scores["recall"] <= 1


@pytest.mark.slow
def test_evaluate_asked_for_fid_without_weights_says_where_to_get_them(run, tmp_path):
  result = run_script(
    "evaluate.py",
    f"--workdir={run}",
    "--metrics=fid",
    "--num_samples=16",
    env={"GAN_INCEPTION_WEIGHTS": str(tmp_path / "missing.npz")},
  )
  assert result.returncode == 2
  assert "pt_inception-2015-12-05" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_an_unknown_step_lists_the_saved_ones(run):
  result = run_script("evaluate.py", f"--workdir={run}", "--step=3")
  assert result.returncode == 2
  assert "saved steps: 2, 4" in result.stderr
