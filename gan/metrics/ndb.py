"""NDB, the number of statistically different bins (Richardson & Weiss 2018): label-free coverage.

The real images are clustered into K bins (k-means); each generated image falls into the bin of
its nearest centroid, and a two-proportion z-test per bin asks whether the generated share of
that bin differs from the real share. A generator that covers the data fills the bins as the real
images do, and only about `alpha` of them differ by chance; one that draws a handful of faces
empties most bins and crowds a few. NDB needs no labels and no network, so it works on any
dataset.

The bins are made from *layouts*: 8x8 thumbnails with each image's mean colour taken out. At
8x8 a young generator's blur barely shows, so blur alone does not move samples between bins,
while a generator that draws one face layout in many colours (a partial collapse the pixel
distance between samples does not see) crowds one bin.
"""

import jax
import jax.numpy as jnp
import numpy as np

THUMBNAIL = 8  # side of the thumbnails the bins are made from
_Z_ALPHA = {0.05: 1.959964, 0.01: 2.575829}  # two-sided critical values of the normal


def layouts(images: jax.Array, side: int = THUMBNAIL) -> jax.Array:
  """[N, R, R, 3] images -> [N, side*side*3] antialiased thumbnails with each image's mean
  colour subtracted."""
  n = images.shape[0]
  small = jax.image.resize(images.astype(jnp.float32), (n, side, side, 3), "linear")
  small = small - small.mean(axis=(1, 2), keepdims=True)
  return small.reshape(n, -1)


def kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
  """Centroids [k, D] of `points` [N, D] by Lloyd's algorithm from a k-means++ start.

  A bin left empty takes the point farthest from its centroid, so every bin holds real images.
  """
  rng = np.random.default_rng(seed)
  points = np.asarray(points, np.float64)
  centroids = [points[rng.integers(len(points))]]
  for _ in range(1, k):  # k-means++: each new centroid far from the chosen ones
    distance = _squared_distances(points, np.stack(centroids)).min(axis=1)
    total = distance.sum()  # 0 once every distinct point is chosen: then any point will do
    centroids.append(points[rng.choice(len(points), p=distance / total if total else None)])
  centroids = np.stack(centroids)
  for _ in range(iterations):
    distances = _squared_distances(points, centroids)
    bins = distances.argmin(axis=1)
    for b in range(k):
      members = points[bins == b]
      if len(members):
        centroids[b] = members.mean(axis=0)
      else:
        centroids[b] = points[distances.min(axis=1).argmax()]
  return centroids.astype(np.float32)


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  squared = (
    (points**2).sum(axis=1)[:, None] - 2 * points @ centroids.T + (centroids**2).sum(axis=1)[None]
  )
  return np.maximum(squared, 0.0)  # rounding can make a point's own distance negative


def bin_shares(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """The share of `points` [N, D] whose nearest centroid is each of `centroids` [K, D]."""
  distances = (
    jnp.sum(points**2, axis=1)[:, None]
    - 2 * points @ centroids.T
    + jnp.sum(centroids**2, axis=1)[None]
  )
  bins = jnp.argmin(distances, axis=1)
  return jnp.bincount(bins, length=centroids.shape[0]) / points.shape[0]


def different_bins(
  real_shares: jax.Array, num_real: int, fake_shares: jax.Array, num_fake: int, alpha: float
) -> jax.Array:
  """Per bin, whether a two-proportion z-test (pooled) at level `alpha` finds the shares differ."""
  pooled = (real_shares * num_real + fake_shares * num_fake) / (num_real + num_fake)
  error = jnp.sqrt(pooled * (1 - pooled) * (1 / num_real + 1 / num_fake))
  z = jnp.abs(fake_shares - real_shares) / jnp.maximum(error, 1e-12)
  return (z > _Z_ALPHA[alpha]) & (error > 0)


class NDB:
  """Bins made once from real images; `fraction(images)` is the share of bins in which the
  images' share differs significantly from the real one (NDB / K), jit-compatible."""

  def __init__(self, real_images: np.ndarray, num_bins: int, seed: int, alpha: float = 0.05):
    if alpha not in _Z_ALPHA:
      raise ValueError(f"alpha must be one of {sorted(_Z_ALPHA)}, not {alpha}")
    real = np.asarray(jax.device_get(layouts(jnp.asarray(real_images))))
    self.num_bins = min(num_bins, len(real))
    self.centroids = kmeans(real, self.num_bins, seed)
    self.real_shares = np.asarray(bin_shares(jnp.asarray(real), jnp.asarray(self.centroids)))
    self.num_real = len(real)
    self.alpha = alpha

  def fraction(self, images: jax.Array) -> jax.Array:
    shares = bin_shares(layouts(images), jnp.asarray(self.centroids))
    differ = different_bins(
      jnp.asarray(self.real_shares), self.num_real, shares, images.shape[0], self.alpha
    )
    return jnp.mean(differ.astype(jnp.float32))
