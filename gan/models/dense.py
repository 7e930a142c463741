"""The dense family: multilayer perceptrons for G and D (Goodfellow et al., 2014, in shape).

G: z -> [Linear -> norm -> activation] per g_width -> Linear to R*R*3 -> tanh -> reshape.
D: flatten -> [Linear -> norm -> LeakyReLU(0.2) -> Dropout] per d_width -> Linear to one logit.
With `pack` m, D flattens m images into one input (PacGAN); the minibatch-std feature joins the
last hidden layer's features, just before the logit (where the DCGAN D adds its channel); spectral
norm wraps every Linear of D.

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
      x = self.activation(layers.normalize(norm, linear(x), train))
    x = jnp.tanh(self.to_pixels(x)).astype(jnp.float32)
    return x.reshape(z.shape[0], self.resolution, self.resolution, 3)


class Discriminator(nnx.Module):
  """Maps images [B, R, R, 3] to logits [B / pack], float32.

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
    spectral_norm: bool = False,
    minibatch_std: bool = False,
    pack: int = 1,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    def linear(in_features, out_features):
      layer = layers.Linear(in_features, out_features, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
      return layers.SpectralNorm(layer, rngs=rngs) if spectral_norm else layer

    self.dtype = dtype
    self.pack_size = pack
    self.minibatch_std = minibatch_std
    hidden, norms = [], []
    in_features = resolution * resolution * 3 * pack
    for width in widths:
      hidden.append(linear(in_features, width))
      norms.append(_norm(norm, width, dtype, rngs))
      in_features = width
    self.hidden = nnx.List(hidden)
    self.norms = nnx.List(norms)
    # No rngs stored: the key comes with each call, so the model's state is Param + BatchStat.
    self.dropout = nnx.Dropout(dropout)
    self.to_logit = linear(in_features + int(minibatch_std), 1)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    if train and self.dropout.rate > 0 and rngs is None:
      raise ValueError("The dense discriminator needs rngs with a 'dropout' stream when training.")
    x = layers.pack(x, self.pack_size)
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for linear, norm in zip(self.hidden, self.norms, strict=True):
      x = layers.leaky_relu(layers.normalize(norm, layers.call(linear, x, train), train))
      x = self.dropout(x, deterministic=not train, rngs=rngs)
    if self.minibatch_std:
      x = layers.minibatch_std(x)
    return layers.call(self.to_logit, x, train).reshape(x.shape[0]).astype(jnp.float32)
