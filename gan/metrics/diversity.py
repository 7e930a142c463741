"""Sample-diversity signals for the mode-collapse detector, computed on one batch of images.

Both are pure jnp and jit-compiled, O(N^2) in the batch size, cheap for a few hundred images:

- `mean_pairwise_ms_ssim`: the mean MS-SSIM of random distinct pairs. A collapsing generator
  drives it towards 1; the same statistic on real images is the baseline to compare it with.
- `near_duplicate_rate`: the fraction of images whose nearest other image in the batch is
  closer than a threshold, in root-mean-square pixel difference.
"""

import functools

import jax
import jax.numpy as jnp

from gan.metrics.ms_ssim import ms_ssim

# RMS pixel difference ([-1, 1] units) below which two images count as near duplicates. The
# nearest neighbour among a few hundred real images (synthetic faces, or the anime crops) is
# at least ~0.2 away; a collapsed generator's samples differ only by their small noise.
NEAR_DUPLICATE_THRESHOLD = 0.1


@functools.partial(jax.jit, static_argnames="num_pairs")
def mean_pairwise_ms_ssim(images: jax.Array, key: jax.Array, num_pairs: int) -> jax.Array:
  """Mean MS-SSIM over `num_pairs` random pairs (i, j), i != j, drawn with replacement.

  Args:
    images: [N, H, W, 3] in [-1, 1], N >= 2, H and W >= 11.
    key: a PRNG key choosing the pairs.
    num_pairs: how many pairs to average (static).

  Returns:
    A float32 scalar in [0, 1].
  """
  n = images.shape[0]
  if n < 2:
    raise ValueError(f"mean_pairwise_ms_ssim needs at least 2 images, got {n}")
  first_key, offset_key = jax.random.split(key)
  first = jax.random.randint(first_key, (num_pairs,), 0, n)
  # A nonzero offset modulo n makes j uniform over the n - 1 images other than i.
  second = (first + jax.random.randint(offset_key, (num_pairs,), 1, n)) % n
  return jnp.mean(ms_ssim(images[first], images[second]))


def nearest_neighbour_distances(images: jax.Array) -> jax.Array:
  """[N] RMS pixel difference from each image to its nearest other image in the batch."""
  flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
  # Centring first keeps |a|^2 + |b|^2 - 2ab accurate in float32 for near-identical images.
  flat = flat - jnp.mean(flat, axis=0)
  sq_norms = jnp.sum(flat * flat, axis=1)
  dots = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
  sq_dists = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * dots, 0.0)
  sq_dists = jnp.where(jnp.eye(flat.shape[0], dtype=bool), jnp.inf, sq_dists)
  return jnp.sqrt(jnp.min(sq_dists, axis=1) / flat.shape[1])


@jax.jit
def near_duplicate_rate(
  images: jax.Array, threshold: float | jax.Array = NEAR_DUPLICATE_THRESHOLD
) -> jax.Array:
  """Fraction of images whose nearest other image is closer than `threshold`.

  Args:
    images: [N, H, W, C] in [-1, 1], N >= 2.
    threshold: RMS pixel difference in [-1, 1] units, sqrt(mean((a - b)**2)).

  Returns:
    A float32 scalar in [0, 1].
  """
  if images.shape[0] < 2:
    raise ValueError(f"near_duplicate_rate needs at least 2 images, got {images.shape[0]}")
  return jnp.mean((nearest_neighbour_distances(images) < threshold).astype(jnp.float32))
