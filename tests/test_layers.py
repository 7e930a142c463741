"""The k4-s2 layers with written-out gradients against lax's convolutions, values and gradients."""

import functools
import logging
import os
import shutil
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gan.errors import UserError
from gan.models import layers, onednn


def _reference(x, kernel):
  """What `layers.conv_transpose_k4s2` must equal."""
  return jax.lax.conv_transpose(
    x,
    kernel,
    strides=(2, 2),
    padding=layers.LAX_PADDING,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def _strided_reference(x, kernel):
  """What `layers.conv_k4s2` must equal."""
  return jax.lax.conv_general_dilated(
    x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _random_pair(seed, batch, height, width, c_in, c_out):
  # numpy, not jax.random: eager jax ops compile once per new shape, which is most of a test's time.
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, c_in), np.float32)
  kernel = rng.standard_normal((4, 4, c_in, c_out), np.float32)
  return x, kernel


_shapes = st.tuples(
  st.integers(0, 2**16),  # seed
  st.integers(1, 3),  # batch
  st.integers(1, 7),  # height
  st.integers(1, 7),  # width
  st.integers(1, 6),  # c_in
  st.integers(1, 5),  # c_out
)


def test_lax_padding_gives_exactly_double_the_size():
  x, kernel = _random_pair(0, 2, 5, 3, 4, 2)
  assert _reference(x, kernel).shape == (2, 10, 6, 2)


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


@settings(max_examples=10, deadline=None)
@given(_shapes)
@example((0, 1, 1, 1, 1, 1))
@example((1, 2, 3, 8, 5, 3))
def test_upsampling_equals_lax_conv_transpose_in_value_and_gradient(shape):
  x, kernel = _random_pair(*shape)
  batch, height, width, _ = x.shape
  _assert_same_values_and_gradients(
    layers.conv_transpose_k4s2,
    _reference,
    x,
    kernel,
    (batch, 2 * height, 2 * width, kernel.shape[-1]),
  )


@settings(max_examples=10, deadline=None)
@given(_shapes)
@example((0, 1, 1, 1, 1, 1))
@example((1, 2, 3, 8, 5, 3))
def test_strided_convolution_equals_lax_in_value_and_gradient(shape):
  seed, batch, half_height, half_width, c_in, c_out = shape
  x, kernel = _random_pair(seed, batch, 2 * half_height, 2 * half_width, c_in, c_out)
  _assert_same_values_and_gradients(
    layers.conv_k4s2, _strided_reference, x, kernel, (batch, half_height, half_width, c_out)
  )


needs_compiler = pytest.mark.skipif(
  shutil.which("g++") is None, reason="no g++ here to build the oneDNN layers"
)
# The k4-s2 functions' other CPU forms, (conv_k4s2's, conv_transpose_k4s2's): as dots (for bf16
# where oneDNN is not built) and by oneDNN (float32 and bf16).
_CPU_FORMS = {
  "dots": (layers.conv_k4s2_by_dots, layers.conv_transpose_k4s2_by_dots),
  "onednn": pytest.param(
    (layers.conv_k4s2_onednn, layers.conv_transpose_k4s2_onednn), marks=needs_compiler
  ),
}


@pytest.mark.parametrize("forms", _CPU_FORMS.values(), ids=_CPU_FORMS.keys())
@settings(max_examples=10, deadline=None)
@given(_shapes)
@example((0, 1, 1, 1, 1, 1))
@example((1, 2, 3, 8, 5, 3))
def test_both_k4s2_functions_in_either_form_equal_lax_in_value_and_gradient(forms, shape):
  seed, batch, height, width, c_in, c_out = shape
  x, kernel = _random_pair(seed, batch, 2 * height, 2 * width, c_in, c_out)
  _assert_same_values_and_gradients(
    forms[0], _strided_reference, x, kernel, (batch, height, width, c_out)
  )
  x, kernel = _random_pair(seed + 1, batch, height, width, c_in, c_out)
  _assert_same_values_and_gradients(
    forms[1], _reference, x, kernel, (batch, 2 * height, 2 * width, c_out)
  )


@pytest.mark.parametrize("forms", _CPU_FORMS.values(), ids=_CPU_FORMS.keys())
@pytest.mark.parametrize("upsampling", [False, True])
def test_k4s2_in_bfloat16_computes_bfloat16_and_accumulates_the_kernel_gradient_in_float32(
  forms, upsampling
):
  ours, reference = (forms[1], _reference) if upsampling else (forms[0], _strided_reference)
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


@pytest.mark.parametrize("layer", [layers.UpConv, layers.DownConv])
def test_k4s2_layers_in_bfloat16_without_onednn_compute_by_dots_and_follow_float32(
  layer, monkeypatch
):
  monkeypatch.setattr(onednn, "available", lambda: False)
  x, _ = _random_pair(9, 2, 8, 8, 3, 5)
  wide = layer(3, 5, rngs=nnx.Rngs(0))
  narrow = layer(3, 5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(_f32(narrow(x)), wide(x), rtol=5e-2, atol=5e-2)
  calls, by_dots = [], layer.by_dots

  def spy(x, kernel):
    calls.append((x.dtype, kernel.dtype))
    return by_dots(x, kernel)

  monkeypatch.setattr(layer, "by_dots", staticmethod(spy))
  narrow(x)
  wide(x)
  assert calls == [(jnp.bfloat16, jnp.float32)]  # the bf16 layer only, with the float32 kernel
  # Not on a GPU, which keeps its native bf16 convolutions (the trace only asks the backend).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert narrow(x).dtype == jnp.bfloat16 and len(calls) == 1


@needs_compiler
def test_onednn_builds_and_registers_where_a_compiler_is():
  assert onednn.available()


@needs_compiler
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("c_in, c_out", [(32, 64), (128, 160)])
def test_onednn_gives_the_same_bits_every_time(dtype, c_in, c_out):
  # Big enough that oneDNN splits the work over threads (and blocks its channels); in float32
  # Winograd's form in blocks of tiles and, for the wider layer, in whole passes.
  x, kernel = _random_pair(4, 8, 16, 16, c_in, c_out)
  x = jnp.asarray(x, dtype)
  cotangent = jnp.asarray(np.random.default_rng(5).standard_normal((8, 8, 8, c_out)), dtype)
  step = jax.jit(lambda x, kernel: jax.vjp(layers.conv_k4s2_onednn, x, kernel)[1](cotangent))
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


@needs_compiler
@pytest.mark.parametrize("shape", _WINOGRAD_SHAPES, ids=str)
def test_onednn_winograd_form_equals_lax_and_differs_from_the_direct_one(shape, monkeypatch):
  batch, height, width, c_in, c_out = shape
  cases = [
    (layers.conv_k4s2_onednn, _strided_reference, _random_pair(1, *shape)),
    (
      layers.conv_transpose_k4s2_onednn,
      _reference,
      _random_pair(2, batch, height // 2, width // 2, c_out, c_in),
    ),
  ]
  winograd = [_value_and_gradients(ours, *pair) for ours, _, pair in cases]
  for ours, (_, reference, pair) in zip(winograd, cases, strict=True):
    _assert_near(ours, _value_and_gradients(reference, *pair))
  monkeypatch.setenv("GAN_WINOGRAD", "0")
  direct = [_value_and_gradients(ours, *pair) for ours, _, pair in cases]
  for ours, theirs in zip(jax.tree.leaves(winograd), jax.tree.leaves(direct), strict=True):
    assert not np.array_equal(ours, theirs)  # another algorithm ran


@needs_compiler
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_onednn_patch_form_of_rgb_data_gradients_equals_lax_and_differs_from_the_direct_one(
  dtype, monkeypatch
):
  # Three channels on the large side: D's first layer's input gradient, and G's last layer (a
  # transposed convolution, whose forward pass is that data gradient). Five images: a block of
  # four and a short one.
  x, kernel = _random_pair(11, 5, 16, 16, 3, 64)
  y, kernel_t = _random_pair(12, 5, 8, 8, 64, 3)
  cotangent = np.random.default_rng(13).standard_normal((5, 8, 8, 64), np.float32)
  x, y, cotangent = (jnp.asarray(a, dtype) for a in (x, y, cotangent))

  def passes():
    dx = jax.vjp(layers.conv_k4s2_onednn, x, kernel)[1](cotangent)[0]
    return [_f32(dx), _f32(layers.conv_transpose_k4s2_onednn(y, kernel_t))]

  patches = passes()
  # lax in float32 on the same bf16-rounded numbers (for bf16: sums in float32, then rounded).
  low, low_t = (_f32(jnp.asarray(k, dtype)) for k in (kernel, kernel_t))
  dx = jax.vjp(_strided_reference, _f32(x), low)[1](_f32(cotangent))[0]
  tolerance = 2e-5 if dtype == jnp.float32 else 8e-3
  _assert_near(patches, [dx, _reference(_f32(y), low_t)], tolerance)
  monkeypatch.setenv("GAN_IM2COL", "0")
  for ours, direct in zip(patches, passes(), strict=True):
    if dtype == jnp.float32:
      assert not np.array_equal(ours, direct)  # another algorithm ran
    _assert_near([ours], [direct], tolerance)


@needs_compiler
@pytest.mark.parametrize("shape", [(6, 8, 8, 32, 48), (3, 4, 6, 16, 8)], ids=str)
def test_onednn_patch_form_of_small_bf16_kernel_gradients_equals_lax_and_differs_from_the_direct_one(
  shape, monkeypatch
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

  def kernel_gradients():
    dkernel = jax.vjp(layers.conv_k4s2_onednn, x, kernel)[1](cotangent)[1]
    dkernel_t = jax.vjp(layers.conv_transpose_k4s2_onednn, y, kernel_t)[1](cotangent_t)[1]
    return [dkernel, dkernel_t]

  patches = kernel_gradients()
  assert all(gradient.dtype == jnp.float32 for gradient in patches)
  # lax in float32 on the same bf16 numbers: the products are exact, the sums in float32.
  expected = [
    jax.vjp(_strided_reference, _f32(x), kernel)[1](_f32(cotangent))[1],
    jax.vjp(_reference, _f32(y), kernel_t)[1](_f32(cotangent_t))[1],
  ]
  _assert_near(patches, expected, 1e-5)
  monkeypatch.setenv("GAN_IM2COL", "0")
  for ours, direct in zip(patches, kernel_gradients(), strict=True):
    assert not np.array_equal(ours, direct)  # another algorithm ran
    _assert_near([ours], [direct], 1e-5)


@needs_compiler
def test_onednn_winograd_finds_each_kernels_transform_by_its_values():
  # More kernels of one shape than the handlers keep transformed, twice round; then one again
  # with changed numbers at the same place (XLA reuses buffers).
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 16, 16, 16), np.float32)
  kernels = [rng.standard_normal((4, 4, 16, 32), np.float32) for _ in range(10)]
  changed = kernels[-1].copy()
  changed[3, 1, 7, 5] += 1
  forward = jax.jit(layers.conv_k4s2_onednn)
  for kernel in [*kernels, *kernels, changed]:
    _assert_near([forward(x, kernel)], [_strided_reference(x, kernel)])


@needs_compiler
@pytest.mark.parametrize("layer", [layers.UpConv, layers.DownConv])
def test_k4s2_layers_take_onednn_on_the_cpu_in_both_dtypes_and_not_on_a_gpu(layer, monkeypatch):
  x, _ = _random_pair(9, 2, 8, 8, 3, 5)
  wide = layer(3, 5, rngs=nnx.Rngs(0))
  narrow = layer(3, 5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  calls, by_onednn = [], layer.by_onednn

  def spy(x, kernel):
    calls.append((x.dtype, kernel.dtype))
    return by_onednn(x, kernel)

  monkeypatch.setattr(layer, "by_onednn", staticmethod(spy))
  np.testing.assert_allclose(_f32(narrow(x)), wide(x), rtol=5e-2, atol=5e-2)
  assert calls == [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float32)]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert narrow(x).dtype == jnp.bfloat16 and wide(x).dtype == jnp.float32
  assert len(calls) == 2


@pytest.fixture
def fresh_onednn():
  """`onednn.available()` asked anew in the test, and again after it."""
  onednn.available.cache_clear()
  yield
  onednn.available.cache_clear()


def test_gan_onednn_0_keeps_xla_convolutions(fresh_onednn, monkeypatch):
  monkeypatch.setenv("GAN_ONEDNN", "0")
  monkeypatch.setattr(layers, "conv_k4s2_onednn", None)  # would fail if called
  assert not onednn.available()
  x, kernel = _random_pair(2, 2, 8, 8, 3, 5)
  layer = layers.DownConv(3, 5, use_bias=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    layer(x), _strided_reference(x, layer.kernel[...]), rtol=1e-5, atol=1e-5
  )


def test_onednn_lets_idle_openmp_workers_sleep_unless_told_otherwise(fresh_onednn, monkeypatch):
  monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
  onednn.available()
  assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
  onednn.available.cache_clear()
  monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
  onednn.available()
  assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_failed_build_warns_once_and_keeps_xla(fresh_onednn, monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with caplog.at_level(logging.WARNING):
    assert not onednn.available()
    assert not onednn.usable(jnp.float32, jnp.zeros((4, 4, 1, 1)))
  warnings = [r.getMessage() for r in caplog.records if "oneDNN" in r.getMessage()]
  assert len(warnings) == 1 and "no C++ compiler" in warnings[0]


@needs_compiler
def test_the_build_is_compiled_once_and_reused(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  built = onednn._build()
  assert built.parent == tmp_path / "gan" and built.exists()

  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled again")

  monkeypatch.setattr(onednn.subprocess, "run", no_compiling)
  assert onednn._build() == built
  assert [p.name for p in (tmp_path / "gan").iterdir()] == [built.name]  # no scratch left


def test_strided_convolution_refuses_odd_sizes():
  x, kernel = _random_pair(0, 1, 5, 4, 2, 3)
  with pytest.raises(ValueError, match="even"):
    layers.conv_k4s2(x, kernel)


def test_downconv_is_nnx_conv_with_the_dcgan_geometry():
  down = layers.DownConv(3, 5, bias_init=nnx.initializers.ones_init(), rngs=nnx.Rngs(0))
  conv = nnx.Conv(3, 5, (4, 4), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(1))
  assert nnx.state(down, nnx.Param).to_pure_dict().keys() == {"kernel", "bias"}
  conv.kernel[...] = down.kernel[...]
  conv.bias[...] = down.bias[...]
  x, _ = _random_pair(3, 2, 8, 6, 3, 5)
  np.testing.assert_allclose(down(x), conv(x), rtol=1e-5, atol=1e-5)


def test_upconv_module_adds_its_bias_to_the_transposed_convolution():
  layer = layers.UpConv(3, 5, bias_init=nnx.initializers.ones_init(), rngs=nnx.Rngs(0))
  x, _ = _random_pair(1, 2, 4, 6, 3, 5)
  expected = _reference(x, layer.kernel[...]) + 1.0
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_upconv_computes_in_bfloat16_with_float32_parameters():
  layer = layers.UpConv(3, 5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x, _ = _random_pair(2, 2, 4, 4, 3, 5)
  assert layer.kernel[...].dtype == jnp.float32
  assert layer(x).dtype == jnp.bfloat16


def _bf16_pair(seed: int, rows: int, inputs: int, outputs: int):
  """bfloat16 inputs [rows, inputs] and a float32 kernel [inputs, outputs]."""
  kx, kk = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (rows, inputs)).astype(jnp.bfloat16)
  return x, jax.random.normal(kk, (inputs, outputs)) / np.sqrt(inputs)


def _f32(a):
  return np.asarray(a, np.float32)


def test_mixed_dot_is_the_bf16_product_and_its_gradients_are_accumulated_in_float32():
  x, kernel = _bf16_pair(0, 64, 300, 40)
  cotangent = jax.random.normal(jax.random.PRNGKey(2), (64, 40)).astype(jnp.bfloat16)
  low = _f32(kernel.astype(jnp.bfloat16))
  y, vjp = jax.vjp(layers.mixed_dot, x, kernel)
  dx, dkernel = vjp(cotangent)

  assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  np.testing.assert_allclose(_f32(y), _f32(x) @ low, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(_f32(dx), _f32(cotangent) @ low.T, rtol=1e-2, atol=1e-2)
  # The kernel gradient is float32 to float32 precision, not a bf16 product cast up (autodiff
  # of jnp.dot(x, kernel.astype(bf16)) would round it to 8 bits: about 4e-3 relative error).
  np.testing.assert_allclose(dkernel, _f32(x).T @ _f32(cotangent), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_bias_sums_the_bias_gradient_in_float32_into_the_bias_dtype(dtype):
  rng = np.random.default_rng(14)
  y = jnp.asarray(rng.standard_normal((8, 16, 16, 5)), dtype)
  bias = jnp.asarray(rng.standard_normal(5), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(y.shape), dtype)
  out, vjp = jax.vjp(layers.add_bias, y, bias)
  dy, dbias = vjp(cotangent)
  assert (out.dtype, dy.dtype, dbias.dtype) == (dtype, dtype, jnp.float32)
  np.testing.assert_array_equal(_f32(out), _f32(y + bias.astype(dtype)))
  np.testing.assert_array_equal(_f32(dy), _f32(cotangent))
  # The float32 sum of the (bf16) cotangent, not rounded to bf16 on the way (about 4e-3).
  expected = _f32(cotangent).astype(np.float64).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(dbias, expected, rtol=1e-5, atol=1e-4)


def test_linear_is_nnx_linear_in_float32_and_in_bfloat16_follows_it():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 24))  # any leading axes, as nnx.Linear
  for dtype in (None, jnp.bfloat16):
    ours = layers.Linear(24, 7, dtype=dtype, rngs=nnx.Rngs(4))
    theirs = nnx.Linear(24, 7, dtype=dtype, rngs=nnx.Rngs(4))
    assert jax.tree.map(np.shape, nnx.state(ours)) == jax.tree.map(np.shape, nnx.state(theirs))
    for a, b in zip(
      jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(theirs)), strict=True
    ):
      np.testing.assert_array_equal(a, b)
    y, expected = ours(x), theirs(x)
    assert y.dtype == expected.dtype and y.shape == (2, 5, 7)
    if dtype is not None:  # mixed_dot on the CPU only: elsewhere it is nnx.Linear itself
      with mock.patch.object(jax, "default_backend", return_value="gpu"):
        np.testing.assert_array_equal(ours(x), expected)
    if dtype is None:
      np.testing.assert_array_equal(y, expected)
    else:
      np.testing.assert_allclose(_f32(y), _f32(expected), rtol=2e-2, atol=2e-2)


def test_linear_in_bfloat16_trains_float32_weights():
  layer = layers.Linear(24, 7, dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.PRNGKey(6), (16, 24))

  def loss(layer):
    return jnp.mean(layer(x).astype(jnp.float32) ** 2)

  grads = nnx.grad(loss)(layer)
  assert grads.kernel[...].dtype == jnp.float32 and grads.bias[...].dtype == jnp.float32
  reference = nnx.grad(loss)(nnx.Linear(24, 7, rngs=nnx.Rngs(5)))  # float32 throughout
  np.testing.assert_allclose(grads.kernel[...], reference.kernel[...], rtol=5e-2, atol=5e-3)


def test_unknown_activation_is_a_user_error():
  with pytest.raises(UserError, match="model.activation"):
    layers.get_activation("tanh-ish")


def test_dcgan_leaky_relu_has_slope_one_fifth():
  np.testing.assert_allclose(layers.leaky_relu(jnp.array([-1.0, 2.0])), [-0.2, 2.0])
