"""The generator and discriminator of each family, built from the config's `model` section.

Both networks are NNX modules whose whole state is `nnx.Param` + `nnx.BatchStat`, so
`graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)` captures them and
`nnx.merge` inside jit rebuilds them; dropout keys come with each call, never from the module.
Inside a function that `jax.grad` differentiates, merge pure dicts (`State.to_pure_dict()`) or
pass `copy=True`: BatchNorm writes its statistics there, and State Variables that come from an
enclosing trace cannot be written in it (TraceContextError).

    generator(z, *, train) -> images [B, R, R, 3] in [-1, 1], float32
    discriminator(x, *, train, rngs=None) -> logits [B / model.d_pack], float32

D's options against collapse (`model.d_spectral_norm`, `model.d_minibatch_std`, `model.d_pack`)
are off where a config has none, as in a run recorded before they existed. Spectral norm's
power-iteration state is `nnx.BatchStat` too.

`model.conv_impl` says what computes the layers (`resolve_conv_impl`); nothing else here depends
on it.
"""

import math

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
ACTIVATIONS = tuple(layers.ACTIVATIONS)
G_NORMS, D_NORMS = dense.G_NORMS, dense.D_NORMS
DCGAN_D_NORMS = dcgan.D_NORMS


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


# D's options against collapse as a config without them means them: off (a run recorded before
# they existed, or a model section built by hand). Only the DCGAN D reads d_norm from here.
D_OPTIONS_OFF = {"d_norm": "batch", "d_spectral_norm": False, "d_minibatch_std": False, "d_pack": 1}


def d_options(model_config: ml_collections.ConfigDict) -> dict:
  """D's options against collapse, as the discriminators' keyword arguments."""

  def get(name):
    return model_config.get(name, D_OPTIONS_OFF[name])

  return dict(
    spectral_norm=bool(get("d_spectral_norm")),
    minibatch_std=bool(get("d_minibatch_std")),
    pack=int(get("d_pack")),
  )


def create_models(
  model_config: ml_collections.ConfigDict, resolution: int, *, rngs: nnx.Rngs
) -> tuple[nnx.Module, nnx.Module]:
  """Returns (generator, discriminator) for model_config.name in {'dcgan', 'dense'}, computed
  as model_config.conv_impl says (resolved here if it is 'auto').

  The config is trusted: `gan.config.validate` checks it (with the resolution) before any run.

  Raises:
    UserError: for conv_impl 'onednn' where it cannot run.
  """
  dtype = DTYPES[model_config.dtype]
  conv_impl = resolve_conv_impl(model_config.conv_impl, model_config.dtype)
  common = dict(resolution=resolution, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
  if model_config.name == "dcgan":
    width = model_config.base_width
    return (
      dcgan.Generator(latent_dim=model_config.latent_dim, base_width=width, **common),
      dcgan.Discriminator(
        base_width=width,
        norm=model_config.get("d_norm", D_OPTIONS_OFF["d_norm"]),
        **d_options(model_config),
        **common,
      ),
    )
  return (
    dense.Generator(
      latent_dim=model_config.latent_dim,
      widths=tuple(model_config.g_widths),
      activation=model_config.activation,
      norm=model_config.g_norm,
      **common,
    ),
    dense.Discriminator(
      widths=tuple(model_config.d_widths),
      norm=model_config.d_norm,
      dropout=float(model_config.d_dropout),
      **d_options(model_config),
      **common,
    ),
  )


def count_params(model: nnx.Module) -> int:
  """The number of trainable parameters (works on abstract models from nnx.eval_shape too)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
