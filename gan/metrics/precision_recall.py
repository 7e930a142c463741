"""Improved precision and recall (Kynkäänniemi et al. 2019) of a generator, with no weights.

Each feature set defines a manifold: the union of balls around its points, each ball reaching to
the point's k-th nearest neighbour in the same set. Precision is the fraction of generated
features inside the real manifold (are the samples realistic?); recall is the fraction of real
features inside the generated manifold (does the generator cover the data?). A collapsed
generator scores high precision and low recall.

The paper embeds images with a pretrained VGG-16. Here the embedding is fixed and weight-free:
each image is downsampled (antialiased) to 16x16 and flattened to 768 numbers. Downsampling keeps
a face's layout and colours and drops the pixel-level detail and small shifts that dominate raw
pixel distances at full resolution. A random projection was not used: it preserves L2 distances
only approximately (Johnson-Lindenstrauss), so it would add noise and no information. The values
are comparable between runs at one resolution, not with VGG-based numbers from papers.
"""

import jax
import jax.numpy as jnp

# The side of the images the embedding flattens.
FEATURE_RESOLUTION = 16


@jax.jit
def image_features(images: jax.Array) -> jax.Array:
  """[N, H, W, C] images in [-1, 1] -> [N, 16 * 16 * C] features: antialiased 16x16 thumbnails."""
  n, _, _, c = images.shape
  small = jax.image.resize(
    images.astype(jnp.float32), (n, FEATURE_RESOLUTION, FEATURE_RESOLUTION, c), "linear"
  )
  return small.reshape(n, -1)


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """[N, M] squared L2 distances; exact to float32 rounding for near-identical rows."""
  # Centring on a shared mean keeps |a|^2 + |b|^2 - 2ab accurate in float32.
  mean = jnp.mean(jnp.concatenate([a, b]), axis=0)
  a, b = a - mean, b - mean
  dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * dots
  return jnp.maximum(sq, 0.0)


def _radii(features: jax.Array, k: int) -> jax.Array:
  """[N] squared distance from each point to its k-th nearest other point in the set."""
  sq = _squared_distances(features, features)
  # The point itself is its own nearest neighbour at 0, so the k-th other one is the (k+1)-th.
  return -jax.lax.top_k(-sq, k + 1)[0][:, k]


def _coverage(points: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
  """The fraction of `points` inside at least one ball (centre, squared radius)."""
  sq = _squared_distances(points, centres)
  return jnp.mean(jnp.any(sq <= radii[None, :], axis=1))


@jax.jit(static_argnames="k")
def _precision_recall(real_f: jax.Array, fake_f: jax.Array, k: int) -> dict[str, jax.Array]:
  real_f = real_f.astype(jnp.float32)
  fake_f = fake_f.astype(jnp.float32)
  return {
    "precision": _coverage(fake_f, real_f, _radii(real_f, k)),
    "recall": _coverage(real_f, fake_f, _radii(fake_f, k)),
  }


def precision_recall_features(real_f: jax.Array, fake_f: jax.Array, k: int = 3) -> dict[str, float]:
  """Improved precision and recall of feature sets.

  Args:
    real_f: [N, D] real features, N > k.
    fake_f: [M, D] generated features, M > k.
    k: the neighbour whose distance sets each ball's radius (3 in the paper).

  Returns:
    {"precision": float, "recall": float}, both in [0, 1]. Memory is O(N * M) (all pairwise
    distances at once): a few tens of MB for 2,000 against 2,000.
  """
  for name, f in (("real", real_f), ("fake", fake_f)):
    if f.ndim != 2 or f.shape[0] <= k:
      raise ValueError(f"{name} features must be [N, D] with N > k={k}, got shape {f.shape}")
  if real_f.shape[1] != fake_f.shape[1]:
    raise ValueError(f"feature sizes differ: {real_f.shape[1]} vs {fake_f.shape[1]}")
  return {name: float(v) for name, v in _precision_recall(real_f, fake_f, k).items()}


def precision_recall(
  real_images: jax.Array, fake_images: jax.Array, *, k: int = 3
) -> dict[str, float]:
  """Improved precision and recall of [N, H, W, 3] image sets in [-1, 1], on `image_features`."""
  return precision_recall_features(image_features(real_images), image_features(fake_images), k)
