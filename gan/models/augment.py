"""DiffAugment (Zhao et al. 2020): differentiable augmentations of what D sees.

Real and generated images pass through the same kinds of transform before D, so D cannot tell
them apart by the augmentation, and G's gradient flows back through it; D then sees many more
distinct images than a small dataset holds. `train.diffaugment` names the transforms, applied in
the order given, each drawn per image from the key:

    color        brightness (+U[-0.5, 0.5]), saturation (x U[0, 2]), contrast (x U[0.5, 1.5])
    translation  a shift of up to 1/8 of the side each way, zeros filling in
    cutout       a square of half the side set to zero, centred anywhere in the image

Images are [B, H, W, C] in [-1, 1]; zero is mid-grey.
"""

import jax
import jax.numpy as jnp
from jax import lax


def _color(x: jax.Array, key: jax.Array) -> jax.Array:
  brightness, saturation, contrast = jax.random.uniform(key, (3, x.shape[0], 1, 1, 1), x.dtype)
  x = x + (brightness - 0.5)
  grey = jnp.mean(x, axis=-1, keepdims=True)
  x = (x - grey) * (2 * saturation) + grey
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (contrast + 0.5) + mean


def _translation(x: jax.Array, key: jax.Array) -> jax.Array:
  batch, height, width, channels = x.shape
  most = (round(height / 8), round(width / 8))
  shifts = [
    jax.random.randint(k, (batch,), -m, m + 1)
    for k, m in zip(jax.random.split(key), most, strict=True)
  ]
  padded = jnp.pad(x, ((0, 0), (most[0], most[0]), (most[1], most[1]), (0, 0)))

  def crop(image, dy, dx):  # the output's (i, j) is the input's (i - dy, j - dx)
    return lax.dynamic_slice(image, (most[0] - dy, most[1] - dx, 0), (height, width, channels))

  return jax.vmap(crop)(padded, *shifts)


def _cutout(x: jax.Array, key: jax.Array) -> jax.Array:
  batch, height, width, _ = x.shape
  inside = []
  for k, side in zip(jax.random.split(key), (height, width), strict=True):
    size = round(side / 2)
    start = jax.random.randint(k, (batch, 1), 0, side + 1) - size // 2
    position = jnp.arange(side)[None, :]
    inside.append((position >= start) & (position < start + size))
  covered = inside[0][:, :, None, None] & inside[1][:, None, :, None]
  return jnp.where(covered, jnp.zeros((), x.dtype), x)


_TRANSFORMS = {"color": _color, "translation": _translation, "cutout": _cutout}
NAMES = tuple(_TRANSFORMS)


def parse(policy: str) -> tuple[str, ...]:
  """The transform names of a policy such as 'color,translation,cutout' ('' is none)."""
  return tuple(name.strip() for name in policy.split(",") if name.strip())


def augment(images: jax.Array, policy: str, key: jax.Array) -> jax.Array:
  """`images` through the policy's transforms, each drawn from `key` folded with the transform's
  index in NAMES: the same key gives the same transform to every batch of the same size.

  Args:
    images: [B, H, W, C] floats.
    policy: comma-separated names from NAMES (validated by gan.config).
    key: a PRNG key.
  """
  for name in parse(policy):
    images = _TRANSFORMS[name](images, jax.random.fold_in(key, NAMES.index(name)))
  return images
