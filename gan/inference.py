"""A trained run, loaded for sampling and evaluation: its config, networks and saved state.

What `scripts/sample.py` and `scripts/evaluate.py` use; it knows the workdir's layout and the
checkpoints, nothing of the trainer.
"""

import functools
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from gan import checkpointing, models, parallel
from gan import step as step_lib
from gan.errors import UserError
from gan.state import Networks, TrainState, create_train_state

# The sections every run's config.json holds (see configs/default.py).
_SECTIONS = ("data", "model", "train", "checkpoint", "eval", "collapse")


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded in WORKDIR/config.json.

  Raises:
    UserError: when the workdir holds no run or its config.json cannot be read.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"no training run in {workdir}: {path} does not exist")
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {e}") from None
  if not isinstance(recorded, dict):
    recorded = {}
  missing = [s for s in _SECTIONS if not isinstance(recorded.get(s), dict)]
  if missing:
    raise UserError(
      f"{path} is not a training run's config (it has no section {', '.join(missing)}): "
      "put the run's own config.json back, or use another workdir"
    )
  for name, off in models.D_OPTIONS_OFF.items():
    # A run recorded before D's options against collapse existed ran without them.
    recorded["model"].setdefault(name, off)
  return ml_collections.ConfigDict(recorded)


def _runnable_here(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with a convolution implementation this machine has: the recorded one where it
  can run, else what `auto` picks (the same function, computed another way)."""
  try:
    models.resolve_conv_impl(config.model.conv_impl, config.model.dtype)
  except UserError as e:
    config.model.conv_impl = models.resolve_conv_impl("auto", config.model.dtype)
    logging.warning("%s; sampling with model.conv_impl=%s instead", e, config.model.conv_impl)
  return config


def load_run(
  workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, Networks, TrainState]:
  """The config, networks and state of a saved run.

  Args:
    workdir: a training run's workdir (config.json and checkpoints/).
    step: the checkpoint to load; None for the latest.

  Raises:
    UserError: when the workdir holds no run or no checkpoint at `step`.
  """
  config = _runnable_here(read_config(workdir))
  nets, state = create_train_state(config)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{workdir} holds no checkpoints yet")
    return config, nets, ckpt.restore(step, state)
  finally:
    ckpt.close()


def checkpoint_steps(workdir: str, wanted: list[int] | None = None) -> list[int]:
  """The steps of a run's checkpoints, oldest first: all of them, or `wanted` once each is found.

  Raises:
    UserError: when the workdir holds no run or no checkpoint, or a wanted step is not saved
      (naming the saved ones).
  """
  read_config(workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    for step in wanted or ():
      ckpt.require(step)
    steps = sorted(set(wanted)) if wanted else ckpt.all_steps()
  finally:
    ckpt.close()
  if not steps:
    raise UserError(f"{workdir} holds no checkpoints yet")
  return steps


def generator_params(state: TrainState, generator: str):
  """The weights of a state's `generator`: 'ema' (what training draws) or 'raw'."""
  return state.ema if generator == "ema" else state.g.params


def sampler(nets: Networks):
  """jit(generate) for these networks: (params, batch_stats, z) -> images."""
  return jax.jit(functools.partial(step_lib.generate, nets))


def noise(key: jax.Array, num: int, latent_dim: int) -> np.ndarray:
  """`num` latent vectors drawn from `key`, as numpy: the fixed noise of an evaluation."""
  return np.asarray(jax.random.normal(key, (num, latent_dim)))


def generate_many(sample_fn, params, batch_stats, noise: np.ndarray, chunk: int = 250):
  """Samples for a long noise batch, `chunk` at a time to bound memory, as numpy.

  Args:
    sample_fn: `sampler(nets)`.
    params, batch_stats: the generator's (usually state.ema and state.g.batch_stats).
    noise: [N, latent_dim].
    chunk: images per call.
  """
  return np.concatenate(
    [
      parallel.to_host(sample_fn(params, batch_stats, noise[i : i + chunk]))
      for i in range(0, len(noise), chunk)
    ]
  )
