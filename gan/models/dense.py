"""The dense family: multilayer perceptrons for G and D (Goodfellow et al., 2014, in shape).

G: z -> [Linear -> norm -> activation] per g_width -> Linear to R*R*3 -> tanh -> reshape.
D: flatten -> [Linear -> norm -> LeakyReLU(0.2) -> Dropout] per d_width -> Linear to one logit.

Initialisation is Flax's default (LeCun normal kernels, zero biases). A Linear followed by
BatchNorm has no bias (BN's own bias makes it redundant); the others do.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gan.models import layers

G_NORMS = ("none", "batch", "layer")
D_NORMS = ("none", "layer")


def _norm(kind: str, features: int, dtype, rngs: nnx.Rngs) -> nnx.Module | None:
  if kind == "batch":
    # PyTorch's default momentum (flax counts the running average's weight, not the batch's).
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
  if kind == "layer":
    return nnx.LayerNorm(features, dtype=dtype, rngs=rngs)
  return None


def _apply_norm(norm: nnx.Module | None, x: jax.Array, train: bool) -> jax.Array:
  if norm is None:
    return x
  if isinstance(norm, nnx.BatchNorm):
    return norm(x, use_running_average=not train)
  return norm(x)


class Generator(nnx.Module):
  """Maps z [B, latent_dim] to images [B, R, R, 3] in [-1, 1], float32."""

  def __init__(
    self,
    *,
    latent_dim: int,
    resolution: int,
    widths: tuple[int, ...],
    activation: str,
    norm: str,
    conv_impl: str,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.resolution = resolution
    self.activation = layers.get_activation(activation)
    self.dtype = dtype
    hidden, norms = [], []
    in_features = latent_dim
    for width in widths:
      hidden.append(
        layers.Linear(
          in_features,
          width,
          use_bias=norm != "batch",
          conv_impl=conv_impl,
          dtype=dtype,
          rngs=rngs,
        )
      )
      norms.append(_norm(norm, width, dtype, rngs))
      in_features = width
    self.hidden = nnx.List(hidden)
    self.norms = nnx.List(norms)
    self.to_pixels = layers.Linear(
      in_features, resolution * resolution * 3, conv_impl=conv_impl, dtype=dtype, rngs=rngs
    )

  def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
    x = z.astype(self.dtype)
    for linear, norm in zip(self.hidden, self.norms, strict=True):
      x = self.activation(_apply_norm(norm, linear(x), train))
    x = jnp.tanh(self.to_pixels(x)).astype(jnp.float32)
    return x.reshape(z.shape[0], self.resolution, self.resolution, 3)


class Discriminator(nnx.Module):
  """Maps images [B, R, R, 3] to logits [B], float32.

  Dropout is on only with train=True and then draws from `rngs`' 'dropout' stream.
  """

  def __init__(
    self,
    *,
    resolution: int,
    widths: tuple[int, ...],
    norm: str,
    dropout: float,
    conv_impl: str,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    hidden, norms = [], []
    in_features = resolution * resolution * 3
    for width in widths:
      hidden.append(layers.Linear(in_features, width, conv_impl=conv_impl, dtype=dtype, rngs=rngs))
      norms.append(_norm(norm, width, dtype, rngs))
      in_features = width
    self.hidden = nnx.List(hidden)
    self.norms = nnx.List(norms)
    # No rngs stored: the key comes with each call, so the model's state is Param + BatchStat.
    self.dropout = nnx.Dropout(dropout)
    self.to_logit = layers.Linear(in_features, 1, conv_impl=conv_impl, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    if train and self.dropout.rate > 0 and rngs is None:
      raise ValueError("The dense discriminator needs rngs with a 'dropout' stream when training.")
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for linear, norm in zip(self.hidden, self.norms, strict=True):
      x = layers.leaky_relu(_apply_norm(norm, linear(x), train))
      x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.to_logit(x).reshape(x.shape[0]).astype(jnp.float32)
