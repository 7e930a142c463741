"""The pure train step: discriminator updates, a generator update and G's moving average.

Every function here takes the static `Networks` and the `train` config section first, then
pytrees; `train_step(nets, config, state, batch, rng) -> (state, metrics)` is what the trainer
jits (with the state donated) and `generate` what sampling and evaluation call.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from gan import losses
from gan.state import NetState, Networks, TrainState


def _apply(graph, net: NetState | dict, x, *, params=None, rngs=None, **kwargs):
  """Runs a network in training mode on `x`; returns its output and its updated batch stats.
  `params` stands in for the state's own (for the gradient's argument, or the EMA weights)."""
  params = net.params if params is None else params
  module = nnx.merge(graph, params, net.batch_stats)
  out = module(x, train=True, rngs=rngs, **kwargs) if rngs is not None else module(x, train=True)
  return out, nnx.state(module, nnx.BatchStat).to_pure_dict()


def generate(nets: Networks, params, batch_stats, z: jax.Array) -> jax.Array:
  """G's images [N, R, R, 3] in [-1, 1] for noise `z` [N, latent_dim].

  Normalised with the batch's own statistics rather than the running averages: those belong to
  the raw weights, not to their EMA, and are poor early in training (the PyTorch DCGAN example
  samples the same way).
  """
  module = nnx.merge(nets.generator, params, batch_stats)
  return module(z, train=True)


def discriminator_loss(nets: Networks, loss: str, d: NetState, params, real, fake, key):
  """D's loss on a real and a generated batch; returns it with (new batch stats, logits)."""
  rngs = nnx.Rngs(dropout=key)
  real_logits, stats = _apply(nets.discriminator, d, real, params=params, rngs=rngs)
  d = d.replace(batch_stats=stats)
  fake_logits, stats = _apply(nets.discriminator, d, fake, params=params, rngs=rngs)
  d_loss = losses.discriminator_loss(loss, real_logits, fake_logits)
  return d_loss, (stats, real_logits, fake_logits)


def _update(net: NetState, optimizer, grads, batch_stats) -> NetState:
  updates, opt_state = optimizer.update(grads, net.opt_state, net.params)
  return NetState(optax.apply_updates(net.params, updates), batch_stats, opt_state)


def d_step(nets: Networks, config: ml_collections.ConfigDict, state: TrainState, real, rng):
  """One discriminator update against a fresh generated batch; returns (state, metrics)."""
  z_key, drop_key = jax.random.split(rng)
  z = jax.random.normal(z_key, (real.shape[0], nets.latent_dim))
  fake, g_stats = _apply(nets.generator, state.g, z)
  (d_loss, (d_stats, real_logits, fake_logits)), grads = jax.value_and_grad(
    discriminator_loss, argnums=3, has_aux=True
  )(nets, config.loss, state.d, state.d.params, real, jax.lax.stop_gradient(fake), drop_key)
  state = state.replace(
    d=_update(state.d, nets.d_optimizer, grads, d_stats),
    g=state.g.replace(batch_stats=g_stats),
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
    fake, g_stats = _apply(nets.generator, state.g, z, params=g_params)
    # D's statistics from this pass are discarded: only its own update moves them.
    logits, _ = _apply(nets.discriminator, state.d, fake, rngs=nnx.Rngs(dropout=drop_key))
    return losses.generator_loss(config.loss, logits), g_stats

  (g_loss, g_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.g.params)
  state = state.replace(g=_update(state.g, nets.g_optimizer, grads, g_stats))
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
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, state.g.params)
  metrics = {
    **d_metrics,
    **g_metrics,
    "g_param_norm": optax.global_norm(state.g.params),
    "d_param_norm": optax.global_norm(state.d.params),
    "g_lr": state.g.opt_state.hyperparams["learning_rate"],
    "d_lr": state.d.opt_state.hyperparams["learning_rate"],
  }
  return state.replace(step=step, ema=ema), metrics
