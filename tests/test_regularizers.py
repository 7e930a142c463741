"""The options against collapse, each against an independent computation: spectral norm, R1,
WGAN-GP, DiffAugment, the minibatch-std feature and PacGAN packing; and a short run with them."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, judge_only_non_finite, plain_leaves, poison, tiny_config
from flax import nnx

from gan import config as config_lib
from gan import inference, losses, rollback, trainer
from gan import state as state_lib
from gan import step as step_lib
from gan.errors import UserError
from gan.models import augment, layers

_RESOLUTION = {"dense": 8, "dcgan": 16}


def _config(family: str, **overrides):
  """A validated tiny config whose D is a plain function of each input: no dropout, no
  BatchNorm, computed by XLA (the finite differences below need each sample alone)."""
  overrides.setdefault("data__resolution", _RESOLUTION[family])
  overrides.setdefault("model__conv_impl", "xla")
  if family == "dense":
    overrides.setdefault("model__d_dropout", 0.0)
  else:
    overrides.setdefault("model__d_norm", "layer")
    overrides.setdefault("model__base_width", 4)
  return config_lib.validate(tiny_config(family, **overrides))


def _images(batch: int, resolution: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)


def _discriminate(nets, d, x, params=None):
  """D's logits in training mode, its statistics discarded (as the penalties' passes)."""
  logits, _ = step_lib._apply(
    nets.discriminator, d, x, params=params, rngs=nnx.Rngs(dropout=jax.random.key(0))
  )
  return logits


def _finite_difference_norms(nets, d, x: np.ndarray, step: float = 1e-2) -> np.ndarray:
  """The squared norm of the gradient of each D logit with respect to its input (a pack of
  `nets.d_pack` images), by central differences in each input coordinate in turn."""
  discriminate = jax.jit(functools.partial(_discriminate, nets, d))
  pack = nets.d_pack
  norms = []
  for group in x.reshape(x.shape[0] // pack, pack, *x.shape[1:]):
    size = group.size
    offsets = (step * np.eye(size, dtype=np.float32)).reshape(size, *group.shape)
    plus = (group[None] + offsets).reshape(size * pack, *x.shape[1:])
    minus = (group[None] - offsets).reshape(size * pack, *x.shape[1:])
    derivatives = (np.asarray(discriminate(plus)) - np.asarray(discriminate(minus))) / (2 * step)
    norms.append(np.sum(np.square(derivatives.astype(np.float64))))
  return np.array(norms)


def _norm_of(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


# --- Spectral norm ---


def test_spectral_norm_leaves_a_largest_singular_value_of_one_after_power_iteration():
  rngs = nnx.Rngs(0)
  layer = layers.SpectralNorm(layers.Linear(24, 16, conv_impl="xla", rngs=rngs), rngs=rngs)
  graph, params, stats = nnx.split(layer, nnx.Param, nnx.BatchStat)
  x = np.ones((1, 24), np.float32)  # any input: the iteration does not depend on it

  @functools.partial(jax.jit, static_argnames="train")
  def call(stats, x, train):
    module = nnx.merge(graph, params, stats)
    return module(x, train=train), nnx.state(module, nnx.BatchStat)

  for _ in range(200):
    _, stats = call(stats, x, True)
  # What the layer computes with: its outputs at the unit vectors, less its bias.
  bias = np.asarray(call(stats, np.zeros((1, 24), np.float32), False)[0])
  effective = np.asarray(call(stats, np.eye(24, dtype=np.float32), False)[0]) - bias
  kernel = np.asarray(params["layer"]["kernel"][...])
  np.testing.assert_allclose(np.linalg.svd(effective, compute_uv=False)[0], 1.0, rtol=1e-3)
  np.testing.assert_allclose(
    effective, kernel / np.linalg.svd(kernel, compute_uv=False)[0], rtol=1e-3, atol=1e-5
  )
  # The parameters are left as they are, and evaluation does not move the iteration.
  np.testing.assert_array_equal(nnx.state(layer, nnx.Param)["layer"]["kernel"][...], kernel)
  _, after_eval = call(stats, x, False)
  np.testing.assert_array_equal(after_eval["u"][...], stats["u"][...])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "dense"])
def test_every_weight_layer_of_d_carries_its_power_iteration_in_the_batch_stats(family):
  config = _config(family, model__d_spectral_norm=True)
  nets, state = state_lib.create_train_state(config)
  paths = {
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_leaves_with_path(state.d.batch_stats)
  }
  kernels = {
    jax.tree_util.keystr(path).replace("['layer']['kernel']", "['u']")
    for path, _ in jax.tree_util.tree_leaves_with_path(state.d.params)
    if path[-1].key == "kernel"
  }
  assert kernels and kernels <= paths
  stats = step_lib._apply(nets.discriminator, state.d, _images(8, config.data.resolution))[1]
  # Training moves every vector, but a one-column kernel's, which is its sign.
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(plain_leaves(state.d.batch_stats), plain_leaves(stats), strict=True)
    if a.size > 1
  ]
  assert changed and all(changed)


# --- R1 and WGAN-GP ---


@pytest.mark.parametrize(
  ("family", "pack"), [("dense", 1), ("dense", 2), pytest.param("dcgan", 1, marks=pytest.mark.slow)]
)
def test_d_input_gradient_norms_match_finite_differences(family, pack):
  config = _config(family, model__d_pack=pack)
  nets, state = state_lib.create_train_state(config)
  x = _images(4, config.data.resolution)
  norms = step_lib._input_gradient_norms(nets, state.d, state.d.params, x, jax.random.key(0))
  assert norms.shape == (4 // pack,)
  np.testing.assert_allclose(norms, _finite_difference_norms(nets, state.d, x), rtol=2e-2)


def test_r1_is_half_gamma_times_the_mean_squared_gradient_norm_on_every_r1_every_update():
  config = _config("dense", train__r1_gamma=3.0, train__r1_every=4)
  nets, state = state_lib.create_train_state(config)
  real = _images(4, config.data.resolution)
  value, grads = step_lib._r1(nets, config.train, state.d, real, jax.random.key(0))
  expected = 4 * 3.0 / 2 * np.mean(_finite_difference_norms(nets, state.d, real))
  assert float(value) == pytest.approx(expected, rel=2e-2)
  assert _norm_of(grads) > 0

  # The next D update is not due: nothing is added.
  later = state.d.replace(opt_state=state.d.opt_state._replace(count=jnp.ones((), jnp.int32)))
  value, grads = step_lib._r1(nets, config.train, later, real, jax.random.key(0))
  assert float(value) == 0 and _norm_of(grads) == 0


def test_wgan_gp_penalises_the_distance_of_gradient_norms_from_one():
  config = _config("dense", train__loss="wgan_gp", train__gp_gamma=10.0)
  nets, state = state_lib.create_train_state(config)
  x = _images(4, config.data.resolution)
  # With real == fake every point between them is x, whatever the draw.
  penalty = step_lib._gradient_penalty(
    nets, config.train, state.d, state.d.params, x, x, jax.random.key(1)
  )
  norms = np.sqrt(_finite_difference_norms(nets, state.d, x))
  assert float(penalty) == pytest.approx(10 * np.mean((norms - 1) ** 2), rel=2e-2)

  real, fake = x, _images(4, config.data.resolution, seed=1)
  loss, (_, real_logits, fake_logits, penalties) = step_lib.discriminator_loss(
    nets, config.train, state.d, state.d.params, real, fake, jax.random.key(2)
  )
  critic = float(jnp.mean(fake_logits) - jnp.mean(real_logits))
  assert float(loss) == pytest.approx(critic + float(penalties["d_gp"]), rel=1e-5)


def test_the_wasserstein_losses_are_the_critics_mean_differences():
  real, fake = jnp.array([1.0, 3.0]), jnp.array([-2.0, 0.0])
  assert float(losses.discriminator_loss("wgan_gp", real, fake)) == pytest.approx(-3.0)
  assert float(losses.generator_loss("wgan_gp", fake)) == pytest.approx(1.0)


# --- DiffAugment ---


def _augment(x, policy, seed=0):
  return np.asarray(augment.augment(jnp.asarray(x), policy, jax.random.key(seed)))


def test_no_diffaugment_leaves_d_s_inputs_as_they_are():
  config = tiny_config("dcgan")
  images = jnp.asarray(_images(2, 32))
  assert step_lib._augment(config.train, images, jax.random.key(0)) is images


@pytest.mark.parametrize("policy", ["translation", "cutout", "translation,cutout"])
def test_one_key_gives_real_and_fake_batches_the_same_transform(policy):
  # Translation and cutout are linear in the image: the same transform of two batches adds up
  # to the transform of their sum, which different transforms would not.
  real, fake = _images(8, 16, seed=0), _images(8, 16, seed=1)
  np.testing.assert_allclose(
    _augment(real, policy) + _augment(fake, policy), _augment(real + fake, policy), atol=1e-6
  )
  assert not np.allclose(_augment(real, policy, seed=0), _augment(real, policy, seed=1))


def test_translation_shifts_each_image_by_at_most_an_eighth_of_its_side():
  images = np.zeros((16, 32, 32, 3), np.float32)
  images[:, 16, 16, :] = 1.0
  shifted = _augment(images, "translation")
  for image in shifted:
    (rows, cols, _) = np.nonzero(image)
    assert len(set(rows)) == 1 and len(set(cols)) == 1
    assert abs(rows[0] - 16) <= 4 and abs(cols[0] - 16) <= 4
  assert len({tuple(np.argwhere(image)[0, :2]) for image in shifted}) > 1


def test_cutout_zeroes_one_square_of_half_the_side_clipped_by_the_edges():
  cut = _augment(np.ones((16, 32, 32, 3), np.float32), "cutout")
  for image in cut:
    rows, cols = np.nonzero(image[..., 0] == 0)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert height <= 16 and width <= 16 and len(rows) == height * width


def test_color_keeps_grey_images_grey_and_moves_their_brightness():
  grey = np.repeat(_images(8, 8)[..., :1], 3, axis=-1)
  coloured = _augment(grey, "color")
  np.testing.assert_allclose(coloured[..., 0], coloured[..., 2], atol=1e-6)
  assert not np.allclose(coloured, grey)


@pytest.mark.slow
def test_gradients_flow_through_every_transform_to_the_images():
  images = jnp.asarray(_images(4, 16))

  def total(x):
    return jnp.sum(augment.augment(x, "color,translation,cutout", jax.random.key(0)) ** 2)

  grads = np.asarray(jax.grad(total)(images))
  assert np.all(np.isfinite(grads)) and np.count_nonzero(grads) > grads.size // 4


# --- Minibatch std and packing ---


def test_minibatch_std_is_the_mean_over_features_of_the_batch_standard_deviation():
  x = np.random.default_rng(0).standard_normal((6, 4, 4, 5)).astype(np.float32)
  out = np.asarray(layers.minibatch_std(jnp.asarray(x)))
  expected = np.mean(np.sqrt(np.var(x.astype(np.float64), axis=0) + 1e-8))
  assert out.shape == (6, 4, 4, 6)
  np.testing.assert_array_equal(out[..., :5], x)
  np.testing.assert_allclose(out[..., 5], expected, rtol=1e-5)
  identical = np.asarray(layers.minibatch_std(jnp.asarray(np.repeat(x[:1], 6, axis=0))))
  assert np.all(identical[..., 5] < 1e-3) and expected > 0.5


def test_packing_puts_each_group_of_images_side_by_side_on_the_channels():
  x = _images(6, 4)
  packed = np.asarray(layers.pack(jnp.asarray(x), 3))
  assert packed.shape == (2, 4, 4, 9)
  np.testing.assert_array_equal(packed[1], np.concatenate(list(x[3:6]), axis=-1))


@pytest.mark.parametrize("family", [pytest.param("dcgan", marks=pytest.mark.slow), "dense"])
@pytest.mark.parametrize("option", ["model__d_pack", "model__d_minibatch_std"])
def test_d_tells_a_batch_of_copies_from_a_varied_one_only_with_the_option(family, option):
  """The same first image gets another logit in a batch of copies than in a varied batch when D
  sees the batch (packing, minibatch std), and the same logit without the option."""
  value = 2 if option == "model__d_pack" else True
  varied = _images(4, _RESOLUTION[family])
  copies = np.repeat(varied[:1], 4, axis=0)
  for on, config in ((True, _config(family, **{option: value})), (False, _config(family))):
    nets, state = state_lib.create_train_state(config)
    first_logits = [float(_discriminate(nets, state.d, x)[0]) for x in (varied, copies)]
    assert (first_logits[0] != pytest.approx(first_logits[1], abs=1e-4)) == on


# --- Configuration ---


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"model__d_pack": 0}, "model.d_pack must be positive"),
    ({"model__d_pack": 3}, r"train.batch_size \(8\) must be a multiple of model.d_pack \(3\)"),
    ({"train__r1_gamma": -1.0}, "train.r1_gamma must be in"),
    ({"train__r1_every": 0}, "train.r1_every must be positive"),
    ({"train__gp_gamma": float("nan")}, "train.gp_gamma must be a finite number"),
    ({"train__diffaugment": "colour"}, "unknown train.diffaugment transform 'colour'"),
    ({"train__diffaugment": "cutout,cutout"}, "train.diffaugment names a transform twice"),
    ({"model__d_norm": "group"}, "unknown model.d_norm 'group'"),
    ({"train__loss": "wgan_gp"}, "wgan_gp .* set model.d_norm=layer"),
    (
      {"train__loss": "wgan_gp", "model__d_norm": "none", "train__gp_gamma": 0.0},
      "train.loss=wgan_gp needs train.gp_gamma > 0",
    ),
    (
      {"train__r1_gamma": 1.0, "model__conv_impl": "onednn"},
      "model.conv_impl=onednn cannot differentiate D's gradient",
    ),
  ],
)
def test_bad_anti_collapse_settings_are_one_line_naming_the_field(overrides, message):
  with pytest.raises(UserError, match=message):
    config_lib.validate(tiny_config("dcgan", **overrides))


@pytest.mark.parametrize("field", ["d_spectral_norm", "d_minibatch_std"])
def test_a_switch_that_is_not_a_boolean_is_refused(field):
  config = tiny_config("dcgan")
  del config.model[field]  # a config file's own field of another type; overrides keep the type
  config.model[field] = 1
  with pytest.raises(UserError, match=f"model.{field} must be True or False, got 1"):
    config_lib.validate(config)


def test_a_gradient_penalty_resolves_auto_to_the_xla_convolutions():
  config = config_lib.validate(tiny_config("dcgan", train__r1_gamma=1.0))
  assert config.model.conv_impl == "xla"


def test_a_run_recorded_before_the_options_existed_reads_and_resumes_with_them_off(tmp_path):
  config = config_lib.validate(tiny_config("dcgan"))
  recorded = json.loads(config.to_json_best_effort())
  for name in ("d_norm", "d_spectral_norm", "d_minibatch_std", "d_pack"):
    del recorded["model"][name]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  read = inference.read_config(str(tmp_path))
  assert read.model.d_norm == "batch" and read.model.d_pack == 1
  assert not read.model.d_spectral_norm and not read.model.d_minibatch_std
  trainer._check_resumable(str(tmp_path), config)  # the same networks: no refusal
  with pytest.raises(UserError, match="model.d_pack 1 -> 2"):
    trainer._check_resumable(
      str(tmp_path), config_lib.validate(tiny_config("dcgan", model__d_pack=2))
    )


def test_every_option_is_off_in_the_recipes():
  for family in ("dcgan", "dense"):
    config = tiny_config(family)
    assert not config.model.d_spectral_norm and not config.model.d_minibatch_std
    assert config.model.d_pack == 1
    assert config.train.r1_gamma == 0 and config.train.diffaugment == ""
    assert config.train.loss != "wgan_gp"


# --- A short run with every option ---

_EVERY_OPTION = dict(
  model__d_spectral_norm=True,
  model__d_minibatch_std=True,
  model__d_pack=2,
  train__r1_gamma=1.0,
  train__r1_every=2,
  train__diffaugment="color,translation,cutout",
  train__loss="wgan_gp",
)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "dense"])
def test_a_run_with_every_option_is_finite_and_resumes_bit_for_bit(family, tmp_path):
  norm = {"model__d_norm": "layer"} if family == "dcgan" else {}

  def run(workdir, steps):
    config = tiny_config(family, train__num_steps=steps, **_EVERY_OPTION, **norm)
    config.eval.metrics = ()  # the state is compared, not the quality metrics
    return trainer.train_and_evaluate(config, str(tmp_path / workdir))

  run("broken", 2)
  resumed = run("broken", 4)
  straight = run("straight", 4)
  leaves = plain_leaves(straight)
  assert all(np.all(np.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
  for a, b in zip(plain_leaves(resumed), leaves, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_run_with_every_option_rolls_back_and_goes_on(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(
    judge_only_non_finite(tiny_config("dense", train__num_steps=4, **_EVERY_OPTION)), workdir
  )
  config = judge_only_non_finite(tiny_config("dense", train__num_steps=8, **_EVERY_OPTION))
  poison(workdir, config, 4)

  final = trainer.train_and_evaluate(config, workdir)

  with open(os.path.join(workdir, rollback.ROLLBACKS_FILE)) as f:
    (event,) = [json.loads(line) for line in f]
  assert (event["from_step"], event["to_step"]) == (6, 4) and "non-finite" in event["reason"]
  assert int(final.step) == 8
  leaves = plain_leaves(final)  # spectral norm's power-iteration vectors among them
  assert all(np.all(np.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "dense"])
def test_every_option_trains_in_bfloat16_with_float32_weights(family):
  norm = {"model__d_norm": "layer"} if family == "dcgan" else {}
  config = config_lib.validate(
    tiny_config(family, model__dtype="bfloat16", **_EVERY_OPTION, **norm)
  )
  nets, state = state_lib.create_train_state(config)
  step = jax.jit(functools.partial(step_lib.train_step, nets, config.train))
  for i in range(3):
    batch = {"image": _images(8, config.data.resolution, seed=i)}
    state, metrics = step(state, batch, jax.random.fold_in(state.rng, i))
  assert {"d_gp", "d_r1"} <= set(metrics)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  weights = [state.g.params, state.d.params, state.d.batch_stats, state.ema]
  assert {x.dtype for x in jax.tree.leaves(weights)} == {np.dtype("float32")}


# Runs in a fresh Python that sees 8 CPU devices; prints the largest gap between the states,
# relative to each array's largest value (at least 1): the penalties make D's gradients, and so
# its Adam moments, large.
_ON_EIGHT_DEVICES = """
import json, sys
import numpy as np
from conftest import plain_leaves, tiny_config
from gan import trainer
from test_regularizers import _EVERY_OPTION

def run(name, devices):
  config = tiny_config("dense", mesh__data_axis_size=devices, **_EVERY_OPTION)
  config.eval.metrics = ()
  return trainer.train_and_evaluate(config, f"{sys.argv[1]}/{name}")

def gap(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))

pairs = zip(plain_leaves(run("one", 1)), plain_leaves(run("eight", 8)), strict=True)
print(json.dumps(max(gap(a, b) for a, b in pairs)))
"""


@pytest.mark.slow
def test_every_option_on_eight_devices_computes_what_one_does(tmp_path):
  """Packing and the minibatch std span the whole batch, which the devices split."""
  result = subprocess.run(
    [sys.executable, "-c", _ON_EIGHT_DEVICES, str(tmp_path)],
    cwd=os.path.join(ROOT, "tests"),
    env={**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) < 1e-5
