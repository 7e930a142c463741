"""Building blocks shared by the model families: fast k4-s2 layers, DCGAN init, activations.

`UpConv` is the k4-s2 transposed convolution of DCGAN's generator, computed as four stride-1
2x2 convolutions (one per output phase) instead of by `lax.conv_transpose`: on XLA:CPU the
gradient of `lax.conv_transpose` is one to two orders of magnitude slower than its forward pass.
`DownConv` is the discriminator's k4-s2 convolution, whose input gradient is such a transposed
convolution, computed here in the phase form too. Both write their gradients out (custom VJPs)
in terms of fast forward convolutions. See README.md for the timings.

For bfloat16 compute with float32 parameters the same functions run as dots (`*_by_dots`,
`mixed_dot` for `Linear`): XLA:CPU's bf16 convolutions are no faster than its float32 ones,
but its bf16 dots that accumulate in float32 are, and the kernels' gradients are accumulated
and returned in float32.

On the CPU, where oneDNN can be built (`gan/models/onednn.py`), the k4-s2 layers run by oneDNN
in float32 and bfloat16 (`*_onednn`) in place of both forms: its convolutions are 1.5-2x
faster than XLA:CPU's here. The other forms remain for GPUs and for CPUs without oneDNN.

Biases are added by `add_bias`, whose written-out gradient sums in float32 straight into the
float32 bias (in bf16 the step measured 17-21 ms faster, and the sum is no longer rounded to bf16).
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gan.errors import UserError
from gan.models import onednn

_DN = ("NHWC", "HWIO", "NHWC")

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


def _strided_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The k4-s2 convolution with padding 1 (PyTorch Conv2d(k=4, s=2, p=1)): 2H x 2W -> H x W."""
  return lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN)


def _phase_upsample(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_transpose_k4s2`'s value, as four stride-1 convolutions (see there)."""
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


def _mirror(kernel: jax.Array) -> jax.Array:
  """The kernel flipped in space with its in/out axes swapped: the strided convolution with
  kernel w and the transposed convolution with kernel _mirror(w) are each other's transpose."""
  return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def _strided_conv_kernel_gradient(x: jax.Array, cotangent: jax.Array, kernel: jax.Array):
  """d<_strided_conv(x, kernel), cotangent>/dkernel (XLA's own filter-gradient convolution)."""
  return jax.vjp(lambda k: _strided_conv(x, k), kernel)[1](cotangent)[0]


@jax.custom_vjp
def conv_k4s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The k4-s2 convolution with padding 1 from 2H x 2W to H x W, with a fast input gradient.

  Equal to `lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)))` in NHWC/HWIO. Its
  input gradient is a k4-s2 transposed convolution, which XLA:CPU computes slowly as a dilated
  convolution; here it is the phase form of `conv_transpose_k4s2`. H and W must be even.

  Args:
    x: [B, 2H, 2W, C_in].
    kernel: [4, 4, C_in, C_out].

  Returns:
    [B, H, W, C_out].
  """
  _check_even(x)
  return _strided_conv(x, kernel)


def _check_even(x: jax.Array) -> None:
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"conv_k4s2 needs an even height and width, not {x.shape[1:3]}")


def _conv_forward(x, kernel):
  _check_even(x)
  return _strided_conv(x, kernel), (x, kernel)


def _conv_backward(residuals, cotangent):
  x, kernel = residuals
  return (
    _phase_upsample(cotangent, _mirror(kernel)),
    _strided_conv_kernel_gradient(x, cotangent, kernel),
  )


conv_k4s2.defvjp(_conv_forward, _conv_backward)


@jax.custom_vjp
def conv_transpose_k4s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The k4-s2 transposed convolution from H x W to 2H x 2W, as four stride-1 convolutions.

  Equal (up to float rounding) to
  `lax.conv_transpose(x, kernel, (2, 2), LAX_PADDING, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`
  and so to PyTorch's `ConvTranspose2d(k=4, s=2, p=1)` with the kernel flipped spatially and its
  in/out axes swapped. Along each spatial axis, output 2m is x[m-1] k[0] + x[m] k[2] and output
  2m+1 is x[m] k[1] + x[m+1] k[3]: phase a in {0, 1} is a 2-tap convolution with taps k[a::2],
  padded by (1, 0) for a = 0 and (0, 1) for a = 1.

  Four separate convolutions measured faster on XLA:CPU than one 3x3 convolution to 4 * C_out
  channels (2.25x the FLOPs) or one padded 2x2 convolution whose phases are cropped out. The
  gradients are written out: this is the transpose of `conv_k4s2` with the mirrored kernel, so
  the input gradient is that strided convolution and the kernel gradient its filter gradient.

  Args:
    x: [B, H, W, C_in].
    kernel: [4, 4, C_in, C_out], the layout `lax.conv_transpose` takes.

  Returns:
    [B, 2H, 2W, C_out].
  """
  return _phase_upsample(x, kernel)


def _conv_transpose_forward(x, kernel):
  return _phase_upsample(x, kernel), (x, kernel)


def _conv_transpose_backward(residuals, cotangent):
  x, kernel = residuals
  mirrored = _mirror(kernel)
  return (
    _strided_conv(cotangent, mirrored),
    _mirror(_strided_conv_kernel_gradient(cotangent, x, mirrored)),
  )


conv_transpose_k4s2.defvjp(_conv_transpose_forward, _conv_transpose_backward)


def _dot(a: jax.Array, b: jax.Array, contracting, out_dtype) -> jax.Array:
  """A dot accumulated and returned in float32, then cast to `out_dtype`. XLA:CPU runs a
  bfloat16 dot with a bfloat16 result as a float32 one on upcast operands (56 GFLOP/s here for
  D's first layer) but one with a float32 result natively (186-291 GFLOP/s; float32 151)."""
  y = lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


@jax.custom_vjp
def mixed_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x @ kernel` computed in x's dtype from a kernel kept in a wider one (the master weights).

  The value is that of `jnp.dot(x, kernel.astype(x.dtype))` (accumulated in float32), but the
  gradients are written out, because autodiff of that on XLA:CPU made the dense bf16 step 2.4x
  slower than float32 (see README.md): its bf16 dots ran as float32 ones on upcast operands
  (see `_dot`), and the kernel's gradient came out as a bf16 [out, in] product that the
  optimiser's update read converted and transposed (strided). Here every dot accumulates in
  float32, and the kernel's gradient is one dot contracting the batch straight into [in, out],
  returned in the kernel's dtype.

  Args:
    x: [B, in], the compute dtype.
    kernel: [in, out], any float dtype.

  Returns:
    [B, out] in x's dtype.
  """
  return _dot(x, kernel.astype(x.dtype), ((1,), (0,)), x.dtype)


def _mixed_dot_forward(x, kernel):
  low = kernel.astype(x.dtype)
  # The kernel itself is kept only for its dtype (under jit it is not copied).
  return _dot(x, low, ((1,), (0,)), x.dtype), (x, low, kernel)


def _mixed_dot_backward(residuals, cotangent):
  x, low, kernel = residuals
  return (
    _dot(cotangent, low, ((1,), (1,)), x.dtype),
    _dot(x, cotangent, ((0,), (0,)), kernel.dtype),
  )


mixed_dot.defvjp(_mixed_dot_forward, _mixed_dot_backward)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over y's last axis, in y's dtype, with bias's gradient summed in float32 and
  returned in bias's own dtype.

  Autodiff of `y + bias.astype(y.dtype)` sums a bf16 gradient over the other axes in float32 and
  rounds the sum to bf16 before it reaches the float32 bias; and XLA:CPU made that sum a
  two-stage reduce-window that measured 20-30x slower than the plain float32 reduction here.
  """
  return y + bias.astype(y.dtype)


def _add_bias_forward(y, bias):
  return add_bias(y, bias), bias  # bias: for its dtype only (under jit it is not copied)


def _add_bias_backward(bias, cotangent):
  axes = tuple(range(cotangent.ndim - 1))
  return cotangent, jnp.sum(cotangent, axis=axes, dtype=jnp.float32).astype(bias.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def _low_precision_by_dots(compute_dtype, kernel: jax.Array) -> bool:
  """Whether a layer computing in `compute_dtype` from `kernel` takes the dot forms: for a
  narrower compute dtype on XLA:CPU, where they were measured faster. Elsewhere (GPUs) the
  layers keep the native low-precision convolutions and dots that were measured there."""
  narrower = jnp.dtype(compute_dtype).itemsize < kernel.dtype.itemsize
  return narrower and jax.default_backend() == "cpu" and not onednn.tracing_plain_convolutions()


class Linear(nnx.Linear):
  """`nnx.Linear` (the same parameters, names and initialisation) that computes in a narrower
  dtype than its parameters by `mixed_dot` on the CPU; otherwise it is nnx.Linear."""

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if self.dtype is None or not _low_precision_by_dots(self.dtype, kernel):
      return super().__call__(x)
    flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    y = mixed_dot(flat, kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    if self.bias is not None:
      y = add_bias(y, self.bias[...])
    return y


# The k4-s2 layers as dots, for low-precision compute. XLA:CPU runs bfloat16 convolutions no
# faster than float32 ones, but bfloat16 dots accumulating in float32 up to twice as fast (see
# `_dot`). On 2x2 pixel blocks (space-to-depth of the input padded by one pixel) the k4-s2
# convolution is a 2x2 stride-1 convolution with 4 C_in channels, i.e. four dots of shifted
# block views; its transpose is one dot into the four taps' blocks, added back shifted.


def _to_blocks(x: jax.Array) -> jax.Array:
  """[B, 2H, 2W, C] -> [B, H + 1, W + 1, 4C]: x padded by one pixel, cut into 2x2 blocks."""
  batch, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  blocks = padded.reshape(batch, height // 2 + 1, 2, width // 2 + 1, 2, channels)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(*blocks.shape[:2], blocks.shape[3], -1)


def _from_blocks(blocks: jax.Array) -> jax.Array:
  """The transpose of `_to_blocks`: [B, H + 1, W + 1, 4C] -> [B, 2H, 2W, C]."""
  batch, rows, cols, channels = blocks.shape
  pixels = blocks.reshape(batch, rows, cols, 2, 2, channels // 4).transpose(0, 1, 3, 2, 4, 5)
  return pixels.reshape(batch, 2 * rows, 2 * cols, -1)[:, 1:-1, 1:-1]


def _kernel_to_blocks(kernel: jax.Array) -> jax.Array:
  """[4, 4, C, C_out] -> [2, 2, 4C, C_out]: tap (2i + a, 2j + b) is block tap (i, j), row (a, b)."""
  c_in, c_out = kernel.shape[2:]
  return (
    kernel.reshape(2, 2, 2, 2, c_in, c_out).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, -1, c_out)
  )


def _kernel_from_blocks(blocks: jax.Array) -> jax.Array:
  c_in, c_out = blocks.shape[2] // 4, blocks.shape[3]
  return (
    blocks.reshape(2, 2, 2, 2, c_in, c_out).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, c_in, c_out)
  )


def _conv_by_dots(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_strided_conv(x, kernel)` as four dots over the blocks; x and kernel in one dtype."""
  height, width = x.shape[1] // 2, x.shape[2] // 2
  blocks, taps = _to_blocks(x), _kernel_to_blocks(kernel)
  y = sum(
    _dot(blocks[:, i : i + height, j : j + width], taps[i, j], ((3,), (0,)), jnp.float32)
    for i in range(2)
    for j in range(2)
  )
  return y.astype(x.dtype)


def _conv_transpose_by_dots(y: jax.Array, kernel: jax.Array) -> jax.Array:
  """The transpose of `_conv_by_dots(., kernel)` applied to y [B, H, W, C_out]: [B, 2H, 2W, C]."""
  batch, height, width, c_out = y.shape
  taps = _kernel_to_blocks(kernel)  # [2, 2, 4C, C_out]
  products = _dot(y, taps.transpose(3, 0, 1, 2).reshape(c_out, -1), ((3,), (0,)), jnp.float32)
  products = products.reshape(batch, height, width, 2, 2, -1)
  blocks = sum(
    jnp.pad(products[:, :, :, i, j], ((0, 0), (i, 1 - i), (j, 1 - j), (0, 0)))
    for i in range(2)
    for j in range(2)
  )
  return _from_blocks(blocks).astype(y.dtype)


def _conv_kernel_gradient_by_dots(x: jax.Array, cotangent: jax.Array, dtype) -> jax.Array:
  """d<_conv_by_dots(x, kernel), cotangent>/dkernel, accumulated in float32, in `dtype`."""
  height, width = cotangent.shape[1:3]
  blocks = _to_blocks(x)
  taps = [
    [
      _dot(blocks[:, i : i + height, j : j + width], cotangent, ((0, 1, 2), (0, 1, 2)), dtype)
      for j in range(2)
    ]
    for i in range(2)
  ]
  return _kernel_from_blocks(jnp.stack([jnp.stack(row) for row in taps]))


@jax.custom_vjp
def conv_k4s2_by_dots(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_k4s2`'s function computed in x's dtype by dots accumulating in float32, from a
  kernel in its own (wider) dtype whose gradient is accumulated and returned in that dtype."""
  _check_even(x)
  return _conv_by_dots(x, kernel.astype(x.dtype))


def _conv_by_dots_forward(x, kernel):
  _check_even(x)
  low = kernel.astype(x.dtype)
  return _conv_by_dots(x, low), (x, low, kernel)  # kernel: for its dtype only


def _conv_by_dots_backward(residuals, cotangent):
  x, low, kernel = residuals
  return (
    _conv_transpose_by_dots(cotangent, low),
    _conv_kernel_gradient_by_dots(x, cotangent, kernel.dtype),
  )


conv_k4s2_by_dots.defvjp(_conv_by_dots_forward, _conv_by_dots_backward)


@jax.custom_vjp
def conv_transpose_k4s2_by_dots(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_transpose_k4s2`'s function (the same kernel layout) computed as
  `conv_k4s2_by_dots` is: it is that convolution's transpose with the mirrored kernel."""
  return _conv_transpose_by_dots(x, _mirror(kernel).astype(x.dtype))


def _conv_transpose_by_dots_forward(x, kernel):
  mirrored = _mirror(kernel).astype(x.dtype)
  return _conv_transpose_by_dots(x, mirrored), (x, mirrored, kernel)


def _conv_transpose_by_dots_backward(residuals, cotangent):
  x, mirrored, kernel = residuals
  return (
    _conv_by_dots(cotangent, mirrored),
    _mirror(_conv_kernel_gradient_by_dots(cotangent, x, kernel.dtype)),
  )


conv_transpose_k4s2_by_dots.defvjp(
  _conv_transpose_by_dots_forward, _conv_transpose_by_dots_backward
)


# The k4-s2 layers by oneDNN (gan/models/onednn.py): on the CPU, for float32 and bfloat16, these
# run in place of both forms above. The kernel goes to oneDNN in its own dtype (it converts), and
# its gradient comes back in that dtype, accumulated in float32.


@jax.custom_vjp
def conv_k4s2_onednn(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_k4s2`'s function by oneDNN, computed in x's dtype."""
  _check_even(x)
  return onednn.forward(x, kernel)


def _conv_onednn_forward(x, kernel):
  _check_even(x)
  return onednn.forward(x, kernel), (x, kernel)


def _conv_onednn_backward(residuals, cotangent):
  x, kernel = residuals
  return (
    onednn.backward_data(cotangent, kernel),
    onednn.backward_kernel(x, cotangent, kernel.dtype),
  )


conv_k4s2_onednn.defvjp(_conv_onednn_forward, _conv_onednn_backward)


@jax.custom_vjp
def conv_transpose_k4s2_onednn(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_transpose_k4s2`'s function by oneDNN: the transpose of `conv_k4s2_onednn` with the
  mirrored kernel, computed in x's dtype."""
  return onednn.backward_data(x, _mirror(kernel))


def _conv_transpose_onednn_forward(x, kernel):
  mirrored = _mirror(kernel)
  return onednn.backward_data(x, mirrored), (x, mirrored)


def _conv_transpose_onednn_backward(residuals, cotangent):
  x, mirrored = residuals
  return (
    onednn.forward(cotangent, mirrored),
    _mirror(onednn.backward_kernel(cotangent, x, mirrored.dtype)),
  )


conv_transpose_k4s2_onednn.defvjp(_conv_transpose_onednn_forward, _conv_transpose_onednn_backward)


class _ConvK4S2(nnx.Module):
  """A k4-s2 layer's kernel [4, 4, C_in, C_out] and optional bias; subclasses pick the function."""

  # (x, kernel) -> y, set by subclasses: `function` computes in one dtype; `by_dots` in x's
  # dtype from a wider kernel, used on the CPU when the layer computes narrower than its kernel;
  # `by_onednn` in x's dtype from any kernel, used on the CPU in place of both when it can.
  function: Callable[[jax.Array, jax.Array], jax.Array]
  by_dots: Callable[[jax.Array, jax.Array], jax.Array]
  by_onednn: Callable[[jax.Array, jax.Array], jax.Array]

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
    kernel = self.kernel[...]
    dtype = jnp.dtype(self.dtype or jnp.result_type(x, kernel))
    if onednn.usable(dtype, kernel):
      y = self.by_onednn(x.astype(dtype), kernel)
    elif _low_precision_by_dots(dtype, kernel):
      y = self.by_dots(x.astype(dtype), kernel)
    else:
      y = self.function(x.astype(dtype), kernel.astype(dtype))
    if self.bias is not None:
      y = add_bias(y, self.bias[...])
    return y


class UpConv(_ConvK4S2):
  """A k4-s2 transposed convolution doubling height and width (PyTorch k=4, s=2, p=1 geometry).

  Its parameter `kernel` [4, 4, C_in, C_out] means what it means to `lax.conv_transpose`.
  """

  function = staticmethod(conv_transpose_k4s2)
  by_dots = staticmethod(conv_transpose_k4s2_by_dots)
  by_onednn = staticmethod(conv_transpose_k4s2_onednn)


class DownConv(_ConvK4S2):
  """A k4-s2 convolution with padding 1 halving even heights and widths (PyTorch Conv2d(k=4,
  s=2, p=1)); the same parameters, names and function as `nnx.Conv` with that geometry."""

  function = staticmethod(conv_k4s2)
  by_dots = staticmethod(conv_k4s2_by_dots)
  by_onednn = staticmethod(conv_k4s2_onednn)
