"""Building blocks shared by the model families: fast upsampling, DCGAN init, activations.

`UpConv` is the k4-s2 transposed convolution of DCGAN's generator, computed as four stride-1
2x2 convolutions (one per output phase) instead of by `lax.conv_transpose`: on XLA:CPU the
gradient of `lax.conv_transpose` is one to two orders of magnitude slower than its forward pass,
while the phase form differentiates as fast as any ordinary convolution. See README.md for the
timings.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gan.errors import UserError

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# `lax.conv_transpose` padding for k4-s2 with output exactly 2H x 2W. lax pads the stride-dilated
# input (2H - 1 long) by k - 1 - p = 2 on each side for PyTorch's padding p = 1:
# 2H - 1 + 4 - 4 + 1 = 2H.
LAX_PADDING = ((2, 2), (2, 2))

_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


# DCGAN init (Radford et al. 2015): every kernel N(0, 0.02); BatchNorm scale N(1, 0.02).
def dcgan_kernel_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  # Drawn flat, then reshaped: XLA:CPU compiles a 4-D random draw 3-10x slower than a 1-D one,
  # and eager initialisation compiles one draw per kernel shape.
  return 0.02 * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def dcgan_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def leaky_relu(x: jax.Array) -> jax.Array:
  """LeakyReLU with DCGAN's slope of 0.2 (jax's default is 0.01)."""
  return jax.nn.leaky_relu(x, negative_slope=0.2)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": jax.nn.relu,
  "leaky_relu": leaky_relu,
  "gelu": jax.nn.gelu,
  "silu": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise UserError(f"Unknown model.activation {name!r}; choose one of {', '.join(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def conv_transpose_k4s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The k4-s2 transposed convolution from H x W to 2H x 2W, as four stride-1 convolutions.

  Equal (up to float rounding) to
  `lax.conv_transpose(x, kernel, (2, 2), LAX_PADDING, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`
  and so to PyTorch's `ConvTranspose2d(k=4, s=2, p=1)` with the kernel flipped spatially and its
  in/out axes swapped. Along each spatial axis, output 2m is x[m-1] k[0] + x[m] k[2] and output
  2m+1 is x[m] k[1] + x[m+1] k[3]: phase a in {0, 1} is a 2-tap convolution with taps k[a::2],
  padded by (1, 0) for a = 0 and (0, 1) for a = 1.

  Four separate convolutions measured faster forward+backward on XLA:CPU than one 3x3
  convolution to 4 * C_out channels (2.25x the FLOPs) or one padded 2x2 convolution whose phases
  are cropped out (its gradient is as slow as `lax.conv_transpose`'s).

  Args:
    x: [B, H, W, C_in].
    kernel: [4, 4, C_in, C_out], the layout `lax.conv_transpose` takes.

  Returns:
    [B, 2H, 2W, C_out].
  """
  batch, height, width, _ = x.shape
  rows = []
  for a in range(2):
    phases = []
    for b in range(2):
      padding = ((1 - a, a), (1 - b, b))
      phases.append(
        lax.conv_general_dilated(
          x, kernel[a::2, b::2], (1, 1), padding, dimension_numbers=_DIMENSION_NUMBERS
        )
      )
    rows.append(jnp.stack(phases, axis=3))  # [B, H, W, 2 (column phase), C_out]
  y = jnp.stack(rows, axis=2)  # [B, H, 2 (row phase), W, 2 (column phase), C_out]
  return y.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


class UpConv(nnx.Module):
  """A k4-s2 transposed convolution doubling height and width (PyTorch k=4, s=2, p=1 geometry).

  Its parameter `kernel` [4, 4, C_in, C_out] means what it means to `lax.conv_transpose`.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    kernel_init: nnx.Initializer = _default_kernel_init,
    bias_init: nnx.Initializer = _default_bias_init,
    rngs: nnx.Rngs,
  ):
    shape = (4, 4, in_features, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    self.bias = (
      nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
      if use_bias
      else nnx.data(None)
    )
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.kernel[...])
    y = conv_transpose_k4s2(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y
