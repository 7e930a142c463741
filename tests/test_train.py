"""The train state, the train step and the loop, on tiny real configs."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from conftest import plain_leaves, tiny_config

from gan import config as config_lib
from gan import losses, monitoring, trainer
from gan import state as state_lib
from gan import step as step_lib
from gan.errors import UserError


def _real_batch(config, seed=0):
  resolution = config.data.resolution
  rng = np.random.default_rng(seed)
  shape = (config.train.batch_size, resolution, resolution, 3)
  return {"image": rng.uniform(-1, 1, shape).astype(np.float32)}


def _assert_trees_equal(a, b):
  for x, y in zip(plain_leaves(a), plain_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", ["dcgan", "dense"])
def test_train_state_holds_both_networks_and_starts_at_step_zero(family):
  _, state = state_lib.create_train_state(tiny_config(family))
  assert int(state.step) == 0
  assert plain_leaves(state.g.params) and plain_leaves(state.d.params)
  _assert_trees_equal(state.ema, state.g.params)


@pytest.mark.slow
def test_discriminator_update_lowers_its_loss_on_a_fixed_batch():
  config = tiny_config("dcgan")
  nets, state = state_lib.create_train_state(config)
  real = jnp.asarray(_real_batch(config)["image"])
  z = jax.random.normal(jax.random.PRNGKey(1), (real.shape[0], nets.latent_dim))
  fake = step_lib.generate(nets, state.g.params, state.g.batch_stats, z)
  key = jax.random.PRNGKey(2)

  def loss_of(s):
    return float(
      step_lib.discriminator_loss(nets, config.train, s.d, s.d.params, real, fake, key)[0]
    )

  before = loss_of(state)
  for i in range(3):
    state, _ = step_lib.d_step(nets, config.train, state, real, jax.random.PRNGKey(10 + i))
  assert loss_of(state) < before


@pytest.mark.parametrize("batch", [32, 128])
def test_the_ema_halves_a_weight_s_share_after_ema_kimg_thousand_images_whatever_the_batch(batch):
  config = tiny_config("dense", train__batch_size=batch, train__ema_kimg=8.0, train__ema_rampup=0.0)
  steps = 8000 / batch  # steps in which ema_kimg thousand images go by
  decay = step_lib.ema_decay(config.train, jnp.int32(1_000_000))
  assert float(decay) ** steps == pytest.approx(0.5, rel=1e-4)


def test_the_ema_s_half_life_ramps_up_with_the_images_trained_on():
  config = tiny_config("dense", train__batch_size=64, train__ema_kimg=20.0, train__ema_rampup=0.05)
  # At step 100, 6,400 images: a half-life of 5% of them, 320 images, 5 steps.
  assert float(step_lib.ema_decay(config.train, jnp.int32(100))) ** 5 == pytest.approx(
    0.5, rel=1e-4
  )
  # From 400,000 images on, the 20,000 of ema_kimg: 312.5 steps.
  late = float(step_lib.ema_decay(config.train, jnp.int32(10_000)))
  assert late**312.5 == pytest.approx(0.5, rel=1e-4)


def test_an_ema_kimg_of_zero_makes_the_ema_the_weights_themselves():
  config = tiny_config("dense", train__ema_kimg=0.0)
  nets, state = state_lib.create_train_state(config)
  step = jax.jit(functools.partial(step_lib.train_step, nets, config.train))
  state, _ = step(state, _real_batch(config), jax.random.PRNGKey(0))
  _assert_trees_equal(state.ema, state.g.params)


def test_train_step_advances_the_step_and_reports_finite_metrics():
  config = tiny_config("dense")
  nets, state = state_lib.create_train_state(config)
  step = jax.jit(functools.partial(step_lib.train_step, nets, config.train))
  state, metrics = step(state, _real_batch(config), jax.random.PRNGKey(0))
  assert int(state.step) == 1
  expected = {"d_loss", "g_loss", "d_real", "d_fake", "g_grad_norm", "d_grad_norm"}
  assert expected <= set(metrics)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["g_lr"]) == pytest.approx(config.train.g_lr)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "dense"])
def test_bfloat16_training_keeps_float32_weights_and_losses_and_follows_float32(family):
  batch = _real_batch(tiny_config(family))
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(family, model__dtype=dtype)
    nets, state = state_lib.create_train_state(config)
    step = jax.jit(functools.partial(step_lib.train_step, nets, config.train))
    for i in range(3):
      state, metrics = step(state, batch, jax.random.fold_in(state.rng, i))
    runs[dtype] = state, metrics
  state, metrics = runs["bfloat16"]
  weights = [state.g.params, state.d.params, state.ema, state.g.opt_state, state.d.opt_state]
  for leaf in plain_leaves(weights):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  for name in ("d_loss", "g_loss"):
    assert metrics[name].dtype == jnp.float32
    # bf16 rounding moves the losses a little, not the run.
    assert float(metrics[name]) == pytest.approx(float(runs["float32"][1][name]), rel=0.05)


@pytest.mark.slow
def test_train_step_is_deterministic_for_a_seed():
  config = tiny_config("dcgan")
  nets, _ = state_lib.create_train_state(config)
  step = jax.jit(functools.partial(step_lib.train_step, nets, config.train))
  results = []
  for _ in range(2):
    _, state = state_lib.create_train_state(config)
    for i in range(2):
      state, _ = step(state, _real_batch(config, seed=i), jax.random.fold_in(state.rng, i))
    results.append(state)
  _assert_trees_equal(results[0], results[1])


@pytest.mark.slow
def test_d_steps_runs_that_many_discriminator_updates():
  config = tiny_config("dense", train__d_steps=3)
  nets, state = state_lib.create_train_state(config)
  state, _ = step_lib.train_step(
    nets, config.train, state, _real_batch(config), jax.random.PRNGKey(0)
  )
  assert int(state.d.opt_state.count) == 3
  assert int(state.g.opt_state.count) == 1


def test_d_metrics_are_means_over_the_d_updates_of_a_step():
  """With R1 on every second D update and two updates a step, only the first carries R1."""
  config = tiny_config("dense", train__d_steps=2, train__r1_gamma=1.0, train__r1_every=2)
  nets, state = state_lib.create_train_state(config)
  real, rng = _real_batch(config), jax.random.PRNGKey(0)
  _, metrics = step_lib.train_step(nets, config.train, state, real, rng)
  each = []
  for i in range(2):
    state, updated = step_lib.d_step(
      nets, config.train, state, real["image"], jax.random.fold_in(rng, i)
    )
    each.append(updated)
  assert float(each[0]["d_r1"]) > 0 and float(each[1]["d_r1"]) == 0
  for name in each[0]:
    np.testing.assert_allclose(metrics[name], (each[0][name] + each[1][name]) / 2, rtol=1e-5)


@pytest.mark.parametrize("name", ["non_saturating", "hinge", "least_squares", "wgan_gp"])
def test_each_loss_rewards_d_for_telling_real_from_fake(name):
  confident = losses.discriminator_loss(name, jnp.full(8, 5.0), jnp.full(8, -5.0))
  fooled = losses.discriminator_loss(name, jnp.full(8, -5.0), jnp.full(8, 5.0))
  assert confident < fooled
  assert losses.generator_loss(name, jnp.full(8, 5.0)) < losses.generator_loss(
    name, jnp.full(8, -5.0)
  )


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("train__batch_size", 0, "train.batch_size must be positive"),
    ("train__num_steps", -5, "train.num_steps must be positive"),
    ("train__ema_kimg", -1.0, "train.ema_kimg"),
    ("train__ema_rampup", -0.05, "train.ema_rampup"),
    ("train__loss", "wasserstein", "unknown train.loss"),
    ("eval__every", 0, "eval.every must be positive"),
    ("train__b1", 1.0, r"train.b1 must be in \[0, 1\)"),
    ("collapse__rollback_b1", -0.5, "collapse.rollback_b1 must be in"),
    ("collapse__lr_factor", 0.0, "collapse.lr_factor must be in"),
    ("checkpoint__best_metric", "fid", r"best_metric fid is not among what eval.metrics \("),
    ("checkpoint__best_generator", "mean", "unknown checkpoint.best_generator 'mean'"),
  ],
)
def test_bad_settings_are_refused_before_any_work(field, value, message):
  with pytest.raises(UserError, match=message):
    config_lib.validate(tiny_config("dcgan", **{field: value}))


def test_ranking_by_the_raw_generator_needs_an_ema_beside_it():
  config_lib.validate(tiny_config("dcgan", checkpoint__best_generator="raw"))
  with pytest.raises(UserError, match="best_generator raw needs an EMA .* train.ema_kimg 0"):
    config_lib.validate(tiny_config("dcgan", checkpoint__best_generator="raw", train__ema_kimg=0.0))


@pytest.mark.slow
def test_training_reports_where_its_time_went(workdir):
  timings = monitoring.Timings()
  trainer.train_and_evaluate(tiny_config("dense"), workdir, timings)  # 4 steps, both every 2
  assert timings.first_step > 0 and timings.steps == 3 and timings.step_seconds > 0
  assert len(timings.evaluations) == 2 and len(timings.checkpoints) == 2
  assert all(seconds > 0 for seconds in timings.evaluations + timings.checkpoints)
  assert "3 more steps" in timings.summary()


@pytest.mark.slow
def test_the_log_is_kept_in_the_workdir_and_a_resume_appends_to_it(workdir):
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)  # as the scripts run
  try:
    _train_twice(workdir)
  finally:
    logging.set_verbosity(verbosity)


def _train_twice(workdir):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=2), workdir)
  with open(os.path.join(workdir, "train.log")) as f:
    first = f.read()
  assert "Training from step 0 to 2" in first and "Done: step 2 of 2" in first
  trainer.train_and_evaluate(tiny_config("dense"), workdir)
  with open(os.path.join(workdir, "train.log")) as f:
    both = f.read()
  assert both.startswith(first) and "Training from step 2 to 4" in both


@pytest.mark.slow
def test_a_resumed_run_takes_changed_adam_settings_from_its_config(workdir):
  config = tiny_config("dense", train__num_steps=2)
  trainer.train_and_evaluate(config, workdir)
  g_lr, d_lr = config.train.g_lr, config.train.d_lr

  resumed = tiny_config("dense", train__num_steps=4, train__g_lr=g_lr / 4, train__b1=0.3)
  state = trainer.train_and_evaluate(resumed, workdir)
  np.testing.assert_allclose([float(r) for r in state_lib.learning_rates(state)], [g_lr / 4, d_lr])
  assert float(state.g.opt_state.hyperparams["b1"]) == pytest.approx(0.3)
  assert float(state.d.opt_state.hyperparams["b1"]) == pytest.approx(0.3)

  # Resumed again with the same config: nothing more changes.
  again = tiny_config("dense", train__num_steps=6, train__g_lr=g_lr / 4, train__b1=0.3)
  state = trainer.train_and_evaluate(again, workdir)
  np.testing.assert_allclose([float(r) for r in state_lib.learning_rates(state)], [g_lr / 4, d_lr])


def test_a_changed_learning_rate_keeps_a_rollbacks_reduction():
  config = tiny_config("dense")
  _, state = state_lib.create_train_state(config)
  g_lr, d_lr = config.train.g_lr, config.train.d_lr
  rolled_back = state_lib.with_hyperparams(state, learning_rate=(g_lr / 2, d_lr / 2))
  changed = trainer._apply_changed_settings(rolled_back, {"d_lr": (d_lr, 3 * d_lr)})
  np.testing.assert_allclose(
    [float(r) for r in state_lib.learning_rates(changed)], [g_lr / 2, 3 * d_lr / 2], rtol=1e-6
  )
  assert trainer._apply_changed_settings(rolled_back, {}) is rolled_back


@pytest.mark.slow
def test_the_files_a_run_skips_are_named_in_the_workdir(tmp_path, workdir):
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(8):
    pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  (tmp_path / "cut.png").write_bytes((tmp_path / "0.png").read_bytes()[:-300])
  config = tiny_config(
    "dense", data__source="image_folder", data__path=str(tmp_path), train__num_steps=2
  )
  trainer.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, trainer.SKIPPED_FILES)) as f:
    lines = sorted(line.rstrip("\n").split("\t") for line in f)
  assert lines == [
    ["not an image", str(tmp_path / "broken.jpg")],
    ["truncated", str(tmp_path / "cut.png")],
  ]
