"""FID and KID against direct computations, and the cache of reference features."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import linalg

from gan.metrics import fid


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  mixing = np.random.default_rng(100).normal(size=(d, d)) / np.sqrt(d)  # correlated dimensions
  return rng.normal(size=(n, d)) @ mixing + shift


def _direct_fid(x: np.ndarray, y: np.ndarray) -> float:
  mu_x, mu_y = x.mean(0), y.mean(0)
  cov_x = (x - mu_x).T @ (x - mu_x) / (len(x) - 1)
  cov_y = (y - mu_y).T @ (y - mu_y) / (len(y) - 1)
  root = linalg.sqrtm(cov_x @ cov_y).real
  return float(np.sum((mu_x - mu_y) ** 2) + np.trace(cov_x + cov_y - 2 * root))


def _direct_kid(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit double sums."""
  n, d = x.shape

  def k(a, b):
    return (a @ b / d + 1) ** 3

  xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
  return xx + yy - 2 * xy


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
  x = _features(50, 4, 0).astype(np.float32)
  mu, sigma = fid.feature_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  assert mu.shape == (4,) and sigma.shape == (4, 4)
  np.testing.assert_allclose(mu, x.astype(np.float64).sum(0) / 50)
  centred = x.astype(np.float64) - mu
  np.testing.assert_allclose(sigma, centred.T @ centred / 49)


def test_fid_matches_the_trace_formula():
  x, y = _features(200, 8, 1), _features(300, 8, 2, shift=0.3)
  value = fid.frechet_distance(*fid.feature_statistics(x), *fid.feature_statistics(y))
  assert isinstance(value, float)
  np.testing.assert_allclose(value, _direct_fid(x, y), rtol=1e-8)


def test_fid_of_identical_sets_is_zero():
  x = _features(100, 16, 3)
  stats = fid.feature_statistics(x)
  assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6


@settings(max_examples=20, deadline=None)
@given(shift=st.lists(st.floats(-5, 5), min_size=6, max_size=6))
def test_fid_of_equal_covariances_is_the_squared_mean_distance(shift):
  mu1, sigma = fid.feature_statistics(_features(100, 6, 4))
  mu2 = mu1 + np.array(shift)
  np.testing.assert_allclose(
    fid.frechet_distance(mu1, sigma, mu2, sigma), np.sum(np.square(shift)), rtol=1e-6, atol=1e-6
  )


def test_fid_survives_singular_covariances():
  # Fewer samples than dimensions: rank-deficient covariances, as with 2048-d features.
  x, y = _features(10, 32, 5), _features(10, 32, 6)
  value = fid.frechet_distance(*fid.feature_statistics(x), *fid.feature_statistics(y))
  assert np.isfinite(value) and value > 0


def test_fid_rejects_mismatched_statistics():
  mu, sigma = fid.feature_statistics(_features(20, 4, 7))
  with pytest.raises(ValueError, match="do not match"):
    fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_kid_matches_the_direct_double_sum():
  x, y = _features(12, 5, 8), _features(12, 5, 9, shift=0.5)
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=50)
  # The subsets hold every row (subset size clipped to 12), so each is the full-set value.
  np.testing.assert_allclose(mean, _direct_kid(x, y), rtol=1e-10)
  assert std < 1e-10


def test_kid_subsets_use_the_smaller_set_size():
  x, y = _features(40, 5, 10), _features(15, 5, 11)
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=4, subset_size=1000)
  assert np.isfinite(mean) and std > 0  # subsets of x differ between draws


def test_kid_is_deterministic_for_a_seed():
  x, y = _features(60, 8, 12), _features(60, 8, 13)
  first = fid.kernel_inception_distance(x, y, num_subsets=5, subset_size=20, seed=3)
  assert fid.kernel_inception_distance(x, y, num_subsets=5, subset_size=20, seed=3) == first


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
  x, y = _features(400, 16, 14), _features(400, 16, 15)
  same, same_std = fid.kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
  shifted, _ = fid.kernel_inception_distance(
    x, _features(400, 16, 16, shift=1.0), num_subsets=20, subset_size=200
  )
  assert abs(same) < 3 * same_std + 1e-3
  assert shifted > 100 * abs(same)


def test_reference_key_is_a_safe_file_name():
  key = fid.reference_key("image_folder-/data/my faces", "train", 64, 10000)
  assert key.endswith("_train_64px_10000")
  assert os.sep not in key and " " not in key
  assert (
    fid.reference_key("anime_faces-0a1b", "train", 64, 5000) == "anime_faces-0a1b_train_64px_5000"
  )


def test_reference_features_compute_once_then_load(tmp_path):
  calls = []
  x = _features(30, 4, 17)

  def compute():
    calls.append(1)
    return x

  key = fid.reference_key("synthetic_faces", "train", 32, 30)
  first = fid.reference_features(str(tmp_path / "cache"), key, compute)
  second = fid.reference_features(str(tmp_path / "cache"), key, compute)
  assert len(calls) == 1
  assert os.listdir(tmp_path / "cache") == [f"{key}.npz"]  # no temporary file left behind
  assert first.dtype == second.dtype == np.float32
  np.testing.assert_array_equal(first, x.astype(np.float32))
  np.testing.assert_array_equal(second, first)


def test_an_unreadable_cache_entry_is_computed_again(tmp_path):
  (tmp_path / "k.npz").write_bytes(b"not an npz")
  x = _features(5, 3, 18)
  np.testing.assert_array_equal(
    fid.reference_features(str(tmp_path), "k", lambda: x), x.astype(np.float32)
  )
  with np.load(tmp_path / "k.npz") as saved:
    np.testing.assert_array_equal(saved["features"], x.astype(np.float32))


def test_reference_features_reject_a_path_as_key(tmp_path):
  with pytest.raises(ValueError, match="safe"):
    fid.reference_features(str(tmp_path), "../escape", lambda: _features(5, 2, 0))
