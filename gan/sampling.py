"""Turning generator outputs into pictures: grids, PNG and GIF files, noise and interpolation.

The pure helpers behind `scripts/sample.py`: truncated noise, spherical interpolation between
noise vectors, and nearest neighbours in pixel space (a memorisation check).
"""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

SAMPLES_DIR = "samples"  # WORKDIR/samples: a run's grids
_GRID_NAME = re.compile(r"step_(\d+)\.png")


def grid_path(workdir: str, step: int) -> str:
  """Where a run's sample grid of `step` goes: WORKDIR/samples/step_NNNNNNN.png."""
  return os.path.join(workdir, SAMPLES_DIR, f"step_{step:07d}.png")


def grid_step(name: str) -> int | None:
  """The step of a grid file's name, or None for any other file."""
  match = _GRID_NAME.fullmatch(name)
  return int(match[1]) if match else None


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255]; non-finite pixels (a diverged run) become black."""
  images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
  return np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, padding: int = 2, cols: int | None = None) -> np.ndarray:
  """Tiles [N, H, W, 3] images in [-1, 1] into one uint8 [H', W', 3] grid, row by row.

  The grid is near-square unless `cols` fixes the number of columns.
  """
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, np.uint8)
  for i, image in enumerate(to_uint8(images)):
    top = padding + (i // cols) * (h + padding)
    left = padding + (i % cols) * (w + padding)
    grid[top : top + h, left : left + w] = image
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image, atomically so a crash never leaves half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)


def save_gif(path: str, frames: np.ndarray, duration_ms: int = 100) -> None:
  """Writes uint8 [T, H, W, 3] frames as a looping animated GIF, atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  first, *rest = (Image.fromarray(frame) for frame in frames)
  first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)
  os.replace(tmp, path)


def truncated_noise(key: jax.Array, num: int, dim: int, truncation: float | None) -> jax.Array:
  """[num, dim] standard normal noise with every |z| > truncation resampled (the truncation trick).

  Resampling out-of-range values gives the normal distribution truncated to [-t, t]; samples get
  more typical and less varied as t shrinks. `truncation` None or 0 means no truncation.
  """
  if not truncation:
    return jax.random.normal(key, (num, dim))
  if truncation < 0:
    raise ValueError(f"truncation must be positive, got {truncation}")
  return jax.random.truncated_normal(key, -truncation, truncation, (num, dim))


def interpolate(z0: jax.Array, z1: jax.Array, steps: int) -> jax.Array:
  """Spherical interpolation (slerp) from z0 to z1, both [..., D]; returns [..., steps, D].

  Slerp rather than a straight line: in high dimensions normal noise lives near a sphere of
  radius sqrt(D), and the midpoint of a straight line between two such points lies well inside it,
  where G saw no training noise. The first and last steps are z0 and z1.
  """
  if steps < 2:
    raise ValueError(f"interpolate needs at least 2 steps, got {steps}")
  z0 = jnp.asarray(z0, jnp.float32)[..., None, :]
  z1 = jnp.asarray(z1, jnp.float32)[..., None, :]
  t = jnp.linspace(0.0, 1.0, steps)[:, None]
  unit0 = z0 / jnp.linalg.norm(z0, axis=-1, keepdims=True)
  unit1 = z1 / jnp.linalg.norm(z1, axis=-1, keepdims=True)
  omega = jnp.arccos(jnp.clip(jnp.sum(unit0 * unit1, axis=-1, keepdims=True), -1.0, 1.0))
  sin = jnp.sin(omega)
  # Nearly parallel vectors: slerp's weights tend to the straight line's, which is safe to divide.
  parallel = sin < 1e-6
  safe_sin = jnp.where(parallel, 1.0, sin)
  w0 = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe_sin)
  w1 = jnp.where(parallel, t, jnp.sin(t * omega) / safe_sin)
  path = w0 * z0 + w1 * z1
  # Exact endpoints, whatever the rounding of sin(omega) / sin(omega).
  return path.at[..., 0, :].set(z0[..., 0, :]).at[..., -1, :].set(z1[..., 0, :])


def nearest_neighbours(samples: jax.Array, candidates: jax.Array, k: int) -> np.ndarray:
  """[N, k] indices of each sample's k nearest candidates (L2 in pixel space), nearest first."""
  if k > candidates.shape[0]:
    raise ValueError(f"asked for {k} neighbours among {candidates.shape[0]} candidates")
  return np.asarray(_nearest(jnp.asarray(samples), jnp.asarray(candidates), k))


def nearest_images(samples: jax.Array, images: np.ndarray, k: int, *, mirrored: bool) -> np.ndarray:
  """[N, k, ...]: each sample's k nearest of `images` (distinct ones, nearest first).

  With `mirrored` (a run trained on random flips) each image also counts in its mirrored form,
  and is shown in whichever of its two forms is nearer: a mirrored copy is still a copy.
  """
  if k > images.shape[0]:
    raise ValueError(f"asked for {k} neighbours among {images.shape[0]} candidates")
  candidates = np.concatenate([images, images[:, :, ::-1]]) if mirrored else images
  # Each image can fill two of the nearest places, so 2k of them hold k distinct images.
  order = nearest_neighbours(samples, candidates, min(2 * k, candidates.shape[0]))
  picked = []
  for row in order:
    nearer_form = {}  # image -> its nearer form's candidate index, nearest image first
    for index in row:
      nearer_form.setdefault(int(index) % images.shape[0], int(index))
    picked.append(list(nearer_form.values())[:k])
  return candidates[np.asarray(picked)]


@jax.jit(static_argnames="k")
def _nearest(samples: jax.Array, candidates: jax.Array, k: int) -> jax.Array:
  a = samples.reshape(samples.shape[0], -1).astype(jnp.float32)
  b = candidates.reshape(candidates.shape[0], -1).astype(jnp.float32)
  # Centring keeps |a|^2 + |b|^2 - 2ab accurate in float32 for near-identical images.
  mean = jnp.mean(b, axis=0)
  a, b = a - mean, b - mean
  dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * dots
  return jax.lax.top_k(-sq, k)[1]
