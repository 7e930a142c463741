"""Multi-scale structural similarity (MS-SSIM) between image batches, in pure JAX.

Wang, Simoncelli & Bovik (2003), computed as TensorFlow's `tf.image.ssim_multiscale` does: an
11x11 Gaussian window (sigma 1.5) applied without padding, K1 = 0.01, K2 = 0.03, 2x2 average
pooling between scales, contrast-structure terms at every scale but the coarsest, the full SSIM
at the coarsest, negative terms clipped to 0, and the per-channel scores averaged over RGB.

Small images: the standard five scales need a side of at least 11 * 2**4 = 176 px. For smaller
images only the scales whose side is still >= 11 px are used (2 at 32 px, 3 at 64 px, 4 at
128 px) and their weights are renormalised to sum to 1. We do not shrink the window instead:
the dropped scales would be 2-8 px wide, where a few-pixel window leaves SSIM's local variances
almost undetermined, so those terms would add noise rather than structure. The score is then
only comparable between images of the same size, which is how the diversity metrics use it
(generated versus real images at the training resolution). At >= 176 px it equals the standard
five-scale MS-SSIM exactly.

The Gaussian filtering is written as two small matrix products (rows, then columns) instead of a
depthwise convolution, which XLA:CPU runs much faster.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
FILTER_SIZE = 11
FILTER_SIGMA = 1.5
K1 = 0.01
K2 = 0.03


def num_scales(size: int) -> int:
  """How many of the five scales an image whose smaller side is `size` px affords."""
  scales = 0
  while scales < len(POWER_FACTORS) and size >= FILTER_SIZE:
    scales += 1
    size = (size + 1) // 2
  return scales


def _gaussian_filter_matrix(size: int) -> np.ndarray:
  """[size - 10, size]: row k holds the 1-D Gaussian window placed at offset k ('VALID')."""
  coords = np.arange(FILTER_SIZE, dtype=np.float64) - (FILTER_SIZE - 1) / 2
  window = np.exp(-0.5 * coords**2 / FILTER_SIGMA**2)
  window /= window.sum()
  out = size - FILTER_SIZE + 1
  matrix = np.zeros((out, size), np.float32)
  for k in range(out):
    matrix[k, k : k + FILTER_SIZE] = window
  return matrix


def _local_mean(x: jax.Array) -> jax.Array:
  """Gaussian-weighted local means of [B, H, W, C] maps, without padding."""
  rows = _gaussian_filter_matrix(x.shape[1])
  cols = _gaussian_filter_matrix(x.shape[2])
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("ih,bhwc->biwc", rows, x, precision=hp)
  return jnp.einsum("jw,biwc->bijc", cols, x, precision=hp)


def _ssim_terms(a: jax.Array, b: jax.Array, max_val: float) -> tuple[jax.Array, jax.Array]:
  """Per-channel SSIM and contrast-structure terms, each [N, C]."""
  c1 = (K1 * max_val) ** 2
  c2 = (K2 * max_val) ** 2
  # One filtering pass for all four moment maps.
  means = _local_mean(jnp.concatenate([a, b, a * a + b * b, a * b], axis=0))
  mu_a, mu_b, sq_sum, prod = jnp.split(means, 4, axis=0)
  num0 = 2.0 * mu_a * mu_b
  den0 = mu_a**2 + mu_b**2
  luminance = (num0 + c1) / (den0 + c1)
  cs = (2.0 * prod - num0 + c2) / (sq_sum - den0 + c2)
  return jnp.mean(luminance * cs, axis=(1, 2)), jnp.mean(cs, axis=(1, 2))


def _downsample(x: jax.Array) -> jax.Array:
  """2x2 average pooling; odd sides are first padded by mirroring the last row/column."""
  pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


@functools.partial(jax.jit, static_argnames="max_val")
def ms_ssim(a: jax.Array, b: jax.Array, *, max_val: float = 2.0) -> jax.Array:
  """MS-SSIM of each pair (a[i], b[i]).

  Args:
    a: [N, H, W, 3] images in [-1, 1] (any float dtype; computed in float32).
    b: images of the same shape as `a`.
    max_val: the dynamic range of the pixel values (2 for [-1, 1]).

  Returns:
    [N] float32 scores in [0, 1]; 1 for identical images, near 0 for unrelated noise.
  """
  if a.shape != b.shape:
    raise ValueError(f"ms_ssim needs images of one shape, got {a.shape} and {b.shape}")
  scales = num_scales(min(a.shape[1], a.shape[2]))
  if scales == 0:
    raise ValueError(f"ms_ssim needs images of at least {FILTER_SIZE} px, got {a.shape}")
  weights = jnp.asarray(POWER_FACTORS[:scales], jnp.float32)
  weights /= weights.sum()
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  terms = []
  for scale in range(scales):
    if scale:
      a, b = _downsample(a), _downsample(b)
    ssim, cs = _ssim_terms(a, b, max_val)
    terms.append(cs if scale < scales - 1 else ssim)
  terms = jnp.maximum(jnp.stack(terms, axis=-1), 0.0)  # [N, C, scales]
  return jnp.mean(jnp.prod(terms**weights, axis=-1), axis=-1)
