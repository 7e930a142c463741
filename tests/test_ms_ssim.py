"""MS-SSIM: agrees with TensorFlow's reference where five scales fit; behaves as a similarity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from gan.metrics.ms_ssim import POWER_FACTORS, ms_ssim, num_scales


def _smooth_images(seed: int, shape, sigma: float = 3.0) -> np.ndarray:
  noise = np.random.default_rng(seed).normal(size=shape)
  smooth = ndimage.gaussian_filter(noise, (0, sigma, sigma, 0))
  return (smooth / np.abs(smooth).max()).astype(np.float32)


@pytest.mark.slow
def test_matches_tensorflow_at_five_scales():
  tf = pytest.importorskip("tensorflow")
  a = _smooth_images(0, (4, 192, 192, 3))
  strength = np.array([0.1, 0.3, 0.6, 1.0], np.float32)[:, None, None, None]
  b = np.clip(a + strength * _smooth_images(1, a.shape, sigma=1.0), -1, 1)
  expected = tf.image.ssim_multiscale(a, b, max_val=2.0, power_factors=POWER_FACTORS).numpy()
  np.testing.assert_allclose(ms_ssim(a, b), expected, atol=1e-4)
  assert len(set(np.round(expected, 2))) == 4  # the pairs span a range of similarities


def test_odd_sizes_match_tensorflow():
  tf = pytest.importorskip("tensorflow")
  a = _smooth_images(2, (2, 181, 187, 3))
  b = np.clip(a + 0.3 * _smooth_images(3, a.shape, sigma=1.0), -1, 1)
  expected = tf.image.ssim_multiscale(a, b, max_val=2.0, power_factors=POWER_FACTORS).numpy()
  np.testing.assert_allclose(ms_ssim(a, b), expected, atol=1e-4)


@pytest.mark.parametrize(
  ("size", "scales"), [(11, 1), (20, 1), (21, 2), (32, 2), (64, 3), (128, 4), (176, 5)]
)
def test_small_images_use_the_scales_that_fit_the_window(size, scales):
  assert num_scales(size) == scales


@pytest.mark.parametrize("size", [32, 64])
def test_identical_images_score_one(size):
  a = _smooth_images(4, (3, size, size, 3))
  np.testing.assert_allclose(ms_ssim(a, a), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64, 192])
def test_independent_noise_scores_near_zero(size):
  a, b = jax.random.uniform(jax.random.key(size), (2, 8, size, size, 3), minval=-1, maxval=1)
  # Not exactly 0: a slightly positive contrast term raised to a small power is far from 0.
  assert float(jnp.mean(ms_ssim(a, b))) < 0.15


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), noise=st.floats(0.0, 1.0))
def test_symmetric_and_in_unit_interval(seed, noise):
  a = _smooth_images(seed, (2, 32, 32, 3))
  b = np.clip(a + noise * _smooth_images(seed + 1, a.shape, sigma=1.0), -1, 1)
  ab, ba = ms_ssim(a, b), ms_ssim(b, a)
  np.testing.assert_allclose(ab, ba, atol=1e-6)
  assert np.all((ab >= 0) & (ab <= 1 + 1e-6))


def test_rejects_images_smaller_than_the_window():
  with pytest.raises(ValueError, match="at least 11 px"):
    ms_ssim(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
