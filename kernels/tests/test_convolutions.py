"""The k4-s2 convolutions by oneDNN against lax's: values, gradients, dtypes and each form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

kernels = pytest.importorskip("gan_cpu_kernels")
_ffi = kernels._ffi

needs_bf16 = pytest.mark.skipif(
  not kernels.supports(jnp.bfloat16, jnp.float32),
  reason="this CPU's oneDNN has no bfloat16 convolutions (oneDNN 3.2 needs AVX-512)",
)
_DTYPES = [jnp.float32, pytest.param(jnp.bfloat16, marks=needs_bf16)]
_DN = ("NHWC", "HWIO", "NHWC")


def _strided_reference(x, kernel):
  """What `conv_k4s2` must equal."""
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN)


def _transposed_reference(x, kernel):
  """What `conv_transpose_k4s2` must equal."""
  return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_DN)


def _random_pair(seed, batch, height, width, c_in, c_out):
  # numpy, not jax.random: eager jax ops compile once per new shape, which is most of a test's time.
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, c_in), np.float32)
  kernel = rng.standard_normal((4, 4, c_in, c_out), np.float32)
  return x, kernel


def _f32(a):
  return np.asarray(a, np.float32)


def _without(forms: int):
  """conv_k4s2 and conv_transpose_k4s2 without a bias, with the handlers' other forms but `forms`."""
  others = _ffi.ALL_FORMS & ~forms
  return (
    lambda x, kernel: kernels._conv_k4s2(x, kernel, others),
    lambda x, kernel: kernels._conv_transpose_k4s2(x, kernel, others),
  )


_shapes = st.tuples(
  st.integers(0, 2**16),  # seed
  st.integers(1, 3),  # batch
  st.integers(1, 7),  # height
  st.integers(1, 7),  # width
  st.integers(1, 6),  # c_in
  st.integers(1, 5),  # c_out
)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _values_and_gradients(ours, reference, x, kernel, cotangent):
  """(output, (d/dx, d/dkernel) of <output, cotangent>) for ours and for lax, in one compile."""
  results = []
  for fn in (ours, reference):
    y, vjp = jax.vjp(fn, x, kernel)
    results.append((y, vjp(cotangent)))
  return results


def _assert_same_values_and_gradients(ours, reference, x, kernel, out_shape):
  cotangent = np.random.default_rng(7).standard_normal(out_shape, np.float32)
  ours, theirs = _values_and_gradients(ours, reference, x, kernel, cotangent)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
  for grad_ours, grad_theirs in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(grad_ours, grad_theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(_shapes)
@example((0, 1, 1, 1, 1, 1))
@example((1, 2, 3, 8, 5, 3))
def test_both_convolutions_equal_lax_in_value_and_gradient(shape):
  seed, batch, height, width, c_in, c_out = shape
  x, kernel = _random_pair(seed, batch, 2 * height, 2 * width, c_in, c_out)
  _assert_same_values_and_gradients(
    kernels.conv_k4s2, _strided_reference, x, kernel, (batch, height, width, c_out)
  )
  x, kernel = _random_pair(seed + 1, batch, height, width, c_in, c_out)
  _assert_same_values_and_gradients(
    kernels.conv_transpose_k4s2,
    _transposed_reference,
    x,
    kernel,
    (batch, 2 * height, 2 * width, c_out),
  )


@pytest.mark.parametrize("upsampling", [False, True])
@pytest.mark.parametrize("dtype", _DTYPES)
def test_the_bias_is_added_and_its_gradient_summed_into_its_dtype(dtype, upsampling):
  ours = kernels.conv_transpose_k4s2 if upsampling else kernels.conv_k4s2
  x, kernel = _random_pair(3, 2, 8, 8, 3, 5)
  x = jnp.asarray(x, dtype)
  bias = np.random.default_rng(4).standard_normal(5).astype(np.float32)
  y, vjp = jax.vjp(ours, x, kernel, bias)
  cotangent = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
  dbias = vjp(cotangent)[2]
  np.testing.assert_array_equal(_f32(y), _f32(ours(x, kernel) + bias.astype(dtype)))
  assert dbias.dtype == jnp.float32
  np.testing.assert_allclose(dbias, _f32(cotangent).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)


@needs_bf16
@pytest.mark.parametrize("upsampling", [False, True])
def test_bfloat16_computes_bfloat16_and_accumulates_the_kernel_gradient_in_float32(upsampling):
  if upsampling:
    ours, reference = kernels.conv_transpose_k4s2, _transposed_reference
  else:
    ours, reference = kernels.conv_k4s2, _strided_reference
  x, kernel = _random_pair(5, 2, 6, 4, 8, 6)
  x = x.astype(jnp.bfloat16)
  y, vjp = jax.vjp(ours, x, kernel)
  cotangent = np.random.default_rng(8).standard_normal(y.shape, np.float32).astype(jnp.bfloat16)
  dx, dkernel = vjp(cotangent)
  assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)

  # lax in float32 on the same bf16-rounded numbers: products exact, sums in float32.
  low = _f32(kernel.astype(jnp.bfloat16))
  expected, reference_vjp = jax.vjp(reference, _f32(x), low)
  expected_dx, expected_dkernel = reference_vjp(_f32(cotangent))
  np.testing.assert_allclose(_f32(y), expected, rtol=1e-2, atol=2e-2)
  np.testing.assert_allclose(_f32(dx), expected_dx, rtol=1e-2, atol=2e-2)
  # Not rounded to bf16 on the way (that would be about 4e-3 relative).
  np.testing.assert_allclose(dkernel, expected_dkernel, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("c_in, c_out", [(32, 64), (128, 160)])
def test_the_same_inputs_give_the_same_bits_every_time(dtype, c_in, c_out):
  # Big enough that oneDNN splits the work over threads (and blocks its channels); in float32
  # Winograd's form in blocks of tiles and, for the wider layer, in whole passes.
  x, kernel = _random_pair(4, 8, 16, 16, c_in, c_out)
  x = jnp.asarray(x, dtype)
  cotangent = jnp.asarray(np.random.default_rng(5).standard_normal((8, 8, 8, c_out)), dtype)
  step = jax.jit(lambda x, kernel: jax.vjp(kernels.conv_k4s2, x, kernel)[1](cotangent))
  first, second = step(x, kernel), step(x, kernel)
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(_f32(a), _f32(b))


def _value_and_gradients(fn, x, kernel):
  """fn's output and (d/dx, d/dkernel) of <output, a fixed random cotangent>."""
  y, vjp = jax.vjp(fn, x, kernel)
  cotangent = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
  return [y, *vjp(cotangent)]


def _assert_near(ours, theirs, tolerance=2e-5):
  """Within `tolerance` of the largest magnitude: Winograd's form rounds differently from a
  direct convolution, by a bound on the whole array rather than on each element."""
  for a, b in zip(ours, theirs, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * np.abs(b).max())


# (batch, height, width, c_in, c_out) that take Winograd's form: in blocks of whole images (the
# last block short), in blocks of one image, and in whole passes (U over 4 MiB).
_WINOGRAD_SHAPES = [(5, 32, 32, 16, 8), (3, 16, 8, 24, 20), (2, 8, 16, 128, 160)]


@pytest.mark.parametrize("shape", _WINOGRAD_SHAPES, ids=str)
def test_winograd_form_equals_lax_and_differs_from_the_direct_one(shape):
  batch, height, width, c_in, c_out = shape
  strided = _random_pair(1, *shape)
  transposed = _random_pair(2, batch, height // 2, width // 2, c_out, c_in)
  winograd = [
    _value_and_gradients(kernels.conv_k4s2, *strided),
    _value_and_gradients(kernels.conv_transpose_k4s2, *transposed),
  ]
  _assert_near(winograd[0], _value_and_gradients(_strided_reference, *strided))
  _assert_near(winograd[1], _value_and_gradients(_transposed_reference, *transposed))
  direct_conv, direct_transpose = _without(_ffi.WINOGRAD)
  direct = [
    _value_and_gradients(direct_conv, *strided),
    _value_and_gradients(direct_transpose, *transposed),
  ]
  for ours, theirs in zip(jax.tree.leaves(winograd), jax.tree.leaves(direct), strict=True):
    assert not np.array_equal(ours, theirs)  # another algorithm ran


@pytest.mark.parametrize("dtype", _DTYPES)
def test_patch_form_of_rgb_data_gradients_equals_lax_and_differs_from_the_direct_one(dtype):
  # Three channels on the large side: D's first layer's input gradient, and G's last layer (a
  # transposed convolution, whose forward pass is that data gradient). Five images: a block of
  # four and a short one.
  x, kernel = _random_pair(11, 5, 16, 16, 3, 64)
  y, kernel_t = _random_pair(12, 5, 8, 8, 64, 3)
  cotangent = np.random.default_rng(13).standard_normal((5, 8, 8, 64), np.float32)
  x, y, cotangent = (jnp.asarray(a, dtype) for a in (x, y, cotangent))

  def passes(conv, conv_transpose):
    dx = jax.vjp(conv, x, kernel)[1](cotangent)[0]
    return [_f32(dx), _f32(conv_transpose(y, kernel_t))]

  patches = passes(kernels.conv_k4s2, kernels.conv_transpose_k4s2)
  # lax in float32 on the same bf16-rounded numbers (for bf16: sums in float32, then rounded).
  low, low_t = (_f32(jnp.asarray(k, dtype)) for k in (kernel, kernel_t))
  dx = jax.vjp(_strided_reference, _f32(x), low)[1](_f32(cotangent))[0]
  tolerance = 2e-5 if dtype == jnp.float32 else 8e-3
  _assert_near(patches, [dx, _transposed_reference(_f32(y), low_t)], tolerance)
  for ours, direct in zip(patches, passes(*_without(_ffi.PATCHES)), strict=True):
    if dtype == jnp.float32:
      assert not np.array_equal(ours, direct)  # another algorithm ran
    _assert_near([ours], [direct], tolerance)


@needs_bf16
@pytest.mark.parametrize("shape", [(6, 8, 8, 32, 48), (3, 4, 6, 16, 8)], ids=str)
def test_patch_form_of_small_bf16_kernel_gradients_equals_lax_and_differs_from_the_direct_one(
  shape,
):
  # At most 64 pixels and 16 or more channels on the large side, in bf16 (DCGAN's widest layer):
  # the kernel gradients of the strided convolution and of its transpose as one product each.
  batch, height, width, c_in, c_out = shape
  x, kernel = _random_pair(14, *shape)
  y, kernel_t = _random_pair(15, batch, height // 2, width // 2, c_out, c_in)
  x, y = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  rng = np.random.default_rng(16)
  cotangent = jnp.asarray(
    rng.standard_normal((batch, height // 2, width // 2, c_out)), jnp.bfloat16
  )
  cotangent_t = jnp.asarray(rng.standard_normal((batch, height, width, c_in)), jnp.bfloat16)

  def kernel_gradients(conv, conv_transpose):
    dkernel = jax.vjp(conv, x, kernel)[1](cotangent)[1]
    dkernel_t = jax.vjp(conv_transpose, y, kernel_t)[1](cotangent_t)[1]
    return [dkernel, dkernel_t]

  patches = kernel_gradients(kernels.conv_k4s2, kernels.conv_transpose_k4s2)
  assert all(gradient.dtype == jnp.float32 for gradient in patches)
  # lax in float32 on the same bf16 numbers: the products are exact, the sums in float32.
  expected = [
    jax.vjp(_strided_reference, _f32(x), kernel)[1](_f32(cotangent))[1],
    jax.vjp(_transposed_reference, _f32(y), kernel_t)[1](_f32(cotangent_t))[1],
  ]
  _assert_near(patches, expected, 1e-5)
  for ours, direct in zip(patches, kernel_gradients(*_without(_ffi.PATCHES)), strict=True):
    assert not np.array_equal(ours, direct)  # another algorithm ran
    _assert_near([ours], [direct], 1e-5)


def test_winograd_finds_each_kernels_transform_by_its_values():
  # More kernels of one shape than the handlers keep transformed, twice round; then one again
  # with changed numbers at the same place (XLA reuses buffers).
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 16, 16, 16), np.float32)
  kernel_list = [rng.standard_normal((4, 4, 16, 32), np.float32) for _ in range(10)]
  changed = kernel_list[-1].copy()
  changed[3, 1, 7, 5] += 1
  forward = jax.jit(kernels.conv_k4s2)
  for kernel in [*kernel_list, *kernel_list, changed]:
    _assert_near([forward(x, kernel)], [_strided_reference(x, kernel)])


def test_the_strided_convolution_refuses_odd_sizes():
  x, kernel = _random_pair(0, 1, 5, 4, 2, 3)
  with pytest.raises(ValueError, match="even"):
    kernels.conv_k4s2(x, kernel)


def test_other_dtypes_are_refused_and_not_supported():
  x, kernel = _random_pair(0, 1, 4, 4, 2, 3)
  with pytest.raises(TypeError, match="float32 or bfloat16"):
    kernels.conv_transpose_k4s2(x.astype(jnp.float16), kernel)
  assert kernels.supports(jnp.float32, jnp.float32)
  assert not kernels.supports(jnp.float16, jnp.float32)
  assert not kernels.supports("float32", "int8")
  assert kernels.supports("bfloat16", "float32") == _ffi.bf16_supported()
