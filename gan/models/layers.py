"""Building blocks shared by the model families: the k4-s2 layers, Linear, DCGAN init, activations,
and the discriminators' options against collapse (spectral norm, minibatch std, packing).

Each layer takes `conv_impl`, already resolved (`gan.models.resolve_conv_impl`): 'xla' computes
it with lax on any backend; 'onednn' with the CPU kernels of the optional package
`gan_cpu_kernels` (kernels/ in the repository). The two compute the same function with different
rounding, from the same parameters.
"""

import math
from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gan.errors import UserError

_DN = ("NHWC", "HWIO", "NHWC")

# `lax.conv_transpose` padding for k4-s2 with output exactly 2H x 2W. lax pads the stride-dilated
# input (2H - 1 long) by k - 1 - p = 2 on each side for PyTorch's padding p = 1:
# 2H - 1 + 4 - 4 + 1 = 2H.
LAX_PADDING = ((2, 2), (2, 2))

_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


def cpu_kernels() -> ModuleType:
  """The optional package `gan_cpu_kernels`, imported at first use (ImportError where absent)."""
  import gan_cpu_kernels  # optional: installed from kernels/, used for conv_impl='onednn'

  return gan_cpu_kernels


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


def _strided_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The k4-s2 convolution with padding 1 (PyTorch Conv2d(k=4, s=2, p=1)): 2H x 2W -> H x W."""
  return lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN)


def _mirror(kernel: jax.Array) -> jax.Array:
  """The kernel flipped in space with its in/out axes swapped: the strided convolution with
  kernel w and the transposed convolution with kernel _mirror(w) are each other's transpose."""
  return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


# XLA:CPU runs lax.conv_transpose and its autodiff gradients several times slower than this form
# (DCGAN-64's forward and backward passes about 3x); its gradients are strided convolutions.
@jax.custom_vjp
def conv_transpose_k4s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`lax.conv_transpose(x, kernel, (2, 2), LAX_PADDING)` in NHWC/HWIO, as one stride-1 2x2
  convolution per output phase: along each axis output 2m is x[m-1] k[0] + x[m] k[2] and output
  2m+1 is x[m] k[1] + x[m+1] k[3], so phase a takes the taps k[a::2], padded (1, 0) or (0, 1).

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
        lax.conv_general_dilated(x, kernel[a::2, b::2], (1, 1), padding, dimension_numbers=_DN)
      )
    rows.append(jnp.stack(phases, axis=3))  # [B, H, W, 2 (column phase), C_out]
  y = jnp.stack(rows, axis=2)  # [B, H, 2 (row phase), W, 2 (column phase), C_out]
  return y.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


def _conv_transpose_forward(x, kernel):
  return conv_transpose_k4s2(x, kernel), (x, kernel)


def _conv_transpose_backward(residuals, cotangent):
  x, kernel = residuals
  mirrored = _mirror(kernel)
  kernel_gradient = jax.vjp(lambda k: _strided_conv(cotangent, k), mirrored)[1](x)[0]
  return _strided_conv(cotangent, mirrored), _mirror(kernel_gradient)


conv_transpose_k4s2.defvjp(_conv_transpose_forward, _conv_transpose_backward)


class _K4S2(nnx.Module):
  """A k4-s2 layer's kernel [4, 4, C_in, C_out] and optional bias [C_out]."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    conv_impl: str,
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
    self.conv_impl = conv_impl

  def _inputs(self, x: jax.Array):
    """(x, kernel, bias) in the compute dtype, and the parameters as they are."""
    kernel = self.kernel[...]
    bias = None if self.bias is None else self.bias[...]
    dtype = self.dtype or jnp.result_type(x, kernel)
    return x.astype(dtype), kernel, bias

  @staticmethod
  def _plus(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    # Added in the bias's float32, so that autodiff sums the bias's gradient in float32 too:
    # with a bfloat16 y, `y + bias.astype(y.dtype)` would round that sum over the batch and
    # every pixel to bfloat16 (a few per cent off), as the CPU kernels' add_bias avoids.
    return y if bias is None else (y.astype(bias.dtype) + bias).astype(y.dtype)


class DownConv(_K4S2):
  """A k4-s2 convolution with padding 1 halving even heights and widths (PyTorch Conv2d(k=4,
  s=2, p=1)); the same parameters, names and function as `nnx.Conv` with that geometry."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(f"DownConv needs an even height and width, not {x.shape[1:3]}")
    x, kernel, bias = self._inputs(x)
    if self.conv_impl == "onednn":
      return cpu_kernels().conv_k4s2(x, kernel, bias)
    return self._plus(_strided_conv(x, kernel.astype(x.dtype)), bias)


class UpConv(_K4S2):
  """A k4-s2 transposed convolution doubling height and width (PyTorch k=4, s=2, p=1 geometry).

  Its parameter `kernel` [4, 4, C_in, C_out] means what it means to `lax.conv_transpose` with
  LAX_PADDING: PyTorch's ConvTranspose2d kernel flipped in space, in/out axes swapped.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = self._inputs(x)
    if self.conv_impl == "onednn":
      return cpu_kernels().conv_transpose_k4s2(x, kernel, bias)
    return self._plus(conv_transpose_k4s2(x, kernel.astype(x.dtype)), bias)


class Linear(nnx.Linear):
  """`nnx.Linear` (the same parameters, names and initialisation). With conv_impl='onednn' and a
  compute dtype narrower than its parameters (bfloat16 from float32) it computes by
  `gan_cpu_kernels.dense`, whose dots accumulate in float32 and whose kernel gradient is float32."""

  def __init__(self, in_features: int, out_features: int, *, conv_impl: str, **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self.conv_impl = conv_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    narrower = self.dtype is not None and jnp.dtype(self.dtype).itemsize < kernel.dtype.itemsize
    if self.conv_impl != "onednn" or not narrower:
      return super().__call__(x)
    bias = None if self.bias is None else self.bias[...]
    return cpu_kernels().dense(x.astype(self.dtype), kernel, bias)


def _unit(x: jax.Array) -> jax.Array:
  return x * lax.rsqrt(jnp.sum(jnp.square(x)) + 1e-12)


class SpectralNorm(nnx.Module):
  """A weight layer (Linear or convolution) whose kernel, as the matrix [-1, C_out], is divided by
  its largest singular value (Miyato et al. 2018).

  The singular value is estimated by one step of power iteration per call from the vector `u`, an
  `nnx.BatchStat`: it rides in the train state's batch_stats, is checkpointed with them, and
  advances only in training. The layer's parameters are left as they are (nnx.SpectralNorm
  writes the normalised kernel into them); since the layer is linear in its kernel, dividing its
  input by the singular value computes the same.
  """

  def __init__(self, layer: nnx.Module, *, rngs: nnx.Rngs):
    self.layer = layer
    features = layer.kernel.shape[-1]
    self.u = nnx.BatchStat(_unit(jax.random.normal(rngs.params(), (features,), jnp.float32)))

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kernel = self.layer.kernel[...]
    matrix = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
    v = _unit(matrix @ self.u[...])
    u = _unit(v @ matrix)
    v, u = lax.stop_gradient((v, u))
    if train:
      self.u[...] = u
    sigma = v @ matrix @ u  # the gradient flows through the estimate, as in the paper
    return self.layer(x / sigma.astype(x.dtype))


def call(layer: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
  """Calls a weight layer, spectrally normalised or not."""
  if isinstance(layer, SpectralNorm):
    return layer(x, train=train)
  return layer(x)


def normalize(norm: nnx.Module | None, x: jax.Array, train: bool) -> jax.Array:
  """Applies a normalisation layer (None: none); BatchNorm uses its batch's statistics in
  training and its running averages otherwise."""
  if norm is None:
    return x
  if isinstance(norm, nnx.BatchNorm):
    return norm(x, use_running_average=not train)
  return norm(x)


def minibatch_std(x: jax.Array) -> jax.Array:
  """`x` [B, ..., C] with one more feature [B, ..., C + 1]: the standard deviation of each
  feature and position over the batch, averaged to one number, the same for every sample
  (ProGAN, Karras et al. 2018). A batch of near-identical samples shows as a near-zero feature,
  which D can see however each sample looks alone. Computed in float32."""
  std = jnp.sqrt(jnp.var(x.astype(jnp.float32), axis=0) + 1e-8)
  feature = jnp.broadcast_to(jnp.mean(std).astype(x.dtype), (*x.shape[:-1], 1))
  return jnp.concatenate([x, feature], axis=-1)


def pack(x: jax.Array, size: int) -> jax.Array:
  """PacGAN's packing (Lin et al. 2018): each `size` consecutive samples become one input with
  `size` times the features on the last axis, [B, ..., C] -> [B / size, ..., size * C]."""
  if size == 1:
    return x
  groups = x.reshape(x.shape[0] // size, size, *x.shape[1:])
  return jnp.moveaxis(groups, 1, -2).reshape(*groups.shape[:1], *x.shape[1:-1], -1)
