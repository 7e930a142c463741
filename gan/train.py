"""Training: the TrainState pytree, the pure train step, and the loop around it.

The loop feeds batches from the input pipeline to a jit-compiled `train_step`, fetches metrics
from the device only every `train.log_every` steps, writes sample grids every `eval.every` steps
and checkpoints every `checkpoint.every` steps. Restarting with the same workdir resumes from the
latest checkpoint, with the data order and random numbers an uninterrupted run would have had.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import threading
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from gan import (
  checkpointing,
  collapse,
  input_pipeline,
  losses,
  models,
  monitoring,
  parallel,
  sampling,
)
from gan.errors import UserError
from gan.metrics import fid, quality

# Keys folded into the root key for purposes other than a train step (steps use their number).
_INIT_KEY = 2**32 - 1
_FIXED_NOISE_KEY = 2**32 - 2
_HEALTH_KEY = 2**32 - 3
_EVAL_KEY = 2**32 - 4
_ROLLBACK_KEY = 2**32 - 5  # minus the number of earlier rollbacks


@flax.struct.dataclass
class TrainState:
  """Everything that decides a run's future; Orbax saves it and rollback restores it."""

  step: jax.Array  # generator updates done
  g_params: dict
  g_batch_stats: dict
  g_opt_state: optax.OptState
  d_params: dict
  d_batch_stats: dict
  d_opt_state: optax.OptState
  ema_params: dict  # exponential moving average of g_params, used for samples
  rng: jax.Array  # the root key; step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Networks:
  """The static half of a run: the module graphs and optimisers that act on a TrainState."""

  generator: nnx.GraphDef
  discriminator: nnx.GraphDef
  g_optimizer: optax.GradientTransformation
  d_optimizer: optax.GradientTransformation
  latent_dim: int


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError on settings that cannot work, before any work starts."""
  train = config.train
  positive = {
    "train.batch_size": train.batch_size,
    "train.num_steps": train.num_steps,
    "train.d_steps": train.d_steps,
    "train.log_every": train.log_every,
    "checkpoint.every": config.checkpoint.every,
    "checkpoint.keep_latest": config.checkpoint.keep_latest,
    "eval.every": config.eval.every,
    "eval.grid_size": config.eval.grid_size,
    "model.latent_dim": config.model.latent_dim,
  }
  for name, value in positive.items():
    if value <= 0:
      raise UserError(f"{name} must be positive, got {value}")
  if not 0 <= train.ema_decay < 1:
    raise UserError(f"train.ema_decay must be in [0, 1), got {train.ema_decay}")
  if train.g_lr <= 0 or train.d_lr <= 0:
    raise UserError(f"learning rates must be positive, got {train.g_lr} and {train.d_lr}")
  for name, b1 in (("train.b1", train.b1), ("collapse.rollback_b1", config.collapse.rollback_b1)):
    if b1 is not None and not 0 <= b1 < 1:
      raise UserError(f"{name} must be in [0, 1), got {b1}")
  if not 0 < config.collapse.lr_factor <= 1:
    raise UserError(f"collapse.lr_factor must be in (0, 1], got {config.collapse.lr_factor}")
  if config.checkpoint.keep_every < 0:
    raise UserError(f"checkpoint.keep_every must be >= 0, got {config.checkpoint.keep_every}")
  losses.check_name(train.loss)
  if config.checkpoint.every % config.eval.every:
    raise UserError(
      f"checkpoint.every ({config.checkpoint.every}) must be a multiple of eval.every "
      f"({config.eval.every}), so that every checkpoint carries a fresh health verdict"
    )
  quality.check_names(config.eval.metrics)
  if config.eval.metrics and config.eval.num_samples < 2:
    raise UserError(f"eval.num_samples must be >= 2, got {config.eval.num_samples}")
  if config.checkpoint.best_mode not in ("min", "max"):
    raise UserError(f"checkpoint.best_mode must be min or max, got {config.checkpoint.best_mode!r}")
  if config.collapse.num_samples < 2 or config.collapse.patience < 1:
    raise UserError("collapse.num_samples must be >= 2 and collapse.patience >= 1")
  if config.restore_step is not None and config.restore_step < 0:
    raise UserError(f"restore_step must be >= 0, got {config.restore_step}")


def _adam(config: ml_collections.ConfigDict, learning_rate: float):
  # The learning rate lives in the optimiser state, so it is saved, logged and can be changed.
  return optax.inject_hyperparams(optax.adam)(
    learning_rate=learning_rate, b1=config.train.b1, b2=config.train.b2
  )


def create_train_state(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[Networks, TrainState]:
  """Builds the networks and their initial state from `config.train.seed`, replicated over
  `mesh` when one is given (else on the default device)."""
  rng = jax.random.PRNGKey(config.train.seed)

  def build(key):
    return models.create_models(config.model, config.data.resolution, rngs=nnx.Rngs(key))

  # The graphs come from shapes alone; the values are made under jit, which is several times
  # faster on CPU than running each initialiser eagerly.
  abstract_g, abstract_d = nnx.eval_shape(lambda: build(jax.random.PRNGKey(0)))
  logging.info(
    "Model %s at %d px: generator %s parameters, discriminator %s parameters",
    config.model.name,
    config.data.resolution,
    f"{models.count_params(abstract_g):,}",
    f"{models.count_params(abstract_d):,}",
  )
  nets = Networks(
    generator=nnx.graphdef(abstract_g),
    discriminator=nnx.graphdef(abstract_d),
    g_optimizer=_adam(config, config.train.g_lr),
    d_optimizer=_adam(config, config.train.d_lr),
    latent_dim=config.model.latent_dim,
  )

  @functools.partial(jax.jit, out_shardings=mesh and parallel.replicated(mesh))
  def init(rng):
    generator, discriminator = build(jax.random.fold_in(rng, _INIT_KEY))
    g_params = nnx.state(generator, nnx.Param).to_pure_dict()
    d_params = nnx.state(discriminator, nnx.Param).to_pure_dict()
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      g_params=g_params,
      g_batch_stats=nnx.state(generator, nnx.BatchStat).to_pure_dict(),
      g_opt_state=nets.g_optimizer.init(g_params),
      d_params=d_params,
      d_batch_stats=nnx.state(discriminator, nnx.BatchStat).to_pure_dict(),
      d_opt_state=nets.d_optimizer.init(d_params),
      ema_params=g_params,
      rng=rng,
    )

  return nets, init(rng)


def _apply(graph, params, batch_stats, x, *, train, rngs=None, **kwargs):
  """Runs a module given its state; returns its output and its updated batch statistics."""
  module = nnx.merge(graph, params, batch_stats)
  out = module(x, train=train, rngs=rngs, **kwargs) if rngs is not None else module(x, train=train)
  return out, nnx.state(module, nnx.BatchStat).to_pure_dict()


def generate(nets: Networks, params, batch_stats, z: jax.Array) -> jax.Array:
  """G's images for noise `z`, normalised with the batch's own statistics.

  Batch statistics rather than running averages: the running averages belong to the raw
  weights, not to their EMA, and are poor early in training (the PyTorch DCGAN example samples
  the same way).
  """
  images, _ = _apply(nets.generator, params, batch_stats, z, train=True)
  return images


def discriminator_loss(nets: Networks, loss: str, d_params, d_stats, real, fake, key):
  """D's loss on a real and a generated batch; returns it with (new d_stats, real/fake logits)."""
  rngs = nnx.Rngs(dropout=key)
  real_logits, d_stats = _apply(nets.discriminator, d_params, d_stats, real, train=True, rngs=rngs)
  fake_logits, d_stats = _apply(nets.discriminator, d_params, d_stats, fake, train=True, rngs=rngs)
  d_loss = losses.discriminator_loss(loss, real_logits, fake_logits)
  return d_loss, (d_stats, real_logits, fake_logits)


def d_step(nets: Networks, config: ml_collections.ConfigDict, state: TrainState, real, rng):
  """One discriminator update against a fresh generated batch; returns (state, metrics)."""
  z_key, drop_key = jax.random.split(rng)
  z = jax.random.normal(z_key, (real.shape[0], nets.latent_dim))
  fake, g_stats = _apply(nets.generator, state.g_params, state.g_batch_stats, z, train=True)
  (d_loss, (d_stats, real_logits, fake_logits)), grads = jax.value_and_grad(
    discriminator_loss, argnums=2, has_aux=True
  )(
    nets,
    config.loss,
    state.d_params,
    state.d_batch_stats,
    real,
    jax.lax.stop_gradient(fake),
    drop_key,
  )
  updates, opt_state = nets.d_optimizer.update(grads, state.d_opt_state, state.d_params)
  state = state.replace(
    d_params=optax.apply_updates(state.d_params, updates),
    d_batch_stats=d_stats,
    d_opt_state=opt_state,
    g_batch_stats=g_stats,
  )
  metrics = {
    "d_loss": d_loss,
    "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
    "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
    "d_grad_norm": optax.global_norm(grads),
  }
  return state, metrics


def g_step(nets: Networks, config: ml_collections.ConfigDict, state: TrainState, batch_size, rng):
  """One generator update through the current D; returns (state, metrics)."""
  z_key, drop_key = jax.random.split(rng)
  z = jax.random.normal(z_key, (batch_size, nets.latent_dim))

  def loss_fn(g_params):
    fake, g_stats = _apply(nets.generator, g_params, state.g_batch_stats, z, train=True)
    # D's statistics from this pass are discarded: only its own update moves them.
    logits, _ = _apply(
      nets.discriminator,
      state.d_params,
      state.d_batch_stats,
      fake,
      train=True,
      rngs=nnx.Rngs(dropout=drop_key),
    )
    return losses.generator_loss(config.loss, logits), g_stats

  (g_loss, g_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.g_params)
  updates, opt_state = nets.g_optimizer.update(grads, state.g_opt_state, state.g_params)
  state = state.replace(
    g_params=optax.apply_updates(state.g_params, updates),
    g_batch_stats=g_stats,
    g_opt_state=opt_state,
  )
  return state, {"g_loss": g_loss, "g_grad_norm": optax.global_norm(grads)}


def train_step(nets: Networks, config: ml_collections.ConfigDict, state: TrainState, batch, rng):
  """`train.d_steps` discriminator updates, one generator update, and the EMA of G.

  Args:
    nets: the static graphs and optimisers.
    config: the `train` config section.
    state: the current TrainState.
    batch: {'image': float [B, R, R, 3] in [-1, 1], ...}; every D update sees this real batch.
    rng: this step's key, fold_in(state.rng, step).

  Returns:
    The new state and a dict of scalar metrics (device arrays; fetched by the caller when needed).
  """
  real = batch["image"]
  for i in range(config.d_steps):
    state, d_metrics = d_step(nets, config, state, real, jax.random.fold_in(rng, i))
  state, g_metrics = g_step(
    nets, config, state, real.shape[0], jax.random.fold_in(rng, config.d_steps)
  )

  # Warm-up as in tf.train.ExponentialMovingAverage: early samples follow the weights closely.
  step = state.step + 1
  decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
  ema_params = jax.tree.map(
    lambda e, p: decay * e + (1 - decay) * p, state.ema_params, state.g_params
  )
  metrics = {
    **d_metrics,
    **g_metrics,
    "g_param_norm": optax.global_norm(state.g_params),
    "d_param_norm": optax.global_norm(state.d_params),
    "g_lr": state.g_opt_state.hyperparams["learning_rate"],
    "d_lr": state.d_opt_state.hyperparams["learning_rate"],
  }
  return state.replace(step=step, ema_params=ema_params), metrics


def _fixed_noise(workdir: str, root_rng, nets: Networks, size: int) -> np.ndarray:
  """The noise batch behind every sample grid of a run, from the seed; saved in the workdir."""
  key = jax.random.fold_in(root_rng, _FIXED_NOISE_KEY)
  noise = np.asarray(jax.random.normal(key, (size, nets.latent_dim)))
  if parallel.is_main_process():
    np.save(os.path.join(workdir, "fixed_noise.npy"), noise)
  return noise


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
    f.write("\n")


# Adam settings a resumed run takes from a changed config: they live in the optimiser states,
# which a checkpoint restores (with whatever a rollback's remedy made of them).
_RESUMABLE = ("g_lr", "d_lr", "b1", "b2")


def _changed_settings(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """The `_RESUMABLE` train settings that `config` changes from the run's config.json:
  name -> (saved, new). Empty for a new run or an unchanged config."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    saved = json.load(f).get("train", {})
  changed = {}
  for name in _RESUMABLE:
    old, new = saved.get(name), float(config.train[name])
    if isinstance(old, int | float) and float(old) != new:
      changed[name] = (float(old), new)
  return changed


def _apply_changed_settings(state: TrainState, changed: dict[str, tuple]) -> TrainState:
  """A restored state with the settings a changed config asks for: each learning rate scaled by
  new / saved (so a rollback's reduction stays), b1 and b2 set."""
  if not changed:
    return state
  ratio = {name: new / old for name, (old, new) in changed.items()}
  rates = tuple(
    float(rate) * ratio.get(name, 1.0)
    for rate, name in zip(parallel.to_host(learning_rates(state)), ("g_lr", "d_lr"), strict=True)
  )
  betas = {name: (changed[name][1],) * 2 for name in ("b1", "b2") if name in changed}
  described = ", ".join(f"train.{k} {old:g} -> {new:g}" for k, (old, new) in changed.items())
  logging.info(
    "The config changes %s since the last run: resuming with learning rates %.3g / %.3g",
    described,
    *rates,
  )
  return with_hyperparams(state, learning_rate=rates, **betas)


def load_run(workdir: str, step: int | None = None):
  """The config, networks and state of a saved run, for sampling and evaluation.

  Args:
    workdir: a training run's workdir (config.json and checkpoints/).
    step: the checkpoint to load; None for the latest.

  Returns:
    (config, nets, state).

  Raises:
    UserError: when the workdir holds no run or no checkpoint at `step`.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"no training run in {workdir}: {path} does not exist")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  nets, state = create_train_state(config)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{workdir} holds no checkpoints yet")
    return config, nets, ckpt.restore(step, state)
  finally:
    ckpt.close()


def _restore(ckpt: checkpointing.Checkpointer, state: TrainState, restore_step: int | None):
  """Returns the state to start from: a chosen step, else the newest checkpoint that reads back
  whole (damaged newer ones are skipped with a warning and moved aside), else `state`."""
  if restore_step is not None:
    ckpt.require(restore_step)
    steps = [restore_step]
  else:
    steps = ckpt.all_steps()[::-1]
  if not steps:
    return state
  step, restored = ckpt.restore_first(steps, state)
  if step is None:
    raise UserError(
      f"no checkpoint in {ckpt.directory} can be read (steps {', '.join(map(str, steps))}); "
      "move the directory away to start afresh"
    )
  logging.info("Restored the checkpoint of step %d from %s", step, ckpt.directory)
  return restored


class _StopRequest:
  """Turns SIGTERM and SIGINT into a request to stop after the current step, with a save."""

  def __init__(self):
    self.name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # signals only reach it
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  @property
  def requested(self) -> bool:
    return self.name is not None

  def _handle(self, signum, frame):
    del frame
    self.name = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _noise(key: jax.Array, num: int, latent_dim: int) -> np.ndarray:
  return np.asarray(jax.random.normal(key, (num, latent_dim)))


def generate_many(sample_fn, params, batch_stats, noise: np.ndarray, chunk: int = 250):
  """Samples for a long noise batch, `chunk` at a time to bound memory.

  Args:
    sample_fn: jit(partial(generate, nets)).
    params, batch_stats: the generator's (usually state.ema_params, state.g_batch_stats).
    noise: [N, latent_dim].
    chunk: images per call.
  """
  return np.concatenate(
    [
      parallel.to_host(sample_fn(params, batch_stats, noise[i : i + chunk]))
      for i in range(0, len(noise), chunk)
    ]
  )


def _evaluator(config, real_images: np.ndarray, key: jax.Array) -> quality.Evaluator | None:
  if not config.eval.metrics:
    return None
  reference = fid.reference_key(
    config.data.source, config.data.resolution, len(real_images), extra=f"seed{config.train.seed}"
  )
  return quality.Evaluator(
    config.eval.metrics,
    real_images,
    key=key,
    reference=reference,
    inception_weights=config.eval.inception_weights,
  )


def _batches(config: ml_collections.ConfigDict, start_step: int):
  """This process's rows of each global batch from `start_step` on, as numpy."""
  return input_pipeline.create_dataset(
    config.data,
    batch_size=config.train.batch_size,
    seed=config.train.seed,
    start_step=start_step,
    rows=parallel.process_rows(config.train.batch_size),
  )


def _peek_images(batches, count: int):
  """The first `count` images of the global batches (the same on every process), and an
  iterator that still yields every batch of `batches`."""
  head = []
  while sum(len(b["image"]) for b in head) * jax.process_count() < count:
    head.append(next(batches))
  images = np.concatenate([parallel.gather_rows(b["image"]) for b in head])[:count]
  return images, itertools.chain(head, batches)


def learning_rates(state: TrainState) -> tuple[jax.Array, jax.Array]:
  """G's and D's learning rates, which live in the optimiser states."""
  return (
    state.g_opt_state.hyperparams["learning_rate"],
    state.d_opt_state.hyperparams["learning_rate"],
  )


def with_hyperparams(state: TrainState, **values) -> TrainState:
  """Sets Adam hyperparameters (learning_rate, b1, b2) of both optimisers: each keyword gives
  the pair (generator's, discriminator's)."""

  def update(opt_state, index):
    hyperparams = dict(opt_state.hyperparams)
    for name, pair in values.items():
      hyperparams[name] = jnp.full_like(hyperparams[name], pair[index])  # keeps its placement
    return opt_state._replace(hyperparams=hyperparams)

  return state.replace(
    g_opt_state=update(state.g_opt_state, 0), d_opt_state=update(state.d_opt_state, 1)
  )


def _roll_back(ckpt, abstract_state, fallen: TrainState, rollbacks: int, config, mesh, reasons):
  """Restores the newest healthy checkpoint before the `fallen` state, else the initial state
  (warm-up checkpoints were never judged: their generator may already be falling), and
  changes what made the run fall: a new
  random stream; learning rates collapse.lr_factor times the lower of the restored and the
  fallen state's, so repeated rollbacks keep lowering them even when they go back to the same
  checkpoint; and Adam's beta1 set to collapse.rollback_b1 when that is given.

  Returns:
    The state to carry on from and the rollback's record.
  """
  step = int(parallel.to_host(fallen.step))
  target, state = ckpt.restore_first(ckpt.healthy_steps(before=step), abstract_state)
  if target is None:
    _, state = create_train_state(config, mesh)
    ckpt.set_aside_after(0)
  state = state.replace(rng=jax.random.fold_in(state.rng, _ROLLBACK_KEY - rollbacks))
  rates = [
    jnp.minimum(restored, current) * config.collapse.lr_factor
    for restored, current in zip(learning_rates(state), learning_rates(fallen), strict=True)
  ]
  state = with_hyperparams(state, learning_rate=rates)
  event = {
    "from_step": step,
    "to_step": target or 0,
    "reason": "; ".join(reasons),
    "rollback": rollbacks + 1,
    "g_lr": float(parallel.to_host(rates[0])),
    "d_lr": float(parallel.to_host(rates[1])),
  }
  if config.collapse.rollback_b1 is not None:
    state = with_hyperparams(state, b1=[config.collapse.rollback_b1] * 2)
    event["b1"] = config.collapse.rollback_b1
  return state, event


def jit_train_step(nets: Networks, config, state: TrainState, mesh: jax.sharding.Mesh):
  """The jitted train step as the trainer runs it: the state donated and kept where `state` is
  placed, the metrics replicated over `mesh`."""
  return jax.jit(
    functools.partial(train_step, nets, config.train),
    donate_argnums=0,
    out_shardings=(jax.tree.map(lambda x: x.sharding, state), parallel.replicated(mesh)),
  )


def _compile_ahead(step_fn, state: TrainState, config, batch_sharding) -> concurrent.futures.Future:
  """Compiles `step_fn` for the state, batches and keys the loop will give it, in a thread, so
  that the compile runs while the input pipeline fills its shuffle buffer; jit keeps the result
  and the first step reuses it (were a spec to differ, that step would just compile again)."""
  size, resolution = config.train.batch_size, config.data.resolution
  batch = {
    "image": jax.ShapeDtypeStruct(
      (size, resolution, resolution, 3), jnp.float32, sharding=batch_sharding
    ),
    "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=batch_sharding),
  }
  key = jax.random.fold_in(state.rng, 0)  # made as the loop makes each step's key
  state, key = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, key)
  )
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
  future = pool.submit(lambda: step_fn.lower(state, batch, key).compile())
  pool.shutdown(wait=False)  # the compile runs on; the thread ends with it
  return future


def _rollback_hint(ckpt: checkpointing.Checkpointer, step: int) -> str:
  """Names the checkpoint a rollback by hand would best go back to."""
  steps = ckpt.healthy_steps(before=step)
  return f"the last healthy checkpoint is step {steps[0]}" if steps else "none was judged healthy"


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, timings: monitoring.Timings | None = None
) -> TrainState:
  """Trains per `config`, writing checkpoints, TensorBoard events and samples to `workdir`.

  Every `eval.every` steps the generator's health is judged (gan/collapse.py); on a collapse the
  run goes back to its last healthy checkpoint by itself and carries on with new random numbers.
  Where the time went is logged at the end and, given `timings`, filled in there.

  Returns:
    The final TrainState.

  Raises:
    UserError: for a bad config or data; CollapseError (one) when the run collapses with
      rollback off or more often than collapse.max_rollbacks.
  """
  started = time.perf_counter()
  timings = timings if timings is not None else monitoring.Timings()
  validate_config(config)
  mesh = parallel.create_mesh(config.mesh.data_axis_size)
  parallel.check_batch_size(config.train.batch_size, mesh)
  # The data source is checked before anything is written, so a bad path leaves no debris.
  input_pipeline.num_examples(config.data)
  nets, initial = create_train_state(config, mesh)
  step_fn = jit_train_step(nets, config, initial, mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  compiling = _compile_ahead(step_fn, initial, config, batch_sharding)
  root_rng = parallel.to_host(initial.rng)  # the seed's key, the same on every process
  changed = _changed_settings(workdir, config)
  parallel.sync("config read")  # by every process, before the main one writes the new one
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    _write_config(workdir, config)
  parallel.sync("workdir")

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  # Shapes, dtypes and placement to restore into; the state's own buffers are donated to steps.
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial
  )
  state = _restore(ckpt, initial, config.restore_step)
  step = int(parallel.to_host(state.step))
  if step:
    state = _apply_changed_settings(state, changed)
  num_steps = config.train.num_steps
  streak = int((ckpt.metrics(step) or {}).get("health/streak", 0)) if step else 0
  rollbacks = collapse.count_rollbacks(workdir)

  writer = monitoring.create_writer(workdir)
  if step == 0:
    writer.write_hparams(monitoring.flatten_config(config.to_dict()))
  noise = _fixed_noise(workdir, root_rng, nets, config.eval.grid_size)
  sample_fn = jax.jit(functools.partial(generate, nets))

  num_real = max(config.collapse.num_samples, config.eval.num_samples if config.eval.metrics else 0)
  real_images, batches = _peek_images(_batches(config, step), num_real)
  health_key = jax.random.fold_in(root_rng, _HEALTH_KEY)
  probe = collapse.HealthProbe(
    config,
    real_images[: config.collapse.num_samples],
    _noise(health_key, config.collapse.num_samples, nets.latent_dim),
    functools.partial(generate, nets),
    health_key,
  )
  eval_key = jax.random.fold_in(root_rng, _EVAL_KEY)
  eval_noise = _noise(eval_key, config.eval.num_samples, nets.latent_dim)
  evaluator = _evaluator(config, real_images[: config.eval.num_samples], eval_key)
  compiling.result()
  progress = monitoring.Progress(num_steps, config.train.batch_size, step)
  logging.info("Training from step %d to %d in %s", step, num_steps, workdir)
  pending = []  # metrics of the steps since the last fetch, still on the device
  scalars, health, scores = {}, {}, {}
  stop = _StopRequest()
  try:
    while step < num_steps:
      batch = parallel.global_batch(next(batches), batch_sharding)
      state, metrics = step_fn(state, batch, jax.random.fold_in(state.rng, step))
      step += 1
      pending.append(metrics)
      if timings.first_step:
        timings.steps += 1
      else:  # one wait, once: when the first step is done
        jax.block_until_ready(metrics)
        timings.first_step = time.perf_counter() - started
        logging.info(
          "First step done %.1f s after the start (compile included)", timings.first_step
        )
      last = step == num_steps

      nonfinite = False
      logged = step % config.train.log_every == 0 or last
      if logged:
        fetched = parallel.to_host(pending)
        pending = []
        scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        nonfinite = not all(np.isfinite(v) for v in scalars.values())
        scalars["images_per_second"] = progress.images_per_second(step)
        writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        progress.log(step, scalars["images_per_second"], scalars)

      with progress.paused():
        if step % config.eval.every == 0 or last or nonfinite:
          with timings.evaluation():
            images = sample_fn(state.ema_params, state.g_batch_stats, noise)
            grid = sampling.make_grid(parallel.to_host(images))
            writer.write_images(step, {"samples": grid[None]})
            if parallel.is_main_process():
              sampling.save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid)

            if evaluator is not None and not nonfinite:
              fake = generate_many(sample_fn, state.ema_params, state.g_batch_stats, eval_noise)
              scores = {f"eval/{k}": v for k, v in evaluator(fake).items()}
              writer.write_scalars(step, scores)
            signals = {**probe(state.g_params, state.g_batch_stats), "nonfinite": float(nonfinite)}
            judgement = collapse.judge(signals, config.collapse, streak, step)
            streak = judgement.streak
            verdict = collapse.VERDICTS.index(judgement.verdict)
            health = {f"health/{k}": v for k, v in signals.items()}
            health.update({checkpointing.VERDICT: verdict, "health/streak": streak})
            writer.write_scalars(step, health)
            if judgement.verdict in (collapse.SUSPECT, collapse.COLLAPSED):
              logging.warning(
                "Step %d: %s: %s", step, judgement.verdict, "; ".join(judgement.reasons)
              )

            if judgement.verdict == collapse.COLLAPSED:
              if not config.collapse.rollback or rollbacks >= config.collapse.max_rollbacks:
                why = (
                  "rollback is off (collapse.rollback)"
                  if not config.collapse.rollback
                  else f"after {rollbacks} rollbacks (collapse.max_rollbacks)"
                )
                raise collapse.CollapseError(
                  f"training collapsed at step {step} ({'; '.join(judgement.reasons)}) {why}; "
                  f"{_rollback_hint(ckpt, step)}",
                  step=step,
                  signals=signals,
                )
              ckpt.wait()
              state, event = _roll_back(
                ckpt, abstract, state, rollbacks, config, mesh, judgement.reasons
              )
              rollbacks += 1
              if parallel.is_main_process():
                collapse.record_rollback(workdir, event)
              writer.write_texts(step, {"collapse/rollback": json.dumps(event)})
              writer.write_scalars(step, {"collapse/rollbacks": rollbacks})
              logging.warning(
                "Rolled back from step %d to step %d (rollback %d of at most %d): %s",
                event["from_step"],
                event["to_step"],
                rollbacks,
                config.collapse.max_rollbacks,
                event["reason"],
              )
              step, streak, pending = event["to_step"], 0, []
              batches = _batches(config, step)
              continue

        # With several processes, all stop at the same step: they agree when they log.
        stopping = (
          stop.requested if jax.process_count() == 1 else logged and parallel.agree(stop.requested)
        )
        if step % config.checkpoint.every == 0 or last or stopping:
          with timings.checkpoint():
            ckpt.save(step, state, {**scalars, **health, **scores})
      if stopping:
        logging.warning("Stopped by %s after step %d, saved; run again to resume", stop.name, step)
        break
  except BaseException:
    # Let saves in flight finish (or fail) now, not in threads cut off at interpreter exit;
    # the error that brought us here is the one to report.
    with contextlib.suppress(Exception):
      ckpt.close()
    with contextlib.suppress(Exception):
      writer.close()
    raise
  finally:
    stop.restore()
  if timings.first_step:
    after_first = time.perf_counter() - started - timings.first_step
    timings.step_seconds = after_first - sum(timings.evaluations) - sum(timings.checkpoints)
  writer.flush()
  ckpt.wait()
  ckpt.close()
  writer.close()
  logging.info("Done: step %d of %d; checkpoints in %s", step, num_steps, ckpt.directory)
  logging.info("Time: %s", timings.summary())
  return state
