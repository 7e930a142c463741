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
from gan.models import augment
from gan.state import NetState, Networks, TrainState

# Folded into an update's key for its other draws (its split gives the noise and dropout keys).
_AUGMENT_KEY = 2**32 - 1
_PENALTY_KEY = 2**32 - 2


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


def _augment(config: ml_collections.ConfigDict, images, rng):
  """`images` through `train.diffaugment`'s transforms, drawn from an update's key `rng` (the
  images as they are when it is ''): real and generated batches of one update get the same."""
  if not config.diffaugment:
    return images
  return augment.augment(images, config.diffaugment, jax.random.fold_in(rng, _AUGMENT_KEY))


def _input_gradient_norms(nets: Networks, d: NetState, params, x, key):
  """The squared norm of the gradient of D's logits with respect to its inputs, one per logit
  (a pack of `nets.d_pack` images); D's statistics from this pass are discarded."""

  def total(inputs):
    logits, _ = _apply(nets.discriminator, d, inputs, params=params, rngs=nnx.Rngs(dropout=key))
    return jnp.sum(logits)

  grads = jax.grad(total)(x).astype(jnp.float32)
  return jnp.sum(jnp.square(grads).reshape(x.shape[0] // nets.d_pack, -1), axis=1)


def _gradient_penalty(nets: Networks, config, d: NetState, params, real, fake, key):
  """WGAN-GP's penalty at random points between the real and the generated inputs: one point of
  the line between each real and generated pack."""
  mix_key, drop_key = jax.random.split(key)
  mix = jax.random.uniform(mix_key, (real.shape[0] // nets.d_pack, 1, 1, 1))
  mix = jnp.repeat(mix, nets.d_pack, axis=0)
  between = mix * real + (1 - mix) * fake
  norms = _input_gradient_norms(nets, d, params, between, drop_key)
  return losses.gradient_penalty(norms, config.gp_gamma)


def discriminator_loss(nets: Networks, config, d: NetState, params, real, fake, key):
  """D's loss on a real and a generated batch (with wgan_gp's penalty); returns it with (new
  batch stats, real logits, fake logits, {penalty name: value}). `config` is `train`."""
  rngs = nnx.Rngs(dropout=key)
  real_logits, stats = _apply(nets.discriminator, d, real, params=params, rngs=rngs)
  d = d.replace(batch_stats=stats)
  fake_logits, stats = _apply(nets.discriminator, d, fake, params=params, rngs=rngs)
  d_loss = losses.discriminator_loss(config.loss, real_logits, fake_logits)
  penalties = {}
  if config.loss == "wgan_gp":
    d = d.replace(batch_stats=stats)
    penalty_key = jax.random.fold_in(key, _PENALTY_KEY)
    penalties["d_gp"] = _gradient_penalty(nets, config, d, params, real, fake, penalty_key)
    d_loss = d_loss + penalties["d_gp"]
  return d_loss, (stats, real_logits, fake_logits, penalties)


def _r1(nets: Networks, config, d: NetState, real, key):
  """R1's value and gradient for D's params on this update: `train.r1_every` times the penalty on
  every r1_every-th D update, nothing between (StyleGAN2's lazy regularisation)."""

  def penalty(params):
    norms = _input_gradient_norms(nets, d, params, real, key)
    return losses.r1_penalty(norms, config.r1_gamma * config.r1_every)

  def skip(params):
    return jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params)

  due = d.opt_state.count % config.r1_every == 0  # D updates done so far
  return jax.lax.cond(due, jax.value_and_grad(penalty), skip, d.params)


def _update(net: NetState, optimizer, grads, batch_stats) -> NetState:
  updates, opt_state = optimizer.update(grads, net.opt_state, net.params)
  return NetState(optax.apply_updates(net.params, updates), batch_stats, opt_state)


def d_step(nets: Networks, config: ml_collections.ConfigDict, state: TrainState, real, rng):
  """One discriminator update against a fresh generated batch; returns (state, metrics)."""
  z_key, drop_key = jax.random.split(rng)
  z = jax.random.normal(z_key, (real.shape[0], nets.latent_dim))
  fake, g_stats = _apply(nets.generator, state.g, z)
  real, fake = (_augment(config, x, rng) for x in (real, jax.lax.stop_gradient(fake)))
  (d_loss, (d_stats, real_logits, fake_logits, penalties)), grads = jax.value_and_grad(
    discriminator_loss, argnums=3, has_aux=True
  )(nets, config, state.d, state.d.params, real, fake, drop_key)
  if config.r1_gamma > 0:
    d = state.d.replace(batch_stats=d_stats)
    penalties["d_r1"], r1_grads = _r1(nets, config, d, real, jax.random.fold_in(rng, _PENALTY_KEY))
    grads = jax.tree.map(jnp.add, grads, r1_grads)
  state = state.replace(
    d=_update(state.d, nets.d_optimizer, grads, d_stats),
    g=state.g.replace(batch_stats=g_stats),
  )
  metrics = {
    "d_loss": d_loss,
    "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
    "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
    "d_grad_norm": optax.global_norm(grads),
    **penalties,
  }
  return state, metrics


def g_step(nets: Networks, config: ml_collections.ConfigDict, state: TrainState, batch_size, rng):
  """One generator update through the current D; returns (state, metrics)."""
  z_key, drop_key = jax.random.split(rng)
  z = jax.random.normal(z_key, (batch_size, nets.latent_dim))

  def loss_fn(g_params):
    fake, g_stats = _apply(nets.generator, state.g, z, params=g_params)
    fake = _augment(config, fake, rng)
    # D's statistics from this pass are discarded: only its own update moves them.
    logits, _ = _apply(nets.discriminator, state.d, fake, rngs=nnx.Rngs(dropout=drop_key))
    return losses.generator_loss(config.loss, logits), g_stats

  (g_loss, g_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.g.params)
  state = state.replace(g=_update(state.g, nets.g_optimizer, grads, g_stats))
  return state, {"g_loss": g_loss, "g_grad_norm": optax.global_norm(grads)}


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """The EMA's decay per step after `step` steps: a half-life of `ema_kimg` thousand images,
  or of `ema_rampup` times the images trained on, whichever is shorter (StyleGAN2-ADA)."""
  if config.ema_kimg == 0:
    return jnp.float32(0.0)  # no EMA: it follows the weights
  batch = config.batch_size
  half_life = jnp.float32(config.ema_kimg * 1000)
  if config.ema_rampup:
    half_life = jnp.minimum(half_life, step * batch * config.ema_rampup)
  return 0.5 ** (batch / jnp.maximum(half_life, 1e-8))


def train_step(nets: Networks, config: ml_collections.ConfigDict, state: TrainState, batch, rng):
  """`train.d_steps` discriminator updates, one generator update, and the EMA of G.

  Args:
    nets: the static graphs and optimisers.
    config: the `train` config section.
    state: the current TrainState.
    batch: {'image': float [B, R, R, 3] in [-1, 1], ...}; every D update sees this real batch.
    rng: this step's key, fold_in(state.rng, step).

  Returns:
    The new state and a dict of scalar metrics (device arrays; fetched by the caller when needed);
    D's are means over its updates, so a lazy penalty counts however many updates carried it.
  """
  real = batch["image"]
  d_updates = []
  for i in range(config.d_steps):
    state, metrics = d_step(nets, config, state, real, jax.random.fold_in(rng, i))
    d_updates.append(metrics)
  d_metrics = jax.tree.map(lambda *values: sum(values) / len(values), *d_updates)
  state, g_metrics = g_step(
    nets, config, state, real.shape[0], jax.random.fold_in(rng, config.d_steps)
  )

  step = state.step + 1
  decay = ema_decay(config, step)
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
