"""What TensorBoard shows of a run: one TensorBoard run per attempt, none showing a step twice;
the config, the reason of each attempt and each rollback as text; hparams trials named after the
run; the training curves first. Events are read back with TensorBoard's and TensorFlow's own
readers."""

import glob
import os

import pytest
import tensorflow as tf
from conftest import judge_only_non_finite, poison, tiny_config
from tensorboard import plugin_util
from tensorboard.backend.event_processing import event_accumulator, plugin_event_multiplexer
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from gan import checkpointing, monitoring, trainer

_CONFIG = {"model": {"name": "dense", "widths": (32, 64)}, "train": {"g_lr": 2e-4, "seed": 0}}


def _read(logdir):
  """TensorBoard's reader over the event files directly in `logdir` (one TensorBoard run)."""
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
  acc.Reload()
  return acc


def _texts(acc, tag):
  """{step: text} of a text summary."""
  return {
    e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(tag)
  }


def _trial_name(acc):
  """The hparams plugin's session group (what its table calls the trial) of this run."""
  content = acc.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
  return hparams_metadata.parse_session_start_info_plugin_data(content).group_name


def _steps_in_file_order(logdir):
  """Every event's (tag, step) in each TensorBoard run's files, read by TensorFlow's iterator in
  the order TensorBoard reads them (file names sort by creation time)."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      events.extend((value.tag, event.step) for value in event.summary.value)
  return events


def _assert_no_step_goes_back(logdir):
  events = _steps_in_file_order(logdir)
  assert events, logdir
  steps = [step for _, step in events]
  assert steps == sorted(steps), (logdir, steps)
  assert len(set(events)) == len(events), (logdir, events)  # no tag shows a step twice


def _write_scalars(writer, steps):
  for step in steps:
    writer.write_scalars(step, {f"{monitoring.TRAIN}/d_loss": 1.0 / step})
  writer.close()


def test_a_new_run_begins_with_its_config_as_markdown_and_an_hparams_trial_named_after_it(workdir):
  _write_scalars(monitoring.create_writer(workdir, 0, _CONFIG), [2, 4])
  acc = _read(workdir)
  (text,) = _texts(acc, "config").items()
  assert text[0] == 0
  assert "| `train.g_lr` | `0.0002` |" in text[1] and "| `model.widths` | `(32, 64)` |" in text[1]
  html = plugin_util.markdown_to_safe_html(text[1])  # as the Text tab renders it
  assert "<table>" in html and "<code>model.name</code>" in html
  assert _trial_name(acc) == "run"
  assert "attempt" not in acc.Tags()["tensors"]  # a first attempt needs no note


def test_a_resume_with_nothing_to_overlap_carries_on_in_the_same_tensorboard_run(workdir):
  _write_scalars(monitoring.create_writer(workdir, 0, _CONFIG), [2, 4])
  _write_scalars(monitoring.create_writer(workdir, 4, _CONFIG), [6, 8])
  assert monitoring.attempt_dirs(workdir) == [workdir]
  acc = _read(workdir)
  assert [e.step for e in acc.Tensors(f"{monitoring.TRAIN}/d_loss")] == [2, 4, 6, 8]
  assert list(_texts(acc, "config")) == [0]  # the header once, at the run's start
  _assert_no_step_goes_back(workdir)


def test_a_resume_from_before_the_last_logged_step_is_the_next_attempt_beside_the_first(workdir):
  _write_scalars(monitoring.create_writer(workdir, 0, _CONFIG), [2, 4, 6])  # killed after 6
  _write_scalars(monitoring.create_writer(workdir, 4, _CONFIG), [6, 8])  # saved at 4

  second = os.path.join(workdir, "attempt_2")
  assert monitoring.attempt_dirs(workdir) == [workdir, second]
  first, again = _read(workdir), _read(second)
  assert [e.step for e in first.Tensors(f"{monitoring.TRAIN}/d_loss")] == [2, 4, 6]
  assert [e.step for e in again.Tensors(f"{monitoring.TRAIN}/d_loss")] == [6, 8]
  (note,) = _texts(again, "attempt").items()
  assert note[0] == 4 and "checkpoint of step 4" in note[1] and "logged (6)" in note[1]
  assert list(_texts(again, "config")) == [4]
  assert _trial_name(again) == "run/attempt_2"
  for logdir in (workdir, second):
    _assert_no_step_goes_back(logdir)
  # `tensorboard --logdir WORKDIR` shows both, each a run of its own.
  multiplexer = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(workdir)
  assert sorted(multiplexer.Runs()) == [".", "attempt_2"]


def test_a_rollback_is_told_where_it_happens_and_begins_the_next_attempt(workdir):
  writer = monitoring.create_writer(workdir, 0, _CONFIG)
  writer.write_scalars(6, {f"{monitoring.TRAIN}/d_loss": float("nan")})
  event = {"from_step": 6, "to_step": 4, "reason": "non-finite d_loss", "rollback": 1}
  note = monitoring.rollback_markdown({**event, "g_lr": 1e-4, "d_lr": 1e-4, "b1": 0.3})
  _write_scalars(monitoring.next_attempt(writer, workdir, (6, 4), _CONFIG, note), [6, 8])

  abandoned, second = _read(workdir), _read(os.path.join(workdir, "attempt_2"))
  (told,) = _texts(abandoned, "collapse/rollback").items()
  assert told[0] == 6
  assert "**Rollback 1** at step 6, back to step 4: non-finite d_loss" in told[1]
  assert "beta1 0.3" in told[1] and "`run/attempt_2`" in told[1]
  assert _texts(second, "attempt") == {4: note}
  assert list(_texts(second, "config")) == [4]
  assert _trial_name(second) == "run/attempt_2"
  for logdir in monitoring.attempt_dirs(workdir):
    _assert_no_step_goes_back(logdir)


def _tensorboard_group_order(tag: str):
  """The key TensorBoard's dashboards sort tag groups by (webapp/metrics/utils.ts
  compareTagNames): digits before every letter, then character codes."""
  group = tag.split("/", 1)[0]
  return [(not c.isdigit(), c) for c in group]


def test_the_training_curves_are_the_first_group():
  groups = [f"{monitoring.TRAIN}/d_loss", "collapse/rollbacks", "eval/swd_mean", "health/ms_ssim"]
  assert min(groups, key=_tensorboard_group_order) == f"{monitoring.TRAIN}/d_loss"
  assert monitoring.TRAIN.endswith("train")


@pytest.mark.slow
def test_a_run_resumed_from_an_older_checkpoint_and_rolled_back_never_shows_a_step_twice(workdir):
  def config(num_steps):
    return judge_only_non_finite(tiny_config("dense", train__num_steps=num_steps))

  trainer.train_and_evaluate(config(6), workdir)  # logs and saves 2, 4, 6
  # As if killed after logging step 6 and before saving it, and with a checkpoint at 5 from
  # which step 6 is non-finite.
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.set_aside_after(4)
  ckpt.close()
  poison(workdir, config(8), 4)
  # From 5, before the last logged step: attempt_2; it collapses at 6, goes back to 4: attempt_3.
  trainer.train_and_evaluate(config(8), workdir)

  runs = monitoring.attempt_dirs(workdir)
  assert [os.path.relpath(r, workdir) for r in runs] == [".", "attempt_2", "attempt_3"]
  for logdir in runs:
    _assert_no_step_goes_back(logdir)
  first, second, third = (_read(logdir) for logdir in runs)
  loss = f"{monitoring.TRAIN}/d_loss"
  assert [e.step for e in first.Tensors(loss)] == [2, 4, 6]
  assert [e.step for e in second.Tensors(loss)] == [6]
  assert [e.step for e in third.Tensors(loss)] == [6, 8]
  assert list(_texts(first, "config")) == [0]
  assert "checkpoint of step 5" in _texts(second, "attempt")[5]
  (told,) = _texts(second, "collapse/rollback").items()
  assert told[0] == 6 and "back to step 4" in told[1] and "`run/attempt_3`" in told[1]
  assert "**Rollback 1**" in _texts(third, "attempt")[4]
  assert [_trial_name(acc) for acc in (first, second, third)] == [
    "run",
    "run/attempt_2",
    "run/attempt_3",
  ]
