"""Improved precision/recall: a brute-force reference, and the cases that define the metric."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gan.metrics.precision_recall import (
  image_features,
  precision_recall,
  precision_recall_features,
)


def _reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
  """Straight from the paper's definition, in float64 loops."""

  def radii(x):
    return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

  def coverage(points, centres, r):
    return np.mean([np.any(np.linalg.norm(centres - p, axis=1) <= r) for p in points])

  real, fake = real.astype(np.float64), fake.astype(np.float64)
  return {
    "precision": coverage(fake, real, radii(real)),
    "recall": coverage(real, fake, radii(fake)),
  }


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_real=st.integers(5, 40), num_fake=st.integers(5, 40))
def test_matches_brute_force(seed, num_real, num_fake):
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(num_real, 6)).astype(np.float32)
  fake = (rng.normal(size=(num_fake, 6)) * rng.uniform(0.5, 2) + rng.uniform(-1, 1)).astype(
    np.float32
  )
  got = precision_recall_features(real, fake, 3)
  want = _reference(real, fake, 3)
  # Points exactly on a ball's boundary may fall either way in float32: allow one point.
  assert got["precision"] == pytest.approx(want["precision"], abs=1.01 / num_fake)
  assert got["recall"] == pytest.approx(want["recall"], abs=1.01 / num_real)


def _images(key, num, size=32):
  return jax.random.uniform(jax.random.key(key), (num, size, size, 3), minval=-1, maxval=1)


@pytest.mark.slow
def test_identical_sets_score_one():
  images = _images(0, 100)
  assert precision_recall(images, images) == {"precision": 1.0, "recall": 1.0}


@pytest.mark.slow
def test_a_collapsed_generator_is_precise_but_misses_the_data():
  real = _images(1, 200)
  noise = 0.01 * jax.random.normal(jax.random.key(2), (200, 32, 32, 3))
  fake = real[7] + noise
  result = precision_recall(real, fake)
  assert result["precision"] > 0.9
  assert result["recall"] < 0.05


def test_fakes_far_from_the_data_are_imprecise():
  real = 0.5 * _images(3, 200)
  fake = real + 3.0
  result = precision_recall(real, fake)
  assert result["precision"] == pytest.approx(0.0, abs=0.01)
  assert result["recall"] == pytest.approx(0.0, abs=0.01)


def test_features_are_16x16_thumbnails():
  assert image_features(_images(4, 3, 64)).shape == (3, 16 * 16 * 3)


def test_rejects_too_few_points():
  with pytest.raises(ValueError, match="N > k"):
    precision_recall_features(np.zeros((3, 4)), np.zeros((10, 4)), 3)
