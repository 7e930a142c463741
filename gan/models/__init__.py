"""The generator and discriminator of each family, built from the config's `model` section.

Both networks are NNX modules whose whole state is `nnx.Param` + `nnx.BatchStat`, so
`graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)` captures them and
`nnx.merge` inside jit rebuilds them; dropout keys come with each call, never from the module.
Inside a function that `jax.grad` differentiates, merge pure dicts (`State.to_pure_dict()`) or
pass `copy=True`: BatchNorm writes its statistics there, and State Variables that come from an
enclosing trace cannot be written in it (TraceContextError).

    generator(z, *, train) -> images [B, R, R, 3] in [-1, 1], float32
    discriminator(x, *, train, rngs=None) -> logits [B], float32

`model.conv_impl` says what computes the layers (`resolve_conv_impl`); nothing else here depends
on it.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from gan.errors import UserError
from gan.models import dcgan, dense, layers

MODEL_NAMES = ("dcgan", "dense")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# 'xla': the layers as defined, compiled by XLA for any backend; 'onednn': the CPU kernels of the
# optional package gan_cpu_kernels (kernels/); 'auto': the kernels where they run, else xla.
CONV_IMPLS = ("auto", "xla", "onednn")


def _why_not_onednn(dtype: str) -> str | None:
  """Why the CPU kernels cannot run the layers computing in `dtype` here, or None if they can."""
  backend = jax.default_backend()
  if backend != "cpu":
    return f"the default backend is {backend}, and the kernels are for the CPU"
  try:
    kernels = layers.cpu_kernels()
  except ImportError as error:
    return f"gan_cpu_kernels is not installed ({error}); `make setup` installs it on x86-64 Linux"
  if not kernels.supports(dtype, jnp.float32):
    return f"gan_cpu_kernels has no {dtype} convolutions on this CPU"
  return None


def resolve_conv_impl(conv_impl: str, dtype: str) -> str:
  """What computes the layers for `model.conv_impl` and `model.dtype` on this machine.

  Returns:
    'xla' or 'onednn': 'auto' is 'onednn' where gan_cpu_kernels imports, the default backend is
    the CPU and the kernels support `dtype` (parameters float32), else 'xla'.

  Raises:
    UserError: for an unknown conv_impl, or 'onednn' where it cannot run (saying why).
  """
  if conv_impl not in CONV_IMPLS:
    raise UserError(
      f"Unknown model.conv_impl {conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}."
    )
  if conv_impl == "xla":
    return "xla"
  why_not = _why_not_onednn(dtype)
  if why_not is None:
    return "onednn"
  if conv_impl == "onednn":
    raise UserError(f"model.conv_impl=onednn cannot run here: {why_not}. Use model.conv_impl=xla.")
  logging.info("model.conv_impl=auto: xla, since %s.", why_not)
  return "xla"


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
  """Returns (generator, discriminator) for model_config.name in {'dcgan', 'dense'}, computed
  as model_config.conv_impl says (resolved here if it is 'auto').

  Raises:
    UserError: for an unknown name, dtype, activation, norm or conv_impl, bad widths, a
      resolution the architecture cannot make, or conv_impl 'onednn' where it cannot run.
  """
  name = model_config.get("name")
  if name not in MODEL_NAMES:
    raise UserError(f"Unknown model.name {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
  _check_resolution(name, resolution)
  latent_dim = _positive_int(model_config, "latent_dim")
  dtype_name = _choice(model_config, "dtype", tuple(DTYPES))
  dtype = DTYPES[dtype_name]
  conv_impl = resolve_conv_impl(_field(model_config, "conv_impl"), dtype_name)

  if name == "dcgan":
    base_width = _positive_int(model_config, "base_width")
    generator = dcgan.Generator(
      latent_dim=latent_dim,
      resolution=resolution,
      base_width=base_width,
      conv_impl=conv_impl,
      dtype=dtype,
      rngs=rngs,
    )
    discriminator = dcgan.Discriminator(
      resolution=resolution, base_width=base_width, conv_impl=conv_impl, dtype=dtype, rngs=rngs
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
      conv_impl=conv_impl,
      dtype=dtype,
      rngs=rngs,
    )
    discriminator = dense.Discriminator(
      resolution=resolution,
      widths=_widths(model_config, "d_widths"),
      norm=_choice(model_config, "d_norm", dense.D_NORMS),
      dropout=float(dropout),
      conv_impl=conv_impl,
      dtype=dtype,
      rngs=rngs,
    )
  return generator, discriminator


def count_params(model: nnx.Module) -> int:
  """The number of trainable parameters (works on abstract models from nnx.eval_shape too)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
