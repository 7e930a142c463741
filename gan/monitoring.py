"""Where a run reports: TensorBoard event files through clu writers, and the console.

The only module that creates metric writers, so every script logs the same way.
"""

import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from clu import metric_writers


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """A TensorBoard writer for WORKDIR that writes in a background thread; with several
  processes, process 0 alone writes and the others' writer does nothing."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


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


class Progress:
  """Console lines a person can follow: step/total, images/s, ETA and the losses."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self._total = total_steps
    self._batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  @contextlib.contextmanager
  def paused(self):
    """Leaves the time spent inside out of the throughput (samples, checkpoints)."""
    start = time.perf_counter()
    yield
    self._last_time += time.perf_counter() - start

  def images_per_second(self, step: int) -> float:
    """Throughput since the previous call; call it right after a device->host fetch."""
    now = time.perf_counter()
    rate = (step - self._last_step) * self._batch_size / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def log(self, step: int, images_per_second: float, scalars: Mapping[str, float]) -> None:
    steps_per_second = images_per_second / self._batch_size
    eta = (self._total - step) / steps_per_second if steps_per_second > 0 else float("inf")
    width = len(str(self._total))
    logging.info(
      "step %*d/%d  %6.1f img/s  ETA %s  d_loss %.4f  g_loss %.4f  D(real) %.3f  D(fake) %.3f",
      width,
      step,
      self._total,
      images_per_second,
      _duration(eta),
      scalars["d_loss"],
      scalars["g_loss"],
      scalars["d_real"],
      scalars["d_fake"],
    )


@dataclasses.dataclass
class Timings:
  """Where a training run's wall time went, in seconds.

  first_step runs from the start of `train.train_and_evaluate` (state built or restored, data
  source opened) until the first step's results exist, its compile included; `steps` counts the
  steps after it and step_seconds their time outside evaluations and checkpoint saves (input,
  host-to-device copies, metric fetches and logging included). `evaluations` and `checkpoints`
  hold the duration of each, in order (the first evaluation compiles what it runs).
  """

  first_step: float = 0.0
  steps: int = 0
  step_seconds: float = 0.0
  evaluations: list[float] = dataclasses.field(default_factory=list)
  checkpoints: list[float] = dataclasses.field(default_factory=list)

  @contextlib.contextmanager
  def evaluation(self):
    start = time.perf_counter()
    yield
    self.evaluations.append(time.perf_counter() - start)

  @contextlib.contextmanager
  def checkpoint(self):
    start = time.perf_counter()
    yield
    self.checkpoints.append(time.perf_counter() - start)

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
