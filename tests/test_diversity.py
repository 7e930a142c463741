"""Diversity signals: high for a collapsed batch, low for a diverse one, always rates in [0, 1]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gan.metrics.diversity import (
  NEAR_DUPLICATE_THRESHOLD,
  mean_pairwise_ms_ssim,
  near_duplicate_rate,
  nearest_neighbour_distances,
)

SIZE = 32


def _blobs(key: jax.Array, num: int, blobs_per_image: int = 4) -> jax.Array:
  """[num, SIZE, SIZE, 3] in [-1, 1]: random coloured Gaussian blobs on random backgrounds."""
  keys = jax.random.split(key, 4)
  centres = jax.random.uniform(keys[0], (num, blobs_per_image, 2), minval=0.1, maxval=0.9)
  widths = jax.random.uniform(keys[1], (num, blobs_per_image, 1, 1), minval=0.05, maxval=0.2)
  colours = jax.random.uniform(keys[2], (num, blobs_per_image + 1, 3), minval=-1, maxval=1)
  grid = (jnp.arange(SIZE) + 0.5) / SIZE
  dy = grid[None, None, :, None] - centres[..., 0, None, None]
  dx = grid[None, None, None, :] - centres[..., 1, None, None]
  alpha = jnp.exp(-(dx**2 + dy**2) / (2 * widths**2))[..., None]  # [num, blobs, H, W, 1]
  image = jnp.broadcast_to(colours[:, 0, None, None, :], (num, SIZE, SIZE, 3))
  for k in range(blobs_per_image):
    image = image + alpha[:, k] * (colours[:, k + 1, None, None, :] - image)
  return image


def _collapsed(key: jax.Array, num: int, noise: float = 0.03) -> jax.Array:
  """`num` copies of one blob image plus small independent noise."""
  image_key, noise_key = jax.random.split(key)
  one = _blobs(image_key, 1)
  return jnp.clip(one + noise * jax.random.normal(noise_key, (num, SIZE, SIZE, 3)), -1, 1)


@pytest.mark.slow
def test_collapsed_batch_has_pairwise_ms_ssim_near_one():
  images = _collapsed(jax.random.key(0), 64)
  assert float(mean_pairwise_ms_ssim(images, jax.random.key(1), 256)) > 0.9


@pytest.mark.slow
def test_diverse_batch_has_low_pairwise_ms_ssim():
  images = _blobs(jax.random.key(2), 64)
  assert float(mean_pairwise_ms_ssim(images, jax.random.key(3), 256)) < 0.3


def test_pairwise_ms_ssim_never_pairs_an_image_with_itself():
  # Two unrelated noise images: any (i, i) pair would score 1 and lift the mean.
  images = jax.random.uniform(jax.random.key(4), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
  assert float(mean_pairwise_ms_ssim(images, jax.random.key(5), 64)) < 0.1


def test_collapsed_batch_is_all_near_duplicates():
  assert float(near_duplicate_rate(_collapsed(jax.random.key(6), 64))) == 1.0


def test_diverse_batch_has_no_near_duplicates():
  assert float(near_duplicate_rate(_blobs(jax.random.key(7), 64))) == 0.0


def test_real_synthetic_faces_stay_below_the_near_duplicate_threshold():
  synthetic_faces = pytest.importorskip("gan.data.synthetic_faces")
  images, _ = synthetic_faces.render(256, SIZE, seed=0)
  distances = nearest_neighbour_distances(jnp.asarray(images, jnp.float32) / 127.5 - 1)
  assert float(jnp.min(distances)) > NEAR_DUPLICATE_THRESHOLD


def test_nearest_neighbour_distance_is_the_rms_pixel_difference():
  images = jnp.zeros((3, 4, 4, 3)).at[1].set(0.5).at[2].set(-1.0)
  np.testing.assert_allclose(nearest_neighbour_distances(images), [0.5, 0.5, 1.0], atol=1e-6)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), duplicates=st.integers(0, 16), threshold=st.floats(0.01, 2.0))
def test_rates_lie_in_unit_interval(seed, duplicates, threshold):
  images = _blobs(jax.random.key(seed), 16)
  images = images.at[:duplicates].set(images[0])
  rate = float(near_duplicate_rate(images, threshold))
  similarity = float(mean_pairwise_ms_ssim(images, jax.random.key(seed + 1), 32))
  assert 0.0 <= rate <= 1.0
  assert 0.0 <= similarity <= 1.0 + 1e-6
  if duplicates >= 2:
    assert rate >= duplicates / 16
