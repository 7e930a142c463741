"""Going back after a collapse: to the newest healthy checkpoint, with a remedy, on record.

A rollback restores the newest checkpoint judged healthy before the collapse (else the initial
state: checkpoints of the warm-up were never judged, and their generator may already be
falling), and changes what made the run fall: a new random stream; learning rates
`collapse.lr_factor` times the lower of the restored and the fallen state's, so repeated rollbacks
keep lowering them even when they go back to the same checkpoint; and Adam's beta1 set to
`collapse.rollback_b1` when that is given. Each rollback is one JSON line in
WORKDIR/rollbacks.jsonl, strict JSON that any reader accepts: a non-finite number (a NaN health
signal, say) is written as null, and the reason says which value was not finite. The sample
grids of the steps a rollback abandons move to WORKDIR/samples/rollback_<N>/, where the steps
trained again cannot overwrite them: they show what the collapse looked like.
"""

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from gan import checkpointing, parallel, sampling
from gan import state as state_lib
from gan.health import verdict

ROLLBACKS_FILE = "rollbacks.jsonl"


def roll_back(
  ckpt: checkpointing.Checkpointer,
  config: ml_collections.ConfigDict,
  fallen: state_lib.TrainState,
  abstract: state_lib.TrainState,
  make_initial: Callable[[], state_lib.TrainState],
  rollbacks: int,
  reasons: tuple[str, ...],
  signals: Mapping[str, float] | None = None,
) -> tuple[state_lib.TrainState, dict]:
  """The state to carry on from after `fallen` collapsed, and the rollback's record.

  Args:
    ckpt: the run's checkpoints (the healthy one restored; newer ones are moved aside).
    config: the run's config (`collapse` remedies).
    fallen: the collapsed state.
    abstract: the structure, dtypes and placement to restore into (`state.abstract`).
    make_initial: builds the run's initial state, the fallback when no checkpoint is healthy.
    rollbacks: how many rollbacks the run made before this one.
    reasons: why the run was judged collapsed.
    signals: the health signals of the collapsed evaluation, recorded with the rollback.
  """
  step = int(parallel.to_host(fallen.step))
  ckpt.wait()
  healthy = ckpt.steps_where(verdict.is_healthy, before=step)
  target, state = ckpt.restore_first(healthy, abstract)
  if target is None:
    state = make_initial()
    ckpt.set_aside_after(0)
  state = state.replace(rng=jax.random.fold_in(state.rng, state_lib.ROLLBACK_KEY - rollbacks))
  rates = [
    jnp.minimum(restored, current) * config.collapse.lr_factor
    for restored, current in zip(
      state_lib.learning_rates(state), state_lib.learning_rates(fallen), strict=True
    )
  ]
  state = state_lib.with_hyperparams(state, learning_rate=rates)
  event = {
    "from_step": step,
    "to_step": target or 0,
    "reason": "; ".join(reasons),
    "rollback": rollbacks + 1,
    "g_lr": float(parallel.to_host(rates[0])),
    "d_lr": float(parallel.to_host(rates[1])),
    "signals": {k.removeprefix("health/"): float(v) for k, v in (signals or {}).items()},
  }
  if config.collapse.rollback_b1 is not None:
    state = state_lib.with_hyperparams(state, b1=[config.collapse.rollback_b1] * 2)
    event["b1"] = config.collapse.rollback_b1
  return state, event


def hint(ckpt: checkpointing.Checkpointer, step: int) -> str:
  """Names the checkpoint a rollback by hand would best go back to."""
  steps = ckpt.steps_where(verdict.is_healthy, before=step)
  return f"the last healthy checkpoint is step {steps[0]}" if steps else "none was judged healthy"


def record(workdir: str, event: Mapping) -> None:
  """Appends one JSON line per rollback to WORKDIR/rollbacks.jsonl (non-finite numbers as null)."""
  line = json.dumps(
    _finite_or_null({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}), allow_nan=False
  )
  with open(os.path.join(workdir, ROLLBACKS_FILE), "a") as f:
    f.write(line + "\n")


def set_grids_aside(workdir: str, after_step: int, rollback_number: int) -> list[str]:
  """Moves WORKDIR/samples/step_N.png with N > `after_step` to samples/rollback_<number>/.

  Returns the names moved.
  """
  folder = os.path.join(workdir, sampling.SAMPLES_DIR)
  names = os.listdir(folder) if os.path.isdir(folder) else []
  later = sorted(n for n in names if (sampling.grid_step(n) or 0) > after_step)
  if later:
    aside = os.path.join(folder, f"rollback_{rollback_number}")
    os.makedirs(aside, exist_ok=True)
    for name in later:
      shutil.move(os.path.join(folder, name), os.path.join(aside, name))
  return later


def _finite_or_null(value):
  """`value` with every NaN or infinity in it (nested in mappings and lists) replaced by None."""
  if isinstance(value, Mapping):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_finite_or_null(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def count(workdir: str) -> int:
  """How many rollbacks WORKDIR/rollbacks.jsonl records."""
  path = os.path.join(workdir, ROLLBACKS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.strip())
