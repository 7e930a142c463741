"""`dense` and the bias it adds: bfloat16 compute from float32 parameters, float32 gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

kernels = pytest.importorskip("gan_cpu_kernels")


def _f32(a):
  return np.asarray(a, np.float32)


def test_dense_is_the_bf16_product_and_its_gradients_are_accumulated_in_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 300)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((300, 40)) / np.sqrt(300), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((64, 40)), jnp.bfloat16)
  low = _f32(kernel.astype(jnp.bfloat16))
  y, vjp = jax.vjp(kernels.dense, x, kernel)
  dx, dkernel = vjp(cotangent)

  assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  np.testing.assert_allclose(_f32(y), _f32(x) @ low, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(_f32(dx), _f32(cotangent) @ low.T, rtol=1e-2, atol=1e-2)
  # The kernel gradient is float32 to float32 precision, not a bf16 product cast up (autodiff
  # of jnp.dot(x, kernel.astype(bf16)) would round it to 8 bits: about 4e-3 relative error).
  np.testing.assert_allclose(dkernel, _f32(x).T @ _f32(cotangent), rtol=2e-5, atol=2e-5)


def test_dense_takes_any_leading_axes_and_adds_the_bias():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.bfloat16)
  kernel, bias = rng.standard_normal((24, 7), np.float32), rng.standard_normal(7, np.float32)
  y = kernels.dense(x, kernel, bias)
  assert y.shape == (2, 5, 7) and y.dtype == jnp.bfloat16
  expected = _f32(x) @ _f32(kernel.astype(jnp.bfloat16)) + bias
  np.testing.assert_allclose(_f32(y), expected, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_bias_sums_the_bias_gradient_in_float32_into_the_bias_dtype(dtype):
  rng = np.random.default_rng(14)
  y = jnp.asarray(rng.standard_normal((8, 16, 16, 5)), dtype)
  bias = jnp.asarray(rng.standard_normal(5), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(y.shape), dtype)
  out, vjp = jax.vjp(kernels.add_bias, y, bias)
  dy, dbias = vjp(cotangent)
  assert (out.dtype, dy.dtype, dbias.dtype) == (dtype, dtype, jnp.float32)
  np.testing.assert_array_equal(_f32(out), _f32(y + bias.astype(dtype)))
  np.testing.assert_array_equal(_f32(dy), _f32(cotangent))
  # The float32 sum of the (bf16) cotangent, not rounded to bf16 on the way (about 4e-3).
  expected = _f32(cotangent).astype(np.float64).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(dbias, expected, rtol=1e-5, atol=1e-4)
