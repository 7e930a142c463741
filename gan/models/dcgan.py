"""DCGAN (Radford et al., 2015): the convolutional generator and discriminator.

G: z -> Linear to 4x4x(base_width * R/8) -> BN -> ReLU, then k4-s2 upsampling blocks
(UpConv -> BN -> ReLU) halving the width up to R/2 x R/2 x base_width, then UpConv to R x R x 3
and tanh. For R = 64: 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 64x64x3.
D mirrors it: k4-s2 conv 3 -> base_width, LeakyReLU(0.2); k4-s2 conv -> BN -> LeakyReLU doubling
the width down to 4x4; a 4x4 valid conv to one logit. D's options: its norm (`batch`, or `layer`
or `none` for the losses that judge each sample alone, such as wgan_gp), spectral norm on every
conv, the minibatch-std channel joining the 4x4 features before the logit, and packing m images
channel-wise into one input (PacGAN).

Layers followed by BatchNorm have no bias (BN's own bias makes it redundant); the others do.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gan.models import layers

# PyTorch's BatchNorm defaults, which the DCGAN recipe was tuned with (its momentum 0.1 is the
# weight of the new batch; flax's momentum is the weight of the running average).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _batch_norm(features: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Statistics are computed and kept in float32 even for a bfloat16 dtype (nnx promotes them).
  return nnx.BatchNorm(
    features,
    momentum=_BN_MOMENTUM,
    epsilon=_BN_EPSILON,
    scale_init=layers.dcgan_scale_init,
    dtype=dtype,
    rngs=rngs,
  )


D_NORMS = ("batch", "layer", "none")


def _d_norm(kind: str, features: int, dtype, rngs: nnx.Rngs) -> nnx.Module | None:
  if kind == "batch":
    return _batch_norm(features, dtype, rngs)
  if kind == "layer":
    # Over each sample's whole feature map, as in the WGAN-GP paper's critic; scale per channel.
    return nnx.LayerNorm(
      features, epsilon=_BN_EPSILON, reduction_axes=(-3, -2, -1), dtype=dtype, rngs=rngs
    )
  return None


def _num_doublings(resolution: int) -> int:
  """How many k4-s2 steps lie between 4x4 and R x R."""
  return resolution.bit_length() - 3


class Generator(nnx.Module):
  """Maps z [B, latent_dim] to images [B, R, R, 3] in [-1, 1], float32."""

  def __init__(
    self,
    *,
    latent_dim: int,
    resolution: int,
    base_width: int,
    conv_impl: str,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    width = base_width * resolution // 8
    self.start_width = width
    self.dtype = dtype
    self.project = layers.Linear(
      latent_dim,
      4 * 4 * width,
      use_bias=False,
      kernel_init=layers.dcgan_kernel_init,
      conv_impl=conv_impl,
      dtype=dtype,
      rngs=rngs,
    )
    self.project_norm = _batch_norm(width, dtype, rngs)
    ups, norms = [], []
    for _ in range(_num_doublings(resolution) - 1):
      ups.append(
        layers.UpConv(
          width,
          width // 2,
          use_bias=False,
          kernel_init=layers.dcgan_kernel_init,
          conv_impl=conv_impl,
          dtype=dtype,
          rngs=rngs,
        )
      )
      norms.append(_batch_norm(width // 2, dtype, rngs))
      width //= 2
    self.ups = nnx.List(ups)
    self.norms = nnx.List(norms)
    self.to_rgb = layers.UpConv(
      width, 3, kernel_init=layers.dcgan_kernel_init, conv_impl=conv_impl, dtype=dtype, rngs=rngs
    )

  def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
    x = self.project(z.astype(self.dtype)).reshape(z.shape[0], 4, 4, self.start_width)
    x = jax.nn.relu(self.project_norm(x, use_running_average=not train))
    for up, norm in zip(self.ups, self.norms, strict=True):
      x = jax.nn.relu(norm(up(x), use_running_average=not train))
    return jnp.tanh(self.to_rgb(x)).astype(jnp.float32)


class Discriminator(nnx.Module):
  """Maps images [B, R, R, 3] to logits [B / pack], float32."""

  def __init__(
    self,
    *,
    resolution: int,
    base_width: int,
    conv_impl: str,
    norm: str = "batch",
    spectral_norm: bool = False,
    minibatch_std: bool = False,
    pack: int = 1,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    def weights(layer):
      return layers.SpectralNorm(layer, rngs=rngs) if spectral_norm else layer

    width = base_width
    self.dtype = dtype
    self.pack_size = pack
    self.minibatch_std = minibatch_std
    conv_args = dict(kernel_init=layers.dcgan_kernel_init, dtype=dtype, rngs=rngs)
    self.stem = weights(layers.DownConv(3 * pack, width, conv_impl=conv_impl, **conv_args))
    downs, norms = [], []
    for _ in range(_num_doublings(resolution) - 1):
      down = layers.DownConv(
        width, 2 * width, use_bias=norm == "none", conv_impl=conv_impl, **conv_args
      )
      downs.append(weights(down))
      norms.append(_d_norm(norm, 2 * width, dtype, rngs))
      width *= 2
    self.downs = nnx.List(downs)
    self.norms = nnx.List(norms)
    width += int(minibatch_std)
    self.to_logit = weights(nnx.Conv(width, 1, (4, 4), padding="VALID", **conv_args))

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    del rngs  # No dropout here; the argument keeps the interface of every discriminator.
    x = layers.pack(x.astype(self.dtype), self.pack_size)
    x = layers.leaky_relu(layers.call(self.stem, x, train))
    for down, norm in zip(self.downs, self.norms, strict=True):
      x = layers.leaky_relu(layers.normalize(norm, layers.call(down, x, train), train))
    if self.minibatch_std:
      x = layers.minibatch_std(x)
    return layers.call(self.to_logit, x, train).reshape(x.shape[0]).astype(jnp.float32)
