"""Where a run reports: TensorBoard event files through clu writers, and the console.

The only module that creates metric writers, so every script logs the same way.

A TensorBoard run never shows a step twice. Each attempt at a run is a TensorBoard run of its
own: the first writes into WORKDIR, and a rollback, or a resume from a checkpoint older than the
last logged step (after a crash), begins the next attempt in WORKDIR/attempt_N/, beside the
abandoned one; a resume with nothing to overlap carries on in the current one. Each attempt
begins with the config as Markdown, its hparams trial named after it and a note of why it
began; the training curves are tagged `1_train/` so that TensorBoard lists them first.
"""

import contextlib
import dataclasses
import glob
import logging as std_logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging
from clu import metric_writers

# The group of the training curves: TensorBoard sorts tag groups by name (digits first) and
# unfolds the first two, so this one leads, ahead of eval/ and health/.
TRAIN = "1_train"
ATTEMPT = "attempt_"  # WORKDIR/attempt_N/ holds the events of a run's Nth attempt (N >= 2)
_ATTEMPT_DIR = re.compile(re.escape(ATTEMPT) + r"(\d+)")


def create_writer(
  workdir: str,
  step: int = 0,
  config: Mapping[str, Any] | None = None,
  changes: Sequence[str] = (),
) -> metric_writers.MetricWriter:
  """A TensorBoard writer for the run in WORKDIR from `step` on, writing in a background thread.

  The events go to the current attempt's directory, or begin the next attempt's where the
  current one already logged a step after `step` (a resume from an older checkpoint); a
  TensorBoard run that begins gets its header at `step` (`config` as Markdown, the hparams).
  A resume that carries on in the same TensorBoard run with `changes` (the settings changed
  since, 'name old -> new') gets the new config at `step`, the changes above it.
  With several processes, process 0 alone writes and the others' writer does nothing.
  """
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  attempt, logdir = _attempts(workdir)[-1]
  last = last_logged_step(logdir)
  note = None
  if last is not None and last > step:  # this run would log again steps the current one shows
    start = f"the checkpoint of step {step}" if step else "the start (no checkpoint was kept)"
    note = (
      f"Resumed from {start}, before the last step `{_name(workdir, logdir)}` logged "
      f"({last}): this attempt carries on from step {step} beside it."
    )
    logdir = os.path.join(workdir, f"{ATTEMPT}{attempt + 1}")
  writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))
  if last is None or note:
    _write_header(writer, step, _name(workdir, logdir), config, note)
  elif changes and config is not None:
    told = f"Settings changed on resuming from step {step}: {'; '.join(changes)}.\n\n"
    writer.write_texts(step, {"config": told + config_markdown(flatten_config(config))})
  return writer


def next_attempt(
  writer: metric_writers.MetricWriter,
  workdir: str,
  steps: tuple[int, int],
  config: Mapping[str, Any],
  note: str,
) -> metric_writers.MetricWriter:
  """After a rollback `steps` = (from, to): writes `note` (Markdown) where it happened, closes
  `writer` and returns the writer of the run's next attempt, which begins at `to` with its
  header and `note`."""
  if jax.process_index() > 0:
    return writer
  attempt, _ = _attempts(workdir)[-1]
  logdir = os.path.join(workdir, f"{ATTEMPT}{attempt + 1}")
  name = _name(workdir, logdir)
  writer.write_texts(steps[0], {"collapse/rollback": f"{note}\n\nThe run goes on in `{name}`."})
  writer.close()
  writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))
  _write_header(writer, steps[1], name, config, note)
  return writer


def attempt_dirs(workdir: str) -> list[str]:
  """The directories of the run's TensorBoard runs, in order: WORKDIR, then its attempt_N/."""
  return [logdir for _, logdir in _attempts(workdir)]


def _attempts(workdir: str) -> list[tuple[int, str]]:
  found = [(1, workdir)]
  if os.path.isdir(workdir):
    for entry in os.listdir(workdir):
      match = _ATTEMPT_DIR.fullmatch(entry)
      if match and os.path.isdir(os.path.join(workdir, entry)):
        found.append((int(match.group(1)), os.path.join(workdir, entry)))
  return sorted(found)


def _name(workdir: str, logdir: str) -> str:
  """The run's name as TensorBoard shows it given WORKDIR's parent: e.g. dcgan/attempt_2."""
  parent = os.path.dirname(os.path.abspath(workdir))
  return os.path.relpath(os.path.abspath(logdir), parent)


def event_steps(logdir: str) -> list[list[int]]:
  """The step of every event in each event file directly in `logdir`, in the order the files
  and their events are read (a truncated last record, as a killed process leaves, ends one)."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2

  return [
    [
      event_pb2.Event.FromString(raw).step
      for raw in event_file_loader.RawEventFileLoader(path).Load()
    ]
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  ]


def last_logged_step(logdir: str) -> int | None:
  """The latest step of the events in `logdir`, or None where there are none."""
  return max((max(steps) for steps in event_steps(logdir) if steps), default=None)


def _write_header(writer, step: int, name: str, config: Mapping | None, note: str | None) -> None:
  """What a TensorBoard run begins with, at its first step: the config as a Markdown table in
  the Text tab, its hparams as a trial named after the run, and why it began."""
  from tensorboard.plugins.hparams import api as hparams_api
  from tensorboard.util import tensor_util

  if note:
    writer.write_texts(step, {"attempt": note})
  if config is None:
    return
  flat = flatten_config(config)
  writer.write_texts(step, {"config": config_markdown(flat)})
  (value,) = hparams_api.hparams_pb(flat, trial_id=name).value
  writer.write_summaries(
    step,
    {value.tag: tensor_util.make_ndarray(value.tensor)},
    {value.tag: value.metadata.SerializeToString()},
  )


def config_markdown(flat: Mapping[str, Any]) -> str:
  """A flattened config as a Markdown table of fields and values."""
  rows = [f"| `{k}` | `{v}` |" for k, v in sorted(flat.items())]
  return "\n".join(["| field | value |", "|---|---|", *rows])


def rollback_markdown(event: Mapping[str, Any]) -> str:
  """A rollback's record (gan/rollback.py) as Markdown: where from and to, why, the remedy."""
  remedy = f"learning rates G {event['g_lr']:.3g}, D {event['d_lr']:.3g}"
  if "b1" in event:
    remedy += f", Adam beta1 {event['b1']:g}"
  return (
    f"**Rollback {event['rollback']}** at step {event['from_step']}, back to step "
    f"{event['to_step']}: {event['reason']}.\n\nCarrying on with a new random stream and "
    f"{remedy}."
  )


@contextlib.contextmanager
def log_file(path: str):
  """Copies the log to `path` inside the block (appended: a resumed run continues it)."""
  handler = std_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  logging.get_absl_logger().addHandler(handler)
  try:
    yield
  finally:
    logging.get_absl_logger().removeHandler(handler)
    handler.close()


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flattens a nested config into {'a.b': value} with values TensorBoard's hparams accept."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, f"{name}."))
    elif value is None or isinstance(value, (tuple, list)):
      flat[name] = str(value)
    else:
      flat[name] = value
  return flat


def log_losses(step: int, num_steps: int, scalars: Mapping[str, float]) -> None:
  """The console line of a log: step/total, images/s and the losses."""
  logging.info(
    "step %*d/%d  %6.1f img/s  d_loss %.4f  g_loss %.4f  D(real) %.3f  D(fake) %.3f",
    len(str(num_steps)),
    step,
    num_steps,
    scalars["images_per_second"],
    scalars["d_loss"],
    scalars["g_loss"],
    scalars["d_real"],
    scalars["d_fake"],
  )


@dataclasses.dataclass
class Timings:
  """Where a training run's wall time went, in seconds.

  first_step runs from the start of `trainer.train_and_evaluate` (state built or restored, data
  source opened) until the first step's results exist, its compile included; `steps` counts the
  steps after it and step_seconds their time outside evaluations and checkpoint saves (input,
  host-to-device copies, metric fetches and logging included). `parts` holds the duration of
  each evaluation and checkpoint save, in order (the first evaluation compiles what it runs).
  """

  first_step: float = 0.0
  steps: int = 0
  step_seconds: float = 0.0
  parts: dict[str, list[float]] = dataclasses.field(
    default_factory=lambda: {"evaluation": [], "checkpoint": []}
  )
  _last: tuple[int, float] = (0, 0.0)  # (step, time) of the last throughput reading
  _paused: float = 0.0  # time spent in timed parts since then

  @property
  def evaluations(self) -> list[float]:
    return self.parts["evaluation"]

  @property
  def checkpoints(self) -> list[float]:
    return self.parts["checkpoint"]

  @contextlib.contextmanager
  def part(self, name: str):
    """Times a named part of the loop (e.g. evaluation), which throughput readings leave out."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    self.parts.setdefault(name, []).append(elapsed)
    self._paused += elapsed

  def start(self, step: int) -> None:
    """Marks where throughput readings begin: the loop starts (again) at `step`."""
    self._last, self._paused = (step, time.perf_counter()), 0.0

  def images_per_second(self, step: int, batch_size: int) -> float:
    """Throughput since the previous reading (or `start`), outside the timed parts; read it
    right after a device->host fetch."""
    now = time.perf_counter()
    last_step, last_time = self._last
    seconds = max(now - last_time - self._paused, 1e-9)
    self._last, self._paused = (step, now), 0.0
    return (step - last_step) * batch_size / seconds

  def close(self, total_seconds: float) -> None:
    """Fills in step_seconds from the run's total time."""
    if self.first_step:
      spent = sum(sum(times) for times in self.parts.values())
      self.step_seconds = total_seconds - self.first_step - spent

  def summary(self) -> str:
    return (
      f"first step after {self.first_step:.1f} s; {self.steps} more steps in "
      f"{self.step_seconds:.1f} s; {len(self.evaluations)} evaluations in "
      f"{sum(self.evaluations):.1f} s; {len(self.checkpoints)} checkpoint saves in "
      f"{sum(self.checkpoints):.1f} s"
    )


def _duration(seconds: float) -> str:
  if seconds == float("inf"):
    return "--:--:--"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
