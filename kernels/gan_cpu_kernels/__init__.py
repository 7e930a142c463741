"""CPU kernels for DCGAN's layers in JAX: the k4-s2 convolutions by oneDNN, and a mixed-precision
dense layer.

    conv_k4s2(x, kernel, bias=None)            [B, 2H, 2W, C_in] -> [B, H, W, C_out]
    conv_transpose_k4s2(x, kernel, bias=None)  [B, H, W, C_in] -> [B, 2H, 2W, C_out]
    dense(x, kernel, bias=None)                [..., in] -> [..., out]
    supports(compute_dtype, param_dtype) -> bool

Each computes in x's dtype (float32 or bfloat16) from parameters kept in their own, possibly wider,
dtype, and has its gradients written out: activations' gradients in x's dtype, parameters'
accumulated in float32 and returned in the parameters' dtype. The convolutions run on the CPU
only (they are XLA FFI calls); `dense` is plain jax and runs anywhere. See README.md for what runs
inside and why.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from gan_cpu_kernels import _ffi

__all__ = ["conv_k4s2", "conv_transpose_k4s2", "dense", "supports"]

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def supports(compute_dtype, param_dtype) -> bool:
  """Whether the convolutions run on this CPU computing in `compute_dtype` from parameters in
  `param_dtype`: each float32 or bfloat16, and bfloat16 only where this CPU's oneDNN has it
  (oneDNN 3.2 needs AVX-512 for it)."""
  dtypes = {jnp.dtype(compute_dtype), jnp.dtype(param_dtype)}
  if not dtypes <= set(_DTYPES):
    return False
  return jnp.dtype(jnp.bfloat16) not in dtypes or _ffi.bf16_supported()


def _check(name: str, x: jax.Array, kernel: jax.Array) -> None:
  if x.dtype not in _DTYPES or kernel.dtype not in _DTYPES:
    raise TypeError(f"{name} takes float32 or bfloat16 arrays, not {x.dtype} and {kernel.dtype}")


def _mirror(kernel: jax.Array) -> jax.Array:
  """The kernel flipped in space with its in/out axes swapped: the strided convolution with
  kernel w and the transposed convolution with kernel _mirror(w) are each other's transpose."""
  return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over y's last axis, in y's dtype, with bias's gradient summed in float32 and
  returned in bias's own dtype.

  Autodiff of `y + bias.astype(y.dtype)` sums a bf16 gradient over the other axes in float32 and
  rounds the sum to bf16 before it reaches the float32 bias; and XLA:CPU made that sum a
  two-stage reduce-window, many times slower than the plain float32 reduction.
  """
  return y + bias.astype(y.dtype)


def _add_bias_forward(y, bias):
  return add_bias(y, bias), bias  # bias: for its dtype only (under jit it is not copied)


def _add_bias_backward(bias, cotangent):
  axes = tuple(range(cotangent.ndim - 1))
  return cotangent, jnp.sum(cotangent, axis=axes, dtype=jnp.float32).astype(bias.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def _with_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
  return y if bias is None else add_bias(y, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_k4s2(x: jax.Array, kernel: jax.Array, forms: int) -> jax.Array:
  """`conv_k4s2` without a bias, by the handlers' `forms` (_ffi.ALL_FORMS, or fewer in tests)."""
  return _ffi.forward(x, kernel, forms)


def _conv_forward(x, kernel, forms):
  return _ffi.forward(x, kernel, forms), (x, kernel)


def _conv_backward(forms, residuals, cotangent):
  x, kernel = residuals
  return (
    _ffi.backward_data(cotangent, kernel, forms),
    _ffi.backward_kernel(x, cotangent, kernel.dtype, forms),
  )


_conv_k4s2.defvjp(_conv_forward, _conv_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose_k4s2(x: jax.Array, kernel: jax.Array, forms: int) -> jax.Array:
  """`conv_transpose_k4s2` without a bias, by the handlers' `forms`: the transpose of
  `_conv_k4s2` with the mirrored kernel."""
  return _ffi.backward_data(x, _mirror(kernel), forms)


def _conv_transpose_forward(x, kernel, forms):
  mirrored = _mirror(kernel)
  return _ffi.backward_data(x, mirrored, forms), (x, mirrored)


def _conv_transpose_backward(forms, residuals, cotangent):
  x, mirrored = residuals
  return (
    _ffi.forward(cotangent, mirrored, forms),
    _mirror(_ffi.backward_kernel(cotangent, x, mirrored.dtype, forms)),
  )


_conv_transpose_k4s2.defvjp(_conv_transpose_forward, _conv_transpose_backward)


def conv_k4s2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """The k4-s2 convolution with padding 1 (PyTorch's Conv2d(k=4, s=2, p=1)), on the CPU.

  Equal, up to rounding, to `lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
  dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias`.

  Args:
    x: [B, 2H, 2W, C_in], float32 or bfloat16: the compute dtype.
    kernel: [4, 4, C_in, C_out], float32 or bfloat16.
    bias: [C_out] or None.

  Returns:
    [B, H, W, C_out] in x's dtype.
  """
  _check("conv_k4s2", x, kernel)
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"conv_k4s2 needs an even height and width, not {x.shape[1:3]}")
  return _with_bias(_conv_k4s2(x, kernel, _ffi.ALL_FORMS), bias)


def conv_transpose_k4s2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None):
  """The k4-s2 transposed convolution doubling height and width, on the CPU.

  Equal, up to rounding, to `lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
  dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias`, and so to PyTorch's
  ConvTranspose2d(k=4, s=2, p=1) with the kernel flipped in space and its in/out axes swapped.

  Args:
    x: [B, H, W, C_in], float32 or bfloat16: the compute dtype.
    kernel: [4, 4, C_in, C_out] (lax.conv_transpose's layout), float32 or bfloat16.
    bias: [C_out] or None.

  Returns:
    [B, 2H, 2W, C_out] in x's dtype.
  """
  _check("conv_transpose_k4s2", x, kernel)
  return _with_bias(_conv_transpose_k4s2(x, kernel, _ffi.ALL_FORMS), bias)


def _dot(a: jax.Array, b: jax.Array, contracting, out_dtype) -> jax.Array:
  """A dot accumulated and returned in float32, then cast to `out_dtype`. XLA:CPU runs a
  bfloat16 dot with a bfloat16 result as a float32 one on upcast operands, but one with a float32
  result natively, several times faster."""
  y = lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


@jax.custom_vjp
def mixed_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x @ kernel` [B, in] x [in, out] computed in x's dtype from a kernel kept in a wider one.

  The value is that of `jnp.dot(x, kernel.astype(x.dtype))` (accumulated in float32), but the
  gradients are written out: autodiff of that on XLA:CPU ran its bf16 dots as float32 ones on
  upcast operands (see `_dot`), and the kernel's gradient came out as a bf16 [out, in] product
  that the optimiser's update read converted and transposed. Here every dot accumulates in
  float32, and the kernel's gradient is one dot contracting the batch straight into [in, out],
  returned in the kernel's dtype.
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


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """`x @ kernel + bias` computed in x's dtype from parameters in a wider one (bfloat16 from
  float32, say): the dots accumulate in float32, the parameters' gradients too. Plain jax: runs
  on any backend.

  Args:
    x: [..., in], the compute dtype.
    kernel: [in, out].
    bias: [out] or None.

  Returns:
    [..., out] in x's dtype.
  """
  y = mixed_dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])
  return _with_bias(y, bias)
