"""k-NN manifold metrics of generated against real features: precision/recall, density/coverage.

Both pairs judge fidelity (are the samples realistic?) and diversity (do they cover the data?)
separately, from balls around feature vectors, each reaching to its point's k-th nearest
neighbour in the same set. They need a learned embedding to mean what they say: in pixel space
a ball around a real image also holds blurry or noisy images (16-px thumbnails rated grey noise
precision 1.0). The papers embed images with an ImageNet VGG-16; the evaluator uses the
Inception pool3 features that FID and KID use, so one network serves all four. Values compare
between runs, and with published ones only where those used the same embedding.

- Improved precision and recall (Kynkaanniemi et al. 2019, k=3): precision is the fraction of
  generated points inside the real manifold (the union of the real balls), recall the fraction
  of real points inside the generated manifold.
- Density and coverage (Naeem et al. 2020, k=5), both from the real balls only, so outlying
  samples cannot inflate the generated manifold: density counts how many real balls hold each
  generated point (divided by k; about 1 when the two sets share a distribution, above 1 when
  samples crowd into dense regions); coverage is the fraction of real balls that hold any
  generated point.

A collapsed generator scores high precision but low recall and coverage; samples off the data
(grey noise, say) score near zero precision and density.
"""

import jax
import jax.numpy as jnp


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


def _inside(points: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
  """[P, C] booleans: is point p inside the ball around centre c (squared radius)?"""
  return _squared_distances(points, centres) <= radii[None, :]


@jax.jit(static_argnames="k")
def _precision_recall(real_f: jax.Array, fake_f: jax.Array, k: int) -> dict[str, jax.Array]:
  real_f, fake_f = real_f.astype(jnp.float32), fake_f.astype(jnp.float32)
  return {
    "precision": jnp.mean(jnp.any(_inside(fake_f, real_f, _radii(real_f, k)), axis=1)),
    "recall": jnp.mean(jnp.any(_inside(real_f, fake_f, _radii(fake_f, k)), axis=1)),
  }


@jax.jit(static_argnames="k")
def _density_coverage(real_f: jax.Array, fake_f: jax.Array, k: int) -> dict[str, jax.Array]:
  real_f, fake_f = real_f.astype(jnp.float32), fake_f.astype(jnp.float32)
  inside = _inside(fake_f, real_f, _radii(real_f, k))  # [M fake, N real]
  return {
    "density": jnp.sum(inside) / (k * fake_f.shape[0]),
    "coverage": jnp.mean(jnp.any(inside, axis=0)),
  }


def _check(real_f, fake_f, k: int) -> None:
  for name, f in (("real", real_f), ("fake", fake_f)):
    if f.ndim != 2 or f.shape[0] <= k:
      raise ValueError(f"{name} features must be [N, D] with N > k={k}, got shape {f.shape}")
  if real_f.shape[1] != fake_f.shape[1]:
    raise ValueError(f"feature sizes differ: {real_f.shape[1]} vs {fake_f.shape[1]}")


def precision_recall(real_f: jax.Array, fake_f: jax.Array, k: int = 3) -> dict[str, float]:
  """Improved precision and recall of generated features `fake_f` [M, D] against `real_f` [N, D].

  Args:
    real_f: [N, D] real features, N > k.
    fake_f: [M, D] generated features, M > k.
    k: the neighbour whose distance sets each ball's radius (3 in the paper).

  Returns:
    {"precision": float, "recall": float}, both in [0, 1]. Memory is O(N * M) (all pairwise
    distances at once): a few tens of MB for 2,000 against 2,000.
  """
  _check(real_f, fake_f, k)
  return {name: float(v) for name, v in _precision_recall(real_f, fake_f, k).items()}


def density_coverage(real_f: jax.Array, fake_f: jax.Array, k: int = 5) -> dict[str, float]:
  """Density and coverage of generated features `fake_f` [M, D] against `real_f` [N, D].

  Returns:
    {"density": float >= 0 (at most N / k), "coverage": float in [0, 1]}; k is 5 in the paper.
  """
  _check(real_f, fake_f, k)
  return {name: float(v) for name, v in _density_coverage(real_f, fake_f, k).items()}
