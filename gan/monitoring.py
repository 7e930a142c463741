"""Where a run reports: TensorBoard event files through clu writers, and the console.

The only module that creates metric writers, so every script logs the same way.
"""

import contextlib
import dataclasses
import logging as std_logging
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
