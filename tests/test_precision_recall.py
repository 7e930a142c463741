"""Precision/recall and density/coverage: brute-force references, and the cases that define them.

The cases use feature sets shaped as Inception features are known to behave: real images spread
over a cloud; images of one kind the network has never seen (grey noise) land in a tight cluster
away from it; one real image repeated lands on one point of the cloud.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gan.metrics.precision_recall import density_coverage, precision_recall


def _reference(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> dict[str, float]:
  """Straight from the papers' definitions, in float64 loops."""

  def radii(x, k):
    return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

  def covered(points, centres, r):
    return np.array([np.linalg.norm(centres - p, axis=1) <= r for p in points])  # [P, C]

  real, fake = real.astype(np.float64), fake.astype(np.float64)
  real_balls = covered(fake, real, radii(real, k_dc))
  return {
    "precision": covered(fake, real, radii(real, k_pr)).any(axis=1).mean(),
    "recall": covered(real, fake, radii(fake, k_pr)).any(axis=1).mean(),
    "density": real_balls.sum() / (k_dc * len(fake)),
    "coverage": real_balls.any(axis=0).mean(),
  }


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_real=st.integers(6, 40), num_fake=st.integers(6, 40))
def test_matches_brute_force(seed, num_real, num_fake):
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(num_real, 6)).astype(np.float32)
  fake = (rng.normal(size=(num_fake, 6)) * rng.uniform(0.5, 2) + rng.uniform(-1, 1)).astype(
    np.float32
  )
  got = {**precision_recall(real, fake, 3), **density_coverage(real, fake, 5)}
  want = _reference(real, fake, 3, 5)
  # Points exactly on a ball's boundary may fall either way in float32: allow one point.
  assert got["precision"] == pytest.approx(want["precision"], abs=1.01 / num_fake)
  assert got["recall"] == pytest.approx(want["recall"], abs=1.01 / num_real)
  assert got["density"] == pytest.approx(want["density"], abs=1.01 / (5 * num_fake))
  assert got["coverage"] == pytest.approx(want["coverage"], abs=1.01 / num_real)


def _cloud(seed: int, num: int = 400, dim: int = 32) -> np.ndarray:
  """Features of real images: one correlated Gaussian cloud; the seed picks the draw."""
  mixing = np.random.default_rng(100).normal(size=(dim, dim)) / np.sqrt(dim)
  return (np.random.default_rng(seed).normal(size=(num, dim)) @ mixing).astype(np.float32)


def _all(real, fake) -> dict[str, float]:
  return {**precision_recall(real, fake), **density_coverage(real, fake)}


def test_held_out_real_features_score_as_the_papers_expect():
  scores = _all(_cloud(0), _cloud(1))
  assert scores["precision"] > 0.5 and scores["recall"] > 0.5
  assert 0.8 < scores["density"] < 1.2  # its expectation is 1 for one distribution
  assert scores["coverage"] > 0.9  # 1 - 2^-k = 0.97 expected for large sets


def test_grey_noise_far_from_the_data_scores_near_zero():
  real = _cloud(0)
  spread = np.abs(real).max()
  noise = _cloud(2) * 0.05 + 3 * spread  # a tight cluster away from every real image
  scores = _all(real, noise)
  assert scores == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_one_repeated_real_image_is_precise_but_covers_nothing():
  real = _cloud(0)
  repeated = np.repeat(real[7:8], 400, axis=0)
  scores = _all(real, repeated)
  assert scores["precision"] == 1.0  # it is a real image
  assert scores["recall"] <= 1 / 400 + 1e-9  # only itself lies in a ball of radius 0
  assert scores["coverage"] < 0.05  # the few real balls that reach that one point


def test_rejects_too_few_points():
  with pytest.raises(ValueError, match="N > k"):
    precision_recall(np.zeros((3, 4)), np.zeros((10, 4)), 3)
  with pytest.raises(ValueError, match="N > k"):
    density_coverage(np.zeros((10, 4)), np.zeros((5, 4)), 5)
