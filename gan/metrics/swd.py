"""Sliced Wasserstein distance between two image sets, as in Progressive GAN (Karras et al. 2018).

Each image is split into a Laplacian pyramid (levels halving down to 16 px: band-pass levels and
the 16 px low-pass residual). At every level, 7x7 patches taken at random positions serve as
descriptors of local structure at that scale. The descriptors are normalised per channel, then
the sliced Wasserstein distance compares the two descriptor sets: both are projected onto random
unit directions, and the sorted projections are compared, which is the exact 1-D Wasserstein-1
distance along each direction. Values are reported x1e3, as in the paper's tables.

One deliberate difference from the reference `metrics/sliced_wasserstein.py`: there each set is
normalised by its own mean and std, which makes the metric blind to a global colour or contrast
shift of the generated images. Here both sets share one mean and std per level and channel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# The 5-tap binomial filter of the classic Burt-Adelson pyramid (and of the reference code).
_GAUSSIAN_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def _blur(images: jax.Array) -> jax.Array:
  """Separable 5x5 Gaussian blur of [N, H, W, C], mirroring at the borders."""
  padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  h, w = images.shape[1:3]
  rows = sum(_GAUSSIAN_5[i] * padded[:, i : i + h] for i in range(5))
  return sum(_GAUSSIAN_5[i] * rows[:, :, i : i + w] for i in range(5))


def _pyr_down(images: jax.Array) -> jax.Array:
  return _blur(images)[:, ::2, ::2]


def _pyr_up(images: jax.Array) -> jax.Array:
  n, h, w, c = images.shape
  # Zeros between the samples, then a blur with 4x gain to restore the mean brightness.
  up = jnp.zeros((n, 2 * h, 2 * w, c), images.dtype).at[:, ::2, ::2].set(images)
  return 4.0 * _blur(up)


@functools.partial(jax.jit, static_argnames="min_resolution")
def laplacian_pyramid(images: jax.Array, min_resolution: int = 16) -> list[jax.Array]:
  """Band-pass levels from full resolution down, then the low-pass residual at `min_resolution`.

  Args:
    images: [N, H, W, C] with H == W a power-of-two multiple of `min_resolution`.
    min_resolution: the side of the coarsest level.

  Returns:
    A list of [N, H / 2^i, W / 2^i, C] arrays, finest first; they sum back to the images.
  """
  levels = []
  current = images.astype(jnp.float32)
  while current.shape[1] > min_resolution:
    smaller = _pyr_down(current)
    levels.append(current - _pyr_up(smaller))
    current = smaller
  levels.append(current)
  return levels


@functools.partial(jax.jit, static_argnames=("num", "patch_size"))
def _patches(level: jax.Array, key: jax.Array, num: int, patch_size: int) -> jax.Array:
  """[num, patch_size, patch_size, C] patches at random images and positions of one level."""
  n, h, w, c = level.shape
  image_key, y_key, x_key = jax.random.split(key, 3)
  index = jax.random.randint(image_key, (num,), 0, n)
  y = jax.random.randint(y_key, (num,), 0, h - patch_size + 1)
  x = jax.random.randint(x_key, (num,), 0, w - patch_size + 1)

  def one(i, top, left):
    return jax.lax.dynamic_slice(level[i], (top, left, 0), (patch_size, patch_size, c))

  return jax.vmap(one)(index, y, x)


@functools.partial(jax.jit, static_argnames="num_directions")
def _project(a: jax.Array, b: jax.Array, key: jax.Array, num_directions: int):
  """[num_directions, M] projections of [M, D] sets a and b onto random unit directions."""
  directions = jax.random.normal(key, (a.shape[1], num_directions))
  directions = directions / jnp.linalg.norm(directions, axis=0, keepdims=True)
  return (a @ directions).T, (b @ directions).T


def _sliced_wasserstein(
  a: jax.Array, b: jax.Array, key: jax.Array, num_directions: int, num_repeats: int
) -> float:
  """Mean over random unit directions of the 1-D Wasserstein-1 distance of [M, D] sets a, b."""
  distances = []
  for repeat_key in jax.random.split(key, num_repeats):
    proj_a, proj_b = (np.array(p) for p in _project(a, b, repeat_key, num_directions))
    # Equal-size sets: the sorted projections pair up as the optimal 1-D transport plan. NumPy
    # sorts: XLA:CPU's sort is much slower on these shapes.
    proj_a.sort(axis=1)
    proj_b.sort(axis=1)
    distances.append(np.mean(np.abs(proj_a - proj_b)))
  return float(np.mean(distances))


def sliced_wasserstein(
  real: jax.Array,
  fake: jax.Array,
  key: jax.Array,
  *,
  patches_per_image: int = 128,
  patch_size: int = 7,
  num_directions: int = 128,
  num_repeats: int = 4,
  min_resolution: int = 16,
) -> dict[str, float]:
  """The SWD (x1e3) between two image sets at every pyramid level, and their mean.

  Args:
    real: [N, H, W, 3] in [-1, 1]; H == W, a power-of-two multiple of `min_resolution`.
    fake: [M, H, W, 3] in [-1, 1], the same size; N and M may differ.
    key: a PRNG key choosing patches and directions; the result is a function of it.
    patches_per_image: descriptors per image and level; both sets contribute
      min(N, M) * patches_per_image each, so that their sorted projections pair up.
    patch_size: the side of a descriptor patch.
    num_directions: random projections per repeat (128 x 4 repeats, as the reference code).
    num_repeats: repeats with fresh directions, averaged.
    min_resolution: the coarsest level's side.

  Returns:
    {"swd_<res>px": value for each level, finest first, ..., "swd_mean": their mean}. Even two
    samples of one distribution differ by sampling noise that shrinks as N grows, so compare
    values only at equal N.
  """
  if real.shape[1:] != fake.shape[1:]:
    raise ValueError(f"real and fake images differ in shape: {real.shape} vs {fake.shape}")
  size = real.shape[1]
  if real.shape[2] != size or size < min_resolution or size % min_resolution:
    raise ValueError(
      f"sliced_wasserstein needs square images whose side is a multiple of {min_resolution}, "
      f"got {real.shape[1:3]}"
    )
  num = min(real.shape[0], fake.shape[0]) * patches_per_image
  real_levels = laplacian_pyramid(jnp.asarray(real), min_resolution)
  fake_levels = laplacian_pyramid(jnp.asarray(fake), min_resolution)
  results = {}
  for level, (real_level, fake_level) in enumerate(zip(real_levels, fake_levels, strict=True)):
    level_key = jax.random.fold_in(key, level)
    real_key, fake_key, direction_key = jax.random.split(level_key, 3)
    a = _patches(real_level, real_key, num, patch_size)
    b = _patches(fake_level, fake_key, num, patch_size)
    a, b = _normalise(a, b)
    value = _sliced_wasserstein(a, b, direction_key, num_directions, num_repeats)
    results[f"swd_{real_level.shape[1]}px"] = value * 1e3
  results["swd_mean"] = float(np.mean(list(results.values())))
  return results


def level_sizes(resolution: int, min_resolution: int = 16) -> list[int]:
  """The sides of the pyramid levels sliced_wasserstein compares, finest first."""
  sizes = [resolution]
  while sizes[-1] > min_resolution:  # as laplacian_pyramid halves
    sizes.append(sizes[-1] // 2)
  return sizes


@jax.jit
def _normalise(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flattens [M, P, P, C] descriptors after subtracting and dividing by the shared mean/std."""
  both = jnp.concatenate([a, b])
  mean = jnp.mean(both, axis=(0, 1, 2))
  std = jnp.std(both, axis=(0, 1, 2))
  # A constant channel (e.g. a flat test image's band-pass level) has std 0.
  std = jnp.where(std > 0, std, 1.0)
  return _flat((a - mean) / std), _flat((b - mean) / std)


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)
