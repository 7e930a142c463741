"""Mode coverage: the shipped classifier labels held-out faces, and the histogram statistics."""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from gan.data import synthetic_faces
from gan.errors import UserError
from gan.metrics import mode_classifier
from gan.metrics.mode_classifier import (
  kl_from_uniform,
  load_classifier,
  mode_histogram,
  modes_covered,
  predict_modes,
)

pytestmark = pytest.mark.xdist_group("test_mode_classifier")  # its tests share runs: one worker

HELD_OUT_SEED = 2718  # neither the training seed (12345) nor the script's evaluation seed


@pytest.fixture(scope="module")
def classifier():
  return load_classifier()


@pytest.mark.parametrize("resolution", [32, 64])
def test_shipped_weights_classify_held_out_faces(classifier, resolution):
  images, labels = synthetic_faces.render(1000, resolution, HELD_OUT_SEED)
  modes = predict_modes(classifier, jnp.asarray(images, jnp.float32) / 127.5 - 1)
  assert modes.dtype == jnp.int32 and modes.shape == (1000,)
  assert float(np.mean(np.asarray(modes) == labels)) >= 0.99


def test_shipped_weights_file_is_small():
  assert os.path.getsize(mode_classifier.DEFAULT_WEIGHTS) < 1_000_000


def test_saved_weights_load_back_unchanged(classifier, tmp_path):
  path = str(tmp_path / "weights.npz")
  mode_classifier.save_weights(classifier, path)
  images = jnp.linspace(-1, 1, 2 * 48 * 48 * 3).reshape(2, 48, 48, 3)
  np.testing.assert_array_equal(
    predict_modes(load_classifier(path), images), predict_modes(classifier, images)
  )


def test_weights_are_a_flat_npz_of_parameter_paths():
  with np.load(mode_classifier.DEFAULT_WEIGHTS, allow_pickle=False) as saved:
    assert {"convs/0/kernel", "hair/kernel", "eyes/bias", "background/kernel"} <= set(saved.files)


def test_missing_weights_name_the_script_that_rebuilds_them(tmp_path):
  with pytest.raises(UserError, match="scripts/train_mode_classifier.py"):
    load_classifier(str(tmp_path / "missing.npz"))


def test_mismatched_weights_name_the_script_that_rebuilds_them(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, **{"hair/kernel": np.zeros((3, 3))})
  with pytest.raises(UserError, match="scripts/train_mode_classifier.py"):
    load_classifier(str(path))


def test_uniform_modes_cover_everything_with_zero_kl():
  hist = mode_histogram(jnp.tile(jnp.arange(1000), 3))
  assert hist.shape == (1000,)
  assert int(modes_covered(hist)) == 1000
  assert float(kl_from_uniform(hist)) == pytest.approx(0.0, abs=1e-5)


def test_one_mode_covers_one_with_kl_log_1000():
  hist = mode_histogram(jnp.full((500,), 7))
  assert int(modes_covered(hist)) == 1
  assert float(kl_from_uniform(hist)) == pytest.approx(math.log(1000), rel=1e-5)


def test_half_the_modes_give_kl_log_2():
  hist = mode_histogram(jnp.arange(0, 1000, 2))
  assert int(modes_covered(hist)) == 500
  assert float(kl_from_uniform(hist)) == pytest.approx(math.log(2), rel=1e-5)


def test_min_count_ignores_rarely_hit_modes():
  hist = mode_histogram(jnp.array([1, 2, 2, 3, 3, 3]))
  assert [int(modes_covered(hist, k)) for k in (1, 2, 3, 4)] == [3, 2, 1, 0]
