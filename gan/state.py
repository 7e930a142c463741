"""The train state: one pytree holding everything that decides a run's future.

    TrainState
      step        generator updates done
      rng         the root key (typed, of `train.prng_impl`); step keys are fold_in(rng, step)
      g, d        NetState each: params, batch_stats (BatchNorm's, and spectral norm's power
                  iteration), opt_state
      ema         exponential moving average of g.params, used for samples and evaluation

It is a plain pytree of arrays: Orbax saves it as it is, sharding places it, and a rollback
restores it. The static half of a run (the module graphs and the optimisers) is `Networks`.
"""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from gan import models, parallel

# Keys folded into the root key for purposes other than a train step (steps use their number).
INIT_KEY = 2**32 - 1
FIXED_NOISE_KEY = 2**32 - 2
HEALTH_KEY = 2**32 - 3
EVAL_KEY = 2**32 - 4
ROLLBACK_KEY = 2**32 - 5  # minus the number of earlier rollbacks


@flax.struct.dataclass
class NetState:
  """One network's trainable state: what its optimiser updates and what BatchNorm (and spectral
  norm's power iteration) tracks."""

  params: dict
  batch_stats: dict
  opt_state: optax.OptState


@flax.struct.dataclass
class TrainState:
  """Everything that decides a run's future; Orbax saves it and rollback restores it."""

  step: jax.Array
  rng: jax.Array
  g: NetState
  d: NetState
  ema: dict


@dataclasses.dataclass(frozen=True)
class Networks:
  """The static half of a run: the module graphs and optimisers that act on a TrainState."""

  generator: nnx.GraphDef
  discriminator: nnx.GraphDef
  g_optimizer: optax.GradientTransformation
  d_optimizer: optax.GradientTransformation
  latent_dim: int
  d_pack: int = 1  # images D judges together (PacGAN): its logits are [batch / d_pack]


def root_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The run's root key: from `train.seed`, of the generator `train.prng_impl` names."""
  return jax.random.key(config.train.seed, impl=config.train.prng_impl)


def _adam(config: ml_collections.ConfigDict, learning_rate: float):
  # The learning rate lives in the optimiser state, so it is saved, logged and can be changed.
  return optax.inject_hyperparams(optax.adam)(
    learning_rate=learning_rate, b1=config.train.b1, b2=config.train.b2
  )


def _net_state(module: nnx.Module, optimizer: optax.GradientTransformation) -> NetState:
  params = nnx.state(module, nnx.Param).to_pure_dict()
  return NetState(
    params=params,
    batch_stats=nnx.state(module, nnx.BatchStat).to_pure_dict(),
    opt_state=optimizer.init(params),
  )


def create_train_state(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[Networks, TrainState]:
  """Builds the networks and their initial state from `config.train.seed`, replicated over
  `mesh` when one is given (else on the default device). `config` must be validated."""

  def build(key):
    return models.create_models(config.model, config.data.resolution, rngs=nnx.Rngs(key))

  # The graphs come from shapes alone; the values are made under jit, which is several times
  # faster on CPU than running each initialiser eagerly.
  abstract_g, abstract_d = nnx.eval_shape(lambda: build(jax.random.key(0)))
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
    d_pack=models.d_options(config.model)["pack"],
  )

  @functools.partial(jax.jit, out_shardings=mesh and parallel.replicated(mesh))
  def init(rng):
    generator, discriminator = build(jax.random.fold_in(rng, INIT_KEY))
    g = _net_state(generator, nets.g_optimizer)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      rng=rng,
      g=g,
      d=_net_state(discriminator, nets.d_optimizer),
      ema=g.params,
    )

  return nets, init(root_key(config))


def learning_rates(state: TrainState) -> tuple[jax.Array, jax.Array]:
  """G's and D's learning rates, which live in the optimiser states."""
  return tuple(net.opt_state.hyperparams["learning_rate"] for net in (state.g, state.d))


def with_hyperparams(state: TrainState, **values) -> TrainState:
  """Sets Adam hyperparameters (learning_rate, b1, b2) of both optimisers: each keyword gives
  the pair (generator's, discriminator's)."""

  def update(net: NetState, index: int) -> NetState:
    hyperparams = dict(net.opt_state.hyperparams)
    for name, pair in values.items():
      hyperparams[name] = jnp.full_like(hyperparams[name], pair[index])  # keeps its placement
    return net.replace(opt_state=net.opt_state._replace(hyperparams=hyperparams))

  return state.replace(g=update(state.g, 0), d=update(state.d, 1))


def abstract(state: TrainState) -> TrainState:
  """The state's shapes, dtypes and placement: what a checkpoint is restored into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
