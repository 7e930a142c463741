"""Fréchet and Kernel Inception Distances between two sets of Inception features.

FID (Heusel et al., 2017) compares Gaussians fitted to the features; it follows pytorch-fid's
numerics, so values are comparable with published ones. KID (Bińkowski et al., 2018) is the
unbiased MMD^2 with a cubic polynomial kernel, averaged over random subsets; unlike FID it is
unbiased in the number of samples, which makes small evaluation sets comparable.

The Inception features of a dataset's reference images are computed once and cached, for FID,
KID and the manifold metrics alike:

    key = reference_key("anime_faces-1a2b3c4d5e", "train", 64, 10000)
    real = reference_features(cache_dir, key, lambda: features_of_real_images())
    fid = frechet_distance(*feature_statistics(real), *feature_statistics(features_of_samples))
"""

import os
import re
import tempfile
import zipfile
from collections.abc import Callable

import numpy as np
from absl import logging
from scipy import linalg

# What reference_key makes: no path separators, no leading dot.
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean float64 [D] and covariance float64 [D, D] (unbiased, as pytorch-fid) of [N, D]."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

  When the product is singular (fewer samples than dimensions) its square root may come back
  non-finite; then eps * I is added to both covariances, as pytorch-fid does.

  Raises:
    ValueError: if the square root has a large imaginary part (the statistics are not
      covariances, or numerics failed).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
      f"{sigma2.shape}"
    )
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular product of covariances; adding %g to their diagonals", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    largest = np.max(np.abs(np.diagonal(covmean).imag))
    if largest > 1e-3:
      raise ValueError(f"FID: the matrix square root has an imaginary component of {largest:g}")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of equal-sized x, y under k(a, b) = (a.b / d + 1)^3."""
  n, d = x.shape
  k_xx = (x @ x.T / d + 1) ** 3
  k_yy = (y @ y.T / d + 1) ** 3
  k_xy = (x @ y.T / d + 1) ** 3
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within - 2 * k_xy.sum() / (n * n))


def kernel_inception_distance(
  features1, features2, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
  """Mean and standard deviation of the unbiased polynomial-kernel MMD^2 over random subsets.

  Each subset draws `subset_size` rows (clipped to the smaller set) from each set without
  replacement, from a numpy RNG seeded with `seed`, so results are reproducible.
  """
  x = np.asarray(features1, np.float64)
  y = np.asarray(features2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"need features [N, D] and [M, D], got {x.shape} and {y.shape}")
  size = min(subset_size, len(x), len(y))
  if size < 2:
    raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
  rng = np.random.default_rng(seed)
  values = [
    _polynomial_mmd2(
      x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)]
    )
    for _ in range(num_subsets)
  ]
  return float(np.mean(values)), float(np.std(values))


def reference_key(dataset: str, split: str, resolution: int, num_samples: int) -> str:
  """A file-name-safe cache key, e.g. 'anime_faces-1a2b3c4d5e_train_64px_10000'."""
  key = f"{dataset}_{split}_{resolution}px_{num_samples}"
  return re.sub(r"[^A-Za-z0-9._-]+", "-", key).lstrip(".")


def reference_features(cache_dir: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
  """The features [N, D] of a reference set: from `<cache_dir>/<key>.npz`, else computed and saved.

  Args:
    cache_dir: folder of the cache; created if needed.
    key: the file name stem, from `reference_key` (plus whatever else tells the sets apart).
    compute: returns the reference features [N, D]; called only when the cache lacks `key` or
      its entry cannot be read.
  """
  if not _SAFE_KEY.fullmatch(key):
    raise ValueError(f"not a safe cache key: {key!r}; build it with reference_key")
  path = os.path.join(cache_dir, f"{key}.npz")
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as cached:
        features = cached["features"]
      if features.ndim == 2:
        logging.info("reference features from %s", path)
        return features
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      logging.warning("computing the reference features again: %s is unreadable (%s)", path, e)
  features = np.asarray(compute(), np.float32)
  os.makedirs(cache_dir, exist_ok=True)
  # Written aside and renamed, so an interrupted run never leaves a truncated cache entry.
  with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as f:
    np.savez(f, features=features)
  os.replace(f.name, path)
  logging.info("reference features saved to %s", path)
  return features
