"""The layers against lax, nnx and PyTorch's definitions; conv_impl 'onednn' against 'xla'."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gan.errors import UserError
from gan.models import layers

try:
  _kernels = layers.cpu_kernels()
except ImportError:
  _kernels = None
needs_kernels = pytest.mark.skipif(
  _kernels is None, reason="gan_cpu_kernels is not installed (`make setup` installs it)"
)
needs_bf16_kernels = pytest.mark.skipif(
  _kernels is None or not _kernels.supports(jnp.bfloat16, jnp.float32),
  reason="gan_cpu_kernels has no bfloat16 convolutions here",
)
CONV_IMPLS = ["xla", pytest.param("onednn", marks=needs_kernels)]


def _reference(x, kernel):
  """What `layers.conv_transpose_k4s2` must equal."""
  return jax.lax.conv_transpose(
    x,
    kernel,
    strides=(2, 2),
    padding=layers.LAX_PADDING,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def _random_pair(seed, batch, height, width, c_in, c_out):
  # numpy, not jax.random: eager jax ops compile once per new shape, which is most of a test's time.
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, c_in), np.float32)
  kernel = rng.standard_normal((4, 4, c_in, c_out), np.float32)
  return x, kernel


def _f32(a):
  return np.asarray(a, np.float32)


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


@settings(max_examples=10, deadline=None)
@given(_shapes)
@example((0, 1, 1, 1, 1, 1))
@example((1, 2, 3, 8, 5, 3))
def test_upsampling_equals_lax_conv_transpose_in_value_and_gradient(shape):
  x, kernel = _random_pair(*shape)
  batch, height, width, _ = x.shape
  cotangent = np.random.default_rng(7).standard_normal(
    (batch, 2 * height, 2 * width, kernel.shape[-1]), np.float32
  )
  ours, theirs = _values_and_gradients(layers.conv_transpose_k4s2, _reference, x, kernel, cotangent)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
  for grad_ours, grad_theirs in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(grad_ours, grad_theirs, rtol=1e-5, atol=1e-4)


def _torch_conv_transpose2d(x, weight, bias):
  """PyTorch's ConvTranspose2d(k=4, s=2, p=1) by its definition, NHWC in and out: input pixel
  (i, j) adds x[i, j] @ weight[:, :, kh, kw] at output (2i - 1 + kh, 2j - 1 + kw), if inside."""
  batch, height, width, _ = x.shape
  out = np.zeros((batch, 2 * height + 2, 2 * width + 2, weight.shape[1]))  # a border of 1
  for kh in range(4):
    for kw in range(4):
      out[:, kh : kh + 2 * height : 2, kw : kw + 2 * width : 2] += x @ weight[:, :, kh, kw]
  return out[:, 1:-1, 1:-1] + bias


@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_upconv_is_pytorch_conv_transpose2d_with_the_kernel_flipped_and_its_axes_swapped(
  conv_impl,
):
  layer = layers.UpConv(
    3, 5, bias_init=nnx.initializers.normal(1.0), conv_impl=conv_impl, rngs=nnx.Rngs(0)
  )
  x, _ = _random_pair(1, 2, 4, 6, 3, 5)
  # PyTorch's weight is [C_in, C_out, kh, kw]; ours is HWIO and flipped in space.
  weight = np.flip(np.asarray(layer.kernel[...]), (0, 1)).transpose(2, 3, 0, 1)
  expected = _torch_conv_transpose2d(x, weight, np.asarray(layer.bias[...]))
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_downconv_is_nnx_conv_with_the_dcgan_geometry(conv_impl):
  down = layers.DownConv(
    3, 5, bias_init=nnx.initializers.ones_init(), conv_impl=conv_impl, rngs=nnx.Rngs(0)
  )
  conv = nnx.Conv(3, 5, (4, 4), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(1))
  assert nnx.state(down, nnx.Param).to_pure_dict().keys() == {"kernel", "bias"}
  conv.kernel[...] = down.kernel[...]
  conv.bias[...] = down.bias[...]
  x, _ = _random_pair(3, 2, 8, 6, 3, 5)
  np.testing.assert_allclose(down(x), conv(x), rtol=1e-5, atol=1e-5)


def test_downconv_refuses_odd_sizes():
  layer = layers.DownConv(2, 3, conv_impl="xla", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="even"):
    layer(np.zeros((1, 5, 4, 2), np.float32))


@pytest.mark.parametrize("layer", [layers.UpConv, layers.DownConv])
def test_k4s2_layers_compute_in_bfloat16_with_float32_parameters(layer):
  module = layer(3, 5, dtype=jnp.bfloat16, conv_impl="xla", rngs=nnx.Rngs(0))
  x, _ = _random_pair(2, 2, 4, 4, 3, 5)
  assert module.kernel[...].dtype == module.bias[...].dtype == jnp.float32
  assert module(x).dtype == jnp.bfloat16


@pytest.mark.slow
def test_linear_is_nnx_linear_with_the_same_parameters():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 24))  # any leading axes, as nnx.Linear
  for dtype in (None, jnp.bfloat16):
    ours = layers.Linear(24, 7, dtype=dtype, conv_impl="xla", rngs=nnx.Rngs(4))
    theirs = nnx.Linear(24, 7, dtype=dtype, rngs=nnx.Rngs(4))
    for a, b in zip(
      jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(theirs)), strict=True
    ):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ours(x), theirs(x))


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_linear_in_bfloat16_trains_float32_weights(conv_impl):
  layer = layers.Linear(24, 7, dtype=jnp.bfloat16, conv_impl=conv_impl, rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.PRNGKey(6), (16, 24))

  def loss(layer):
    return jnp.mean(layer(x).astype(jnp.float32) ** 2)

  grads = nnx.grad(loss)(layer)
  assert grads.kernel[...].dtype == jnp.float32 and grads.bias[...].dtype == jnp.float32
  reference = nnx.grad(loss)(nnx.Linear(24, 7, rngs=nnx.Rngs(5)))  # float32 throughout
  np.testing.assert_allclose(grads.kernel[...], reference.kernel[...], rtol=5e-2, atol=5e-3)


def _layer_values_and_gradients(layer, x):
  """The layer's output and the gradients of <output, a fixed cotangent> for x and each param."""
  graphdef, params = nnx.split(layer, nnx.Param)

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  y, vjp = jax.vjp(apply, params, x)
  cotangent = np.random.default_rng(17).standard_normal(y.shape).astype(y.dtype)
  dparams, dx = vjp(cotangent)
  return [_f32(a) for a in (y, dx, *jax.tree.leaves(dparams))]


_DOWN, _UP, _LINEAR = (
  (layers.DownConv, (3, 16, 16, 16)),
  (layers.UpConv, (3, 8, 8, 16)),
  (layers.Linear, (6, 16)),
)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize(
  ("layer", "in_shape", "dtype"),
  [
    (*_DOWN, jnp.float32),
    (*_UP, jnp.float32),
    (*_LINEAR, jnp.float32),
    pytest.param(*_DOWN, jnp.bfloat16, marks=needs_bf16_kernels),
    pytest.param(*_UP, jnp.bfloat16, marks=needs_bf16_kernels),
    (*_LINEAR, jnp.bfloat16),  # plain jax in the package: no bfloat16 convolutions needed
  ],
  ids=lambda v: getattr(v, "__name__", ""),
)
def test_onednn_and_xla_give_the_same_outputs_and_gradients(layer, in_shape, dtype):
  x = np.random.default_rng(18).standard_normal(in_shape).astype(np.float32)
  results = []
  for conv_impl in ("xla", "onednn"):
    module = layer(16, 24, dtype=dtype, conv_impl=conv_impl, rngs=nnx.Rngs(0))
    results.append(_layer_values_and_gradients(module, x))
  tolerance = 2e-5 if dtype == jnp.float32 else 2e-2  # of the largest magnitude
  for ours, theirs in zip(*results, strict=True):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tolerance * np.abs(theirs).max())


@needs_kernels
@pytest.mark.parametrize("layer", [layers.UpConv, layers.DownConv])
def test_k4s2_layers_with_onednn_call_the_kernels_and_with_xla_do_not(layer):
  x = np.zeros((1, 8, 8, 3), np.float32)
  for conv_impl, calls in (("onednn", True), ("xla", False)):
    module = layer(3, 5, conv_impl=conv_impl, rngs=nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda x, module=module: module(x))(x))
    assert ("gan_cpu_kernels_conv" in jaxpr) == calls


def test_unknown_activation_is_a_user_error():
  with pytest.raises(UserError, match="model.activation"):
    layers.get_activation("tanh-ish")


def test_dcgan_leaky_relu_has_slope_one_fifth():
  np.testing.assert_allclose(layers.leaky_relu(jnp.array([-1.0, 2.0])), [-0.2, 2.0])
