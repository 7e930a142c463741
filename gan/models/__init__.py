"""The generator and discriminator of each family, built from the config's `model` section.

Both networks are NNX modules whose whole state is `nnx.Param` + `nnx.BatchStat`, so
`graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)` captures them and
`nnx.merge` inside jit rebuilds them; dropout keys come with each call, never from the module.
Inside a function that `jax.grad` differentiates, merge pure dicts (`State.to_pure_dict()`) or
pass `copy=True`: BatchNorm writes its statistics there, and State Variables that come from an
enclosing trace cannot be written in it (TraceContextError).

    generator(z, *, train) -> images [B, R, R, 3] in [-1, 1], float32
    discriminator(x, *, train, rngs=None) -> logits [B], float32
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gan.errors import UserError
from gan.models import dcgan, dense, layers

MODEL_NAMES = ("dcgan", "dense")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _field(model_config: ml_collections.ConfigDict, name: str):
  if name not in model_config:
    raise UserError(f"The config has no model.{name}, which model {model_config.name!r} needs.")
  return model_config[name]


def _positive_int(model_config: ml_collections.ConfigDict, name: str) -> int:
  value = _field(model_config, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserError(f"model.{name} must be a positive integer, got {value!r}.")
  return value


def _widths(model_config: ml_collections.ConfigDict, name: str) -> tuple[int, ...]:
  value = _field(model_config, name)
  if (
    not isinstance(value, Sequence)
    or not value
    or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in value)
  ):
    raise UserError(f"model.{name} must be a non-empty tuple of positive integers, got {value!r}.")
  return tuple(value)


def _choice(model_config: ml_collections.ConfigDict, name: str, choices: Sequence[str]) -> str:
  value = _field(model_config, name)
  if value not in choices:
    raise UserError(f"Unknown model.{name} {value!r}; choose one of {', '.join(choices)}.")
  return value


def _check_resolution(name: str, resolution: int) -> None:
  if isinstance(resolution, bool) or not isinstance(resolution, int):
    raise UserError(f"The resolution must be an integer, got {resolution!r}.")
  if name == "dcgan" and (resolution < 16 or resolution & (resolution - 1)):
    raise UserError(
      f"dcgan cannot make {resolution} px images: it doubles 4x4 up, so the resolution must be "
      "a power of two >= 16 (e.g. 32, 64, 128)."
    )
  if name == "dense" and resolution < 8:
    raise UserError(f"dense cannot make {resolution} px images: the resolution must be >= 8.")


def create_models(
  model_config: ml_collections.ConfigDict, resolution: int, *, rngs: nnx.Rngs
) -> tuple[nnx.Module, nnx.Module]:
  """Returns (generator, discriminator) for model_config.name in {'dcgan', 'dense'}.

  Raises:
    UserError: for an unknown name, dtype, activation or norm, bad widths, or a resolution the
      architecture cannot make.
  """
  name = model_config.get("name")
  if name not in MODEL_NAMES:
    raise UserError(f"Unknown model.name {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
  _check_resolution(name, resolution)
  latent_dim = _positive_int(model_config, "latent_dim")
  dtype = DTYPES[_choice(model_config, "dtype", tuple(DTYPES))]

  if name == "dcgan":
    base_width = _positive_int(model_config, "base_width")
    generator = dcgan.Generator(
      latent_dim=latent_dim, resolution=resolution, base_width=base_width, dtype=dtype, rngs=rngs
    )
    discriminator = dcgan.Discriminator(
      resolution=resolution, base_width=base_width, dtype=dtype, rngs=rngs
    )
  else:
    dropout = _field(model_config, "d_dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
      raise UserError(f"model.d_dropout must be a rate in [0, 1), got {dropout!r}.")
    generator = dense.Generator(
      latent_dim=latent_dim,
      resolution=resolution,
      widths=_widths(model_config, "g_widths"),
      activation=_choice(model_config, "activation", tuple(layers.ACTIVATIONS)),
      norm=_choice(model_config, "g_norm", dense.G_NORMS),
      dtype=dtype,
      rngs=rngs,
    )
    discriminator = dense.Discriminator(
      resolution=resolution,
      widths=_widths(model_config, "d_widths"),
      norm=_choice(model_config, "d_norm", dense.D_NORMS),
      dropout=float(dropout),
      dtype=dtype,
      rngs=rngs,
    )
  return generator, discriminator


def count_params(model: nnx.Module) -> int:
  """The number of trainable parameters (works on abstract models from nnx.eval_shape too)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
