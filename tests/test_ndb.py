"""NDB, the label-free coverage signal: its parts against independent computations, and stand-ins
for a collapse and for a young generator's blur on the same images."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from configs import dcgan
from gan.data import synthetic_faces
from gan.health import verdict
from gan.metrics import ndb


def _faces(num: int, seed: int) -> np.ndarray:
  images, _ = synthetic_faces.render(num, 32, seed)
  return images.astype(np.float32) / 127.5 - 1


def test_kmeans_finds_well_separated_clusters():
  rng = np.random.default_rng(0)
  means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  points = np.concatenate([m + rng.normal(0, 0.5, (100, 2)) for m in means])
  centroids = ndb.kmeans(points, 3, seed=0)
  for mean in means:
    assert np.min(np.linalg.norm(centroids - mean, axis=1)) < 0.3


def test_fewer_distinct_real_layouts_than_bins_still_gives_finite_bins():
  """Solid-colour images all have the same layout (their mean colour is taken out)."""
  real = np.concatenate([np.full((4, 32, 32, 3), v, np.float32) for v in (-0.5, 0.0, 0.5)])
  bins = ndb.NDB(real, num_bins=8, seed=0)
  assert bins.centroids.shape == (8, ndb.THUMBNAIL**2 * 3) and np.isfinite(bins.centroids).all()
  assert float(bins.fraction(jnp.asarray(real))) == 0.0  # the real images do not differ


def test_each_bin_takes_the_points_nearest_its_centroid():
  rng = np.random.default_rng(1)
  points, centroids = rng.normal(size=(50, 4)), rng.normal(size=(5, 4))
  nearest = np.argmin(((points[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  shares = ndb.bin_shares(jnp.asarray(points, jnp.float32), jnp.asarray(centroids, jnp.float32))
  np.testing.assert_allclose(shares, np.bincount(nearest, minlength=5) / 50, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_the_bin_test_is_the_pooled_two_proportion_z_test(alpha):
  rng = np.random.default_rng(2)
  real = rng.dirichlet(np.ones(12))
  fake = rng.dirichlet(np.ones(12))
  n_real, n_fake = 300, 200
  pooled = (real * n_real + fake * n_fake) / (n_real + n_fake)
  z = (fake - real) / np.sqrt(pooled * (1 - pooled) * (1 / n_real + 1 / n_fake))
  expected = 2 * scipy.stats.norm.sf(np.abs(z)) < alpha
  got = ndb.different_bins(jnp.asarray(real), n_real, jnp.asarray(fake), n_fake, alpha)
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.fixture(scope="module")
def bins():
  return ndb.NDB(_faces(256, seed=0), num_bins=16, seed=0)


def test_other_faces_of_the_same_kind_fill_the_bins_as_the_real_ones(bins):
  assert float(bins.fraction(jnp.asarray(_faces(256, seed=1)))) <= 0.15


def test_a_young_generators_blur_is_not_a_collapse(bins):
  blurred = np.stack([scipy.ndimage.gaussian_filter(x, (2, 2, 0)) for x in _faces(256, seed=1)])
  assert float(bins.fraction(jnp.asarray(blurred))) <= 0.15


def test_a_handful_of_faces_is_a_collapse(bins):
  handful = np.concatenate([_faces(4, seed=1)] * 64)
  assert float(bins.fraction(jnp.asarray(handful))) >= 0.6


def test_one_layout_in_many_colours_is_a_collapse(bins):
  rng = np.random.default_rng(3)
  face = _faces(1, seed=1)
  recoloured = face * rng.uniform(0.4, 1, (256, 1, 1, 3)) + rng.uniform(-0.4, 0.4, (256, 1, 1, 3))
  assert float(bins.fraction(jnp.asarray(np.clip(recoloured, -1, 1)))) >= 0.6


def _judged(ndb_fraction: float) -> verdict.Judgement:
  signals = {"ms_ssim": 0.1, "ms_ssim_real": 0.1, "duplicate_rate": 0.0}
  config = dcgan.get_config().collapse
  return verdict.judge({**signals, "ndb_fraction": ndb_fraction}, config, streak=0, step=10**6)


def test_the_verdict_reads_ndb_against_its_bound():
  bound = dcgan.get_config().collapse.max_ndb_fraction
  assert _judged(bound - 0.1).verdict == verdict.HEALTHY
  high = _judged(bound + 0.1)
  assert high.verdict == verdict.SUSPECT and "layout bins" in high.reasons[0]
