"""The one place that talks to Orbax: saving, listing and restoring the whole TrainState.

Checkpoints live in WORKDIR/checkpoints/<step>/ with the metrics of the step they were saved at.
Orbax writes each one to a temporary directory and renames it when complete, so a process killed
mid-save leaves every earlier checkpoint intact and the half-written one invisible. A checkpoint
damaged afterwards (on disk, by hand) is never used: one whose metrics cannot be read is left out
of the listing, and each carries a checksum of its state, compared when it is restored.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from gan import parallel
from gan.errors import UserError

ASIDE_DIR = "checkpoints_aside"
# The metric holding a digest of the checkpoint's state (see state_checksum).
CHECKSUM_METRIC = "checksum/state_sha256"

# Where each generator's quality metrics are among a checkpoint's metrics (and TensorBoard's tags):
# the EMA of G's weights under eval/, the raw weights under eval_raw/.
EVAL_PREFIX = {"ema": "eval", "raw": "eval_raw"}

# A test of a checkpoint's metrics, e.g. whether they record a healthy verdict.
Predicate = Callable[[Mapping[str, Any] | None], bool]


@dataclasses.dataclass
class LastWhere(policies.PreservationPolicy):
  """Keeps the newest checkpoint whose metrics pass `predicate`, however many come after it."""

  predicate: Predicate

  def should_preserve(
    self, checkpoints: Sequence[policies.PolicyCheckpointInfo], *, context
  ) -> Sequence[bool]:
    passing = [i for i, info in enumerate(checkpoints) if self.predicate(info.metrics)]
    return [bool(passing) and i == passing[-1] for i in range(len(checkpoints))]


def _best(metric: str, mode: str) -> policies.PreservationPolicy:
  """Keeps the checkpoint with the best value of `metric` ('min' or 'max' is best). A missing or
  NaN value (a run gone non-finite) ranks worst: NaN would upset the sort that ranks them all."""
  worst = float("inf") if mode == "min" else -float("inf")

  def value(metrics) -> float:
    found = metrics.get(metric, worst)
    return worst if math.isnan(found) else found

  return policies.BestN(
    get_metric_fn=value,
    reverse=mode == "min",  # BestN keeps the last of the sorted list
    n=1,
  )


class DamagedCheckpoint(UserError):
  """A checkpoint read back whole whose state differs from the one saved: bytes changed on disk."""

  def __init__(self, step: int, directory: str):
    self.reason = "it is damaged: its state does not match the checksum saved with it"
    super().__init__(
      f"the checkpoint of step {step} in {directory} is damaged: its state does not match the "
      "checksum saved with it; use another step"
    )


def state_checksum(state) -> str:
  """A SHA-256 digest of every array of `state`: its dtype, shape and bytes, in tree order.

  Saved among a checkpoint's metrics and compared at restore, it catches bytes changed on disk
  that the file formats would read back as other numbers. Computed from this process's copy of
  the (replicated) state, before a save returns: the next train step donates these buffers.
  """

  def plain(x):
    is_key = jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
    return jax.random.key_data(x) if is_key else x

  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(parallel.to_host(jax.tree.map(plain, state))):
    array = np.ascontiguousarray(leaf)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # the buffer itself: no copy
  return digest.hexdigest()


def _unreadable_metrics(step_dir: str) -> str | None:
  """Why a checkpoint's metrics file cannot be read back as a mapping; None when it can (or
  when there is none, which Orbax reads as no metrics)."""
  name = ocp.checkpoint_manager.METRIC_ITEM_NAME
  path = os.path.join(step_dir, name, name)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      metrics = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
    return f"{path}: {_first_line(e)}"
  return None if isinstance(metrics, dict) else f"{path} holds no mapping"


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity
class _ReadableSteps(ocp.path.step.NameFormat):
  """Orbax's standard step names (`<step>/`), listing only the steps whose metrics read back.

  Orbax reads every checkpoint's metrics when it opens a directory and when it reloads it, and
  stops at the first that is not JSON; this leaves such a checkpoint out instead, with a warning,
  and notes it in `damaged` (step -> why), so the others stay usable.
  """

  damaged: dict[int, str] = dataclasses.field(default_factory=dict)
  standard: ocp.path.step.NameFormat = dataclasses.field(
    default_factory=ocp.path.step.standard_name_format
  )
  warned: set[int] = dataclasses.field(default_factory=set)

  def build_name(self, step: int) -> str:
    return self.standard.build_name(step)

  def find_step(self, base_path, step: int) -> ocp.path.step.Metadata:
    return self.standard.find_step(base_path, step)

  def find_all(self, base_path) -> Iterator[ocp.path.step.Metadata]:
    readable = []
    self.damaged.clear()
    for metadata in self.standard.find_all(base_path):
      why = _unreadable_metrics(str(metadata.path))
      if why is None:
        readable.append(metadata)
        continue
      self.damaged[metadata.step] = why
      if metadata.step not in self.warned:
        self.warned.add(metadata.step)
        logging.warning(
          "Skipping the checkpoint of step %d: it is damaged, its metrics cannot be read (%s)",
          metadata.step,
          why,
        )
    return iter(readable)


class Checkpointer:
  """Saves and restores TrainState pytrees under one directory with a preservation policy."""

  def __init__(self, directory: str, config=None, *, keep_last_where: Predicate | None = None):
    """Args: directory, usually WORKDIR/checkpoints; config, the `checkpoint` config section
    (None: only read, list and move checkpoints; nothing is ever deleted); keep_last_where: the
    newest checkpoint whose metrics pass it is kept too (the trainer's: the last healthy one)."""
    self.directory = os.path.abspath(directory)
    if config is None:
      keep = [policies.LatestN(n=None)]  # n=None keeps all
    else:
      keep = [policies.LatestN(n=config.keep_latest)]
      if keep_last_where is not None:
        keep.append(LastWhere(keep_last_where))
      if config.keep_every:
        keep.append(policies.EveryNSteps(interval_steps=config.keep_every))
      if config.best_metric:
        metric = f"{EVAL_PREFIX[config.best_generator]}/{config.best_metric}"
        keep.append(_best(metric, config.best_mode))
    self._steps = _ReadableSteps()
    options = ocp.CheckpointManagerOptions(
      step_name_format=self._steps,
      preservation_policy=policies.AnyPreservationPolicy(keep),
      # Orbax stores a checkpoint's metrics only when it ranks checkpoints; the preservation
      # policy above decides what is kept, so every checkpoint ranks the same.
      best_fn=lambda metrics: 0.0,
      enable_async_checkpointing=config is not None and config.asynchronous,
      create=config is not None,
      # A save cut short (a killed process, a full disk) leaves a temporary directory that
      # Orbax never lists; clear them when training opens the directory again.
      cleanup_tmp_directories=config is not None,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """The steps of the usable checkpoints (not the damaged ones)."""
    return sorted(self._manager.all_steps())

  def damaged(self) -> dict[int, str]:
    """The checkpoints left out of all_steps because their metrics cannot be read: step -> why."""
    return dict(sorted(self._steps.damaged.items()))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def metrics(self, step: int) -> Mapping[str, Any] | None:
    return self._manager.metrics(step)

  def steps_where(self, predicate: Predicate, before: int) -> list[int]:
    """The steps before `before` whose checkpoints' metrics pass `predicate`, newest first."""
    return [s for s in self.all_steps()[::-1] if s < before and predicate(self.metrics(s))]

  def restore_first(self, steps: Sequence[int], target) -> tuple[int | None, Any]:
    """Restores the first of `steps` whose checkpoint reads back whole.

    A checkpoint with truncated or missing files, or whose state does not match its checksum,
    is skipped with a warning, never used; the checkpoints newer than the one restored, and
    every damaged one, are moved aside (see set_aside_after).

    Returns:
      The step restored and its state, or (None, None) when none of `steps` could be read.
    """
    for step in steps:
      try:
        state = self.restore(step, target)
      except DamagedCheckpoint as e:
        logging.warning("Skipping the checkpoint of step %d: %s", step, e.reason)
        continue
      except Exception as e:  # Orbax and TensorStore raise many kinds for damaged files
        logging.warning(
          "Skipping the checkpoint of step %d: it cannot be read (%s)", step, _first_line(e)
        )
        continue
      self.set_aside_after(step)
      return step, state
    return None, None

  def save(self, step: int, state, metrics: Mapping[str, float]) -> None:
    """Starts saving `state` as `step` (in the background when asynchronous), with `metrics`
    and the state's checksum.

    Raises:
      UserError: when this save, or the one before it still in flight, could not be written
        (a full disk, a directory that is not writable); the earlier checkpoints are intact.
    """
    metrics = {**{k: float(v) for k, v in metrics.items()}, CHECKSUM_METRIC: state_checksum(state)}
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
    except Exception as e:  # Orbax wraps the OSError of its writer threads in other kinds
      raise self._save_failed(e) from e

  def require(self, step: int) -> None:
    """Raises a UserError listing the saved steps unless `step` is one of them."""
    if step not in self.all_steps():
      raise UserError(f"no checkpoint at step {step} in {self.directory}; {self._describe_steps()}")

  def restore(self, step: int, target):
    """Restores the state saved at `step` into the structure, dtypes and sharding of `target`.

    Raises:
      DamagedCheckpoint: when the state read back does not match the checksum saved with it (a
        checkpoint saved without one is restored unchecked).
    """
    self.require(step)
    state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    saved = (self.metrics(step) or {}).get(CHECKSUM_METRIC)
    if saved is None:
      logging.warning("The checkpoint of step %d has no checksum: restored unchecked", step)
    elif saved != state_checksum(state):
      raise DamagedCheckpoint(step, self.directory)
    return state

  def set_aside_after(self, step: int) -> list[int]:
    """Moves checkpoints newer than `step`, and every damaged one, to
    WORKDIR/checkpoints_aside/<time>/, never deleting.

    Training then continues from `step` and saves its own newer checkpoints in their place.
    Returns the steps moved.
    """
    later = sorted({*(s for s in self.all_steps() if s > step), *self._steps.damaged})
    if later:
      self._manager.wait_until_finished()
      if parallel.is_main_process():
        aside = os.path.join(
          os.path.dirname(self.directory), ASIDE_DIR, time.strftime("%Y%m%d-%H%M%S")
        )
        os.makedirs(aside, exist_ok=True)
        for s in later:
          shutil.move(os.path.join(self.directory, str(s)), os.path.join(aside, str(s)))
        logging.info("Moved checkpoints of steps %s aside to %s", later, aside)
      parallel.sync("set_aside")
      self._manager.reload()
    return later

  def wait(self) -> None:
    """Blocks until every save in flight is on disk; raises UserError as `save` does."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(e) from e

  def _save_failed(self, error: Exception) -> UserError:
    self._manager.reload()  # forget the step that was not written
    kept = self.all_steps()
    then = (
      f"the checkpoints saved before are intact (steps {', '.join(map(str, kept))}); make room "
      f"or make it writable, then run again to resume from step {kept[-1]}"
      if kept
      else "no checkpoint was saved before; make room or make it writable, then run again"
    )
    return UserError(
      f"could not save a checkpoint in {self.directory}: {write_failure_reason(error)}; {then}"
    )

  def close(self) -> None:
    self._manager.close()

  def _describe_steps(self) -> str:
    steps, damaged = self.all_steps(), self.damaged()
    listed = f"saved steps: {', '.join(map(str, steps))}" if steps else "it holds no checkpoints"
    return listed + (f" (damaged: {', '.join(map(str, damaged))})" if damaged else "")


def write_failure_reason(error: Exception) -> str:
  """The operating system's words for why a write failed, else the error's first line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  code = re.search(r"os_error_code='(\d+)'", str(error))  # TensorStore's form
  return os.strerror(int(code.group(1))) if code else _first_line(error)


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"
