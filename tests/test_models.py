"""Generators and discriminators of both families: shapes, sizes, modes, dtypes, errors, state."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import dcgan as dcgan_config
from configs import dense as dense_config
from gan import config as config_lib
from gan.errors import UserError
from gan.models import count_params, create_models, layers, resolve_conv_impl

FAMILIES = ("dcgan", "dense")

try:
  layers.cpu_kernels()
  _kernels_installed = True
except ImportError:
  _kernels_installed = False
needs_kernels = pytest.mark.skipif(
  not _kernels_installed, reason="gan_cpu_kernels is not installed (`make setup` installs it)"
)


def _model_config(name, **overrides):
  """Small networks of each family; the real recipe sizes are only built abstractly."""
  if name == "dcgan":
    config = dict(name="dcgan", latent_dim=16, base_width=8, dtype="float32", conv_impl="auto")
  else:
    config = dict(
      name="dense",
      latent_dim=16,
      g_widths=(32, 64),
      d_widths=(64, 32),
      activation="relu",
      g_norm="batch",
      d_norm="none",
      d_dropout=0.3,
      dtype="float32",
      conv_impl="auto",
    )
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def _models(name, resolution=32, seed=0, **overrides):
  return create_models(_model_config(name, **overrides), resolution, rngs=nnx.Rngs(seed))


def _noise(batch, latent_dim=16, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, latent_dim), np.float32)


def _images(batch, resolution, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, resolution, resolution, 3))


# Jitted calls: one compile per network instead of one per operation makes the tests faster.
@functools.partial(nnx.jit, static_argnames="train")
def _generate(generator, z, train):
  return generator(z, train=train)


@functools.partial(nnx.jit, static_argnames="train")
def _discriminate(discriminator, x, train, rngs=None):
  return discriminator(x, train=train, rngs=rngs)


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("name", FAMILIES)
def test_generator_makes_float32_images_of_the_resolution(name, resolution):
  generator, _ = _models(name, resolution)
  images = _generate(generator, _noise(4), train=True)
  assert images.shape == (4, resolution, resolution, 3)
  assert images.dtype == jnp.float32


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("name", FAMILIES)
def test_discriminator_gives_one_finite_float32_logit_per_image(name, resolution):
  _, discriminator = _models(name, resolution)
  logits = _discriminate(
    discriminator, _images(4, resolution), train=True, rngs=nnx.Rngs(dropout=0)
  )
  assert logits.shape == (4,)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


_EVERY_D_OPTION = dict(d_spectral_norm=True, d_minibatch_std=True, d_pack=2, conv_impl="xla")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_discriminator_with_every_option_gives_one_float32_logit_per_pack(name, dtype):
  overrides = dict(_EVERY_D_OPTION, dtype=dtype, **({"d_norm": "layer"} if name == "dcgan" else {}))
  _, discriminator = _models(name, **overrides)
  graphdef, params, batch_stats = nnx.split(discriminator, nnx.Param, nnx.BatchStat)
  assert {x.dtype for x in jax.tree.leaves((params, batch_stats))} == {np.dtype("float32")}
  logits = _discriminate(discriminator, _images(8, 32), train=True, rngs=nnx.Rngs(dropout=0))
  assert logits.shape == (4,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_each_discriminator_option_adds_only_the_parameters_it_needs():
  def extra(name, **options):
    return count_params(_models(name, **options)[1]) - count_params(_models(name)[1])

  # DCGAN at 32 px, base width 8: stem 4x4x3x8; downs 8->16->32 with BN (2 * (16 + 32)).
  assert extra("dcgan", d_pack=2) == 16 * 3 * 8  # three more input channels in the stem
  assert extra("dcgan", d_minibatch_std=True) == 16  # one more channel into the 4x4 logit conv
  assert extra("dcgan", d_spectral_norm=True) == 0  # its vectors are batch stats
  assert extra("dcgan", d_norm="layer") == 0  # a scale and a bias per channel, as BatchNorm
  assert extra("dcgan", d_norm="none") == -(16 + 32)  # conv biases instead of BN's two
  # Dense at 32 px, d_widths (64, 32).
  assert extra("dense", d_pack=2) == 32 * 32 * 3 * 64
  assert extra("dense", d_minibatch_std=True) == 1
  assert extra("dense", d_spectral_norm=True) == 0


def test_dcgan_makes_128px_images():
  generator, discriminator = nnx.eval_shape(lambda: _models("dcgan", 128))
  images = nnx.eval_shape(lambda g, z: g(z, train=False), generator, jnp.zeros((2, 16)))
  logits = nnx.eval_shape(lambda d, x: d(x, train=False), discriminator, images)
  assert images.shape == (2, 128, 128, 3)
  assert logits.shape == (2,)


def test_parameter_counts_of_the_dcgan_recipe_at_64px():
  config = _model_config("dcgan", latent_dim=100, base_width=64)
  generator, discriminator = nnx.eval_shape(lambda: create_models(config, 64, rngs=nnx.Rngs(0)))
  # G: Linear 100*(4*4*512) no bias; UpConvs 4*4*512*256, 4*4*256*128, 4*4*128*64, all without
  # bias (BN follows); to_rgb 4*4*64*3 + 3 bias; BN scale+bias 2*(512+256+128+64).
  assert count_params(generator) == (
    100 * 8192 + 16 * 512 * 256 + 16 * 256 * 128 + 16 * 128 * 64 + (16 * 64 * 3 + 3)
  ) + 2 * (512 + 256 + 128 + 64)  # 3,576,707: PyTorch's DCGAN G (3,576,704) + 3 output biases
  # D: stem 4*4*3*64 + 64 bias; convs 4*4*64*128, 4*4*128*256, 4*4*256*512 (no bias, BN
  # follows); to_logit 4*4*512*1 + 1; BN scale+bias 2*(128+256+512).
  assert count_params(discriminator) == (
    (16 * 3 * 64 + 64) + 16 * 64 * 128 + 16 * 128 * 256 + 16 * 256 * 512 + (16 * 512 + 1)
  ) + 2 * (128 + 256 + 512)  # 2,765,633: PyTorch's DCGAN D (2,765,568) + 65 biases


def test_parameter_counts_of_the_dense_recipe_at_64px():
  config = _model_config(
    "dense", latent_dim=100, g_widths=(256, 512, 1024), d_widths=(1024, 512, 256)
  )
  generator, discriminator = nnx.eval_shape(lambda: create_models(config, 64, rngs=nnx.Rngs(0)))
  # G (g_norm='batch', so the hidden Linears have no bias): 100*256, 256*512, 512*1024;
  # BN scale+bias 2*(256+512+1024); output 1024*(64*64*3) + 12288 bias.
  assert count_params(generator) == (
    100 * 256 + 256 * 512 + 512 * 1024 + 2 * (256 + 512 + 1024) + (1024 * 12288 + 12288)
  )  # 13,279,744
  # D (d_norm='none'): 12288*1024 + 1024, 1024*512 + 512, 512*256 + 256, 256*1 + 1.
  assert count_params(discriminator) == (
    (12288 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 256 + 256) + (256 + 1)
  )  # 13,240,321


@pytest.mark.parametrize("name", FAMILIES)
def test_generator_images_lie_in_minus_one_to_one(name):
  generator, _ = _models(name)
  # Large noise pushes the tanh into saturation, where a missing squash would show.
  images = np.asarray(_generate(generator, 100 * _noise(8), train=False))
  assert images.min() >= -1 and images.max() <= 1
  assert images.max() - images.min() > 0.1


def test_dcgan_uses_the_dcgan_initialisation():
  generator, discriminator = _models("dcgan", 64)
  kernels = [
    generator.project.kernel,
    *(up.kernel for up in generator.ups),
    generator.to_rgb.kernel,
  ]
  kernels += [discriminator.stem.kernel, *(down.kernel for down in discriminator.downs)]
  kernels = [
    np.asarray(kernel[...]).ravel() for kernel in [*kernels, discriminator.to_logit.kernel]
  ]
  for kernel in kernels:
    assert kernel.std() == pytest.approx(0.02, rel=0.2)
  assert np.concatenate(kernels).mean() == pytest.approx(0, abs=1e-3)
  assert np.concatenate(kernels).std() == pytest.approx(0.02, rel=0.05)
  norms = [*generator.norms, generator.project_norm, *discriminator.norms]
  scales = np.concatenate([np.asarray(norm.scale[...]) for norm in norms])
  assert scales.mean() == pytest.approx(1, abs=5e-3)
  assert scales.std() == pytest.approx(0.02, rel=0.2)
  biases = [generator.to_rgb.bias, discriminator.stem.bias, discriminator.to_logit.bias]
  assert not any(np.any(np.asarray(bias[...])) for bias in biases)


def test_dropout_changes_discriminator_outputs_only_in_training():
  _, discriminator = _models("dense", d_dropout=0.5)
  images = _images(4, 32)

  def logits(train, seed):
    return np.asarray(
      _discriminate(discriminator, images, train=train, rngs=nnx.Rngs(dropout=seed))
    )

  assert not np.allclose(logits(True, 0), logits(True, 1))
  np.testing.assert_array_equal(logits(False, 0), logits(False, 1))
  np.testing.assert_array_equal(_discriminate(discriminator, images, train=False), logits(False, 0))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_compute_keeps_float32_parameters_and_outputs(name):
  generator32, discriminator32 = _models(name)
  generator16, discriminator16 = _models(name, dtype="bfloat16")
  for model in (generator16, discriminator16):
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    assert {s.dtype for s in jax.tree.leaves(nnx.state(model, nnx.BatchStat))} <= {
      np.dtype("float32")
    }
  z, x = _noise(4), _images(4, 32)
  images16, images32 = _generate(generator16, z, train=True), _generate(generator32, z, train=True)
  logits16 = _discriminate(discriminator16, x, train=False)
  logits32 = _discriminate(discriminator32, x, train=False)
  assert images16.dtype == logits16.dtype == jnp.float32
  np.testing.assert_allclose(images16, images32, atol=0.05)
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.max(jnp.abs(logits32))))


def _validate(family, resolution=32, **model_overrides):
  """gan.config.validate on the family's smoke config with these model settings."""
  config = (dcgan_config if family == "dcgan" else dense_config).get_config("smoke")
  config.data.resolution = resolution
  config.model.update(model_overrides)
  return config_lib.validate(config)


def test_unknown_model_name_is_a_user_error():
  with pytest.raises(UserError, match="model.name 'resnet'"):
    _validate("dcgan", name="resnet")


@pytest.mark.parametrize(
  ("name", "resolution"), [("dcgan", 48), ("dcgan", 8), ("dcgan", 100), ("dense", 4)]
)
def test_impossible_resolution_is_a_user_error(name, resolution):
  with pytest.raises(UserError, match=f"{resolution} px"):
    _validate(name, resolution)


@pytest.mark.parametrize(
  ("name", "field", "value"),
  [
    ("dcgan", "base_width", 0),
    ("dcgan", "latent_dim", -3),
    ("dcgan", "dtype", "float16"),
    ("dense", "g_widths", ()),
    ("dense", "d_widths", (64, 0)),
    ("dense", "activation", "swish"),
    ("dense", "g_norm", "group"),
    ("dense", "d_norm", "batch"),
    ("dense", "d_dropout", 1.0),
    ("dense", "conv_impl", "cuda"),
  ],
)
def test_bad_model_setting_is_a_user_error_naming_it(name, field, value):
  with pytest.raises(UserError, match=f"model.{field}"):
    _validate(name, **{field: value})


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_stats_update_under_jit_only_in_training(name):
  """The trainer's functional use: split once, merge inside jit, split again for new stats."""
  generator, _ = _models(name)
  # Raises if the model held any state besides parameters and batch statistics.
  graphdef, params, batch_stats = nnx.split(generator, nnx.Param, nnx.BatchStat)
  assert jax.tree.leaves(batch_stats)

  @functools.partial(jax.jit, static_argnames="train")
  def apply(params, batch_stats, z, train):
    model = nnx.merge(graphdef, params, batch_stats)
    images = model(z, train=train)
    _, new_params, new_batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return images, new_params, new_batch_stats

  z = _noise(8)
  _, params_after, stats_after_train = apply(params, batch_stats, z, train=True)
  _, _, stats_after_eval = apply(params, batch_stats, z, train=False)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), batch_stats, stats_after_train)
  assert all(jax.tree.leaves(changed))
  for before, after in zip(
    jax.tree.leaves(batch_stats), jax.tree.leaves(stats_after_eval), strict=True
  ):
    np.testing.assert_array_equal(before, after)
  for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(params_after), strict=True):
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("name", FAMILIES)
def test_discriminator_state_splits_into_params_and_batch_stats_only(name):
  _, discriminator = _models(name)
  graphdef, params, batch_stats = nnx.split(discriminator, nnx.Param, nnx.BatchStat)

  @jax.jit
  def logits(params, batch_stats, x, key):
    model = nnx.merge(graphdef, params, batch_stats)
    return model(x, train=True, rngs=nnx.Rngs(dropout=key))

  assert logits(params, batch_stats, _images(4, 32), jax.random.key(0)).shape == (4,)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_generator_parameter_receives_a_gradient_under_jit(name):
  """The trainer's gradient step: merge inside the differentiated function, new stats as aux."""
  generator, _ = _models(name)
  graphdef, params, batch_stats = nnx.split(generator, nnx.Param, nnx.BatchStat)

  @jax.jit
  def grads_and_batch_stats(params, batch_stats, z):
    def loss(params):
      # copy=True: BatchNorm writes its statistics under jax.grad's trace, and Variables that
      # came in from the enclosing jit trace cannot be written there (TraceContextError).
      model = nnx.merge(graphdef, params, batch_stats, copy=True)
      images = model(z, train=True)
      weights = jnp.linspace(-1, 1, images.size).reshape(images.shape)
      return jnp.mean(images * weights), nnx.state(model, nnx.BatchStat)

    return jax.grad(loss, has_aux=True)(params)

  grads, new_batch_stats = grads_and_batch_stats(params, batch_stats, _noise(4))
  for grad in jax.tree.leaves(grads):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  for before, after in zip(
    jax.tree.leaves(batch_stats), jax.tree.leaves(new_batch_stats), strict=True
  ):
    assert np.any(before != after)


def test_xla_is_xla_everywhere():
  assert resolve_conv_impl("xla", "float32") == resolve_conv_impl("xla", "bfloat16") == "xla"


@needs_kernels
def test_auto_is_onednn_on_the_cpu_where_the_kernels_run():
  assert resolve_conv_impl("auto", "float32") == resolve_conv_impl("onednn", "float32") == "onednn"


def test_auto_is_xla_on_other_backends_where_onednn_is_a_user_error(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve_conv_impl("auto", "float32") == "xla"
  with pytest.raises(UserError, match="backend is gpu.*Use model.conv_impl=xla"):
    resolve_conv_impl("onednn", "float32")


def test_without_the_kernels_auto_is_xla_and_onednn_a_user_error(monkeypatch):
  def missing():
    raise ImportError("No module named 'gan_cpu_kernels'")

  monkeypatch.setattr(layers, "cpu_kernels", missing)
  assert resolve_conv_impl("auto", "float32") == "xla"
  with pytest.raises(UserError, match="not installed.*Use model.conv_impl=xla"):
    resolve_conv_impl("onednn", "float32")


def test_a_dtype_the_kernels_lack_is_xla_for_auto_and_a_user_error_for_onednn(monkeypatch):
  def supports(compute_dtype, param_dtype):
    return jnp.dtype(compute_dtype) == jnp.float32

  monkeypatch.setattr(layers, "cpu_kernels", lambda: SimpleNamespace(supports=supports))
  assert resolve_conv_impl("auto", "float32") == "onednn"
  assert resolve_conv_impl("auto", "bfloat16") == "xla"
  with pytest.raises(UserError, match="no bfloat16 convolutions"):
    resolve_conv_impl("onednn", "bfloat16")


def test_unknown_conv_impl_is_a_user_error():
  with pytest.raises(UserError, match="model.conv_impl 'cudnn'"):
    resolve_conv_impl("cudnn", "float32")


@pytest.mark.parametrize("conv_impl", ["xla", pytest.param("onednn", marks=needs_kernels)])
def test_every_layer_gets_the_models_conv_impl(conv_impl):
  generator, discriminator = _models("dcgan", conv_impl=conv_impl)
  convs = [generator.project, *generator.ups, generator.to_rgb, discriminator.stem]
  assert {layer.conv_impl for layer in [*convs, *discriminator.downs]} == {conv_impl}


@needs_kernels
def test_dcgan_computes_the_same_with_onednn_and_xla():
  z, x = _noise(4), _images(4, 32)
  outputs = []
  for conv_impl in ("xla", "onednn"):
    generator, discriminator = _models("dcgan", conv_impl=conv_impl)
    outputs.append(
      (_generate(generator, z, train=True), _discriminate(discriminator, x, train=True))
    )
  for ours, theirs in zip(*outputs, strict=True):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
