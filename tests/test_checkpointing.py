"""Checkpoints are real Orbax checkpoints of the whole TrainState."""

import os

import numpy as np
import pytest
from conftest import plain_leaves, tiny_config

from gan import checkpointing
from gan import state as state_lib
from gan.errors import UserError


def _checkpointer(directory, **overrides):
  config = tiny_config("dense").checkpoint
  for key, value in overrides.items():
    config[key] = value
  return checkpointing.Checkpointer(directory, config)


def _saved(tmp_path, steps, **overrides):
  config = tiny_config("dense")
  _, state = state_lib.create_train_state(config)
  ckpt = _checkpointer(str(tmp_path / "checkpoints"), **overrides)
  for step in steps:
    ckpt.save(step, state.replace(step=np.int32(step)), {"d_loss": step / 10})
  ckpt.wait()
  return ckpt, state


def test_restore_gives_back_the_saved_state_and_its_metrics(tmp_path):
  ckpt, state = _saved(tmp_path, [2])
  restored = ckpt.restore(2, state_lib.abstract(state))
  for a, b in zip(plain_leaves(restored), plain_leaves(state.replace(step=2)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ckpt.metrics(2) == {"d_loss": pytest.approx(0.2)}


def test_policy_keeps_the_latest_few_and_the_periodic_ones(tmp_path):
  ckpt, _ = _saved(tmp_path, range(10, 110, 10), keep_latest=2, keep_every=40)
  assert ckpt.all_steps() == [40, 80, 90, 100]


def test_restoring_an_unknown_step_lists_the_saved_ones(tmp_path):
  ckpt, state = _saved(tmp_path, [2, 4])
  with pytest.raises(UserError, match="no checkpoint at step 3 .*saved steps: 2, 4"):
    ckpt.restore(3, state)


def test_set_aside_moves_later_checkpoints_without_deleting_them(tmp_path):
  ckpt, _ = _saved(tmp_path, [2, 4, 6], keep_latest=5)
  assert ckpt.set_aside_after(2) == [4, 6]
  assert ckpt.all_steps() == [2]
  (aside,) = os.listdir(tmp_path / checkpointing.ASIDE_DIR)
  assert sorted(os.listdir(tmp_path / checkpointing.ASIDE_DIR / aside)) == ["4", "6"]
