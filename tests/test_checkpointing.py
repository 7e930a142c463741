"""Checkpoints are real Orbax checkpoints of the whole TrainState."""

import os

import jax
import jax.numpy as jnp
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
  assert ckpt.metrics(2) == {
    "d_loss": pytest.approx(0.2),
    checkpointing.CHECKSUM_METRIC: checkpointing.state_checksum(state.replace(step=np.int32(2))),
  }


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


def _data_files(directory, step):
  """The data files of a saved checkpoint, largest first."""
  data = os.path.join(directory, str(step), "default", "ocdbt.process_0", "d")
  paths = [os.path.join(data, name) for name in os.listdir(data)]
  return sorted(paths, key=os.path.getsize, reverse=True)


def _flip_bytes(path):
  """Overwrites 8 bytes in the middle of `path`, as a failing disk would."""
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xa5" * 8)


def test_a_checkpoint_whose_metrics_cannot_be_read_is_left_out_and_set_aside(tmp_path, caplog):
  _, state = _saved(tmp_path, [2, 4, 6], keep_latest=5)
  directory = str(tmp_path / "checkpoints")
  open(os.path.join(directory, "4", "metrics", "metrics"), "w").close()  # `: > .../metrics`

  ckpt = checkpointing.Checkpointer(directory)
  assert ckpt.all_steps() == [2, 6]
  assert list(ckpt.damaged()) == [4]
  assert "Skipping the checkpoint of step 4: it is damaged, its metrics cannot be read" in (
    caplog.text
  )
  assert int(ckpt.restore(6, state_lib.abstract(state)).step) == 6
  with pytest.raises(UserError, match=r"saved steps: 2, 6 \(damaged: 4\)"):
    ckpt.require(4)
  assert ckpt.set_aside_after(2) == [4, 6]
  assert (ckpt.all_steps(), ckpt.damaged()) == ([2], {})


def test_a_checkpoint_whose_bytes_changed_on_disk_fails_its_checksum(tmp_path, caplog):
  ckpt, state = _saved(tmp_path, [2, 4], keep_latest=5)
  _flip_bytes(_data_files(ckpt.directory, 4)[0])

  with pytest.raises(
    checkpointing.DamagedCheckpoint, match="step 4 .* does not match the checksum"
  ):
    ckpt.restore(4, state_lib.abstract(state))
  step, restored = ckpt.restore_first([4, 2], state_lib.abstract(state))
  assert (step, int(restored.step)) == (2, 2)
  assert "Skipping the checkpoint of step 4: it is damaged: its state does not match" in caplog.text
  assert ckpt.all_steps() == [2]


def test_the_checksum_changes_with_any_value_of_any_array():
  _, state = state_lib.create_train_state(tiny_config("dense"))
  before = checkpointing.state_checksum(state)
  leaves, treedef = jax.tree.flatten(state)
  assert checkpointing.state_checksum(jax.tree.unflatten(treedef, leaves)) == before
  floating = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floating) > 10
  for i in floating:
    changed = list(leaves)
    changed[i] = leaves[i].ravel().at[-1].add(1.0).reshape(leaves[i].shape)
    assert checkpointing.state_checksum(jax.tree.unflatten(treedef, changed)) != before, i


@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_best_checkpoint_is_kept_and_a_nan_metric_is_never_best(tmp_path, mode):
  config = tiny_config("dense")
  _, state = state_lib.create_train_state(config)
  ckpt = _checkpointer(
    str(tmp_path / "checkpoints"), keep_latest=1, best_metric="fid", best_mode=mode
  )
  values = {1: 5.0, 2: 2.0, 3: float("nan"), 4: 4.0, 5: 8.0, 6: 3.0}
  for step, value in values.items():
    ckpt.save(step, state.replace(step=np.int32(step)), {"eval/fid": value})
  ckpt.wait()
  best = 2 if mode == "min" else 5
  assert ckpt.all_steps() == sorted({best, 6})


@pytest.mark.parametrize(("generator", "best"), [("ema", 2), ("raw", 4)])
def test_the_best_checkpoint_is_ranked_by_the_chosen_generators_scores(tmp_path, generator, best):
  _, state = state_lib.create_train_state(tiny_config("dense"))
  ckpt = _checkpointer(
    str(tmp_path / "checkpoints"), keep_latest=1, best_metric="swd_mean", best_generator=generator
  )
  ema = {1: 5.0, 2: 2.0, 3: 4.0, 4: 6.0, 5: 7.0}
  raw = {1: 5.0, 2: 6.0, 3: 4.0, 4: 1.0, 5: 3.0}
  for step in ema:
    metrics = {"eval/swd_mean": ema[step], "eval_raw/swd_mean": raw[step]}
    ckpt.save(step, state.replace(step=np.int32(step)), metrics)
  ckpt.wait()
  assert ckpt.all_steps() == [best, 5]
