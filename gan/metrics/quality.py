"""Sample quality against real images, as periodic evaluation and scripts/evaluate.py use it.

Metrics, by name:
  swd               sliced Wasserstein distance on Laplacian-pyramid patches (x1e3; no weights)
  precision_recall  k-NN manifold precision and recall (no weights)
  fid, kid          Frechet and kernel Inception distances; need the Inception weights file
"""

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from gan.errors import UserError
from gan.metrics import fid, inception, precision_recall, swd

METRICS = ("swd", "precision_recall", "fid", "kid")
_INCEPTION_METRICS = {"fid", "kid"}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gan", "fid_statistics")


def check_names(metrics: Sequence[str]) -> None:
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise UserError(f"unknown metrics {', '.join(unknown)}; choose from {', '.join(METRICS)}")


class Evaluator:
  """Scores generated images against one fixed set of real images."""

  def __init__(
    self,
    metrics: Sequence[str],
    real_images: np.ndarray,
    *,
    key: jax.Array,
    reference: str,
    inception_weights: str = "",
    cache_dir: str = DEFAULT_CACHE_DIR,
    require_inception: bool = False,
  ):
    """Args:
    metrics: names from METRICS.
    real_images: [N, R, R, 3] in [-1, 1].
    key: the randomness of SWD, the same at every evaluation.
    reference: names the real set in the FID statistics cache (see fid.reference_key).
    inception_weights: the Inception .npz; '' for inception.default_weights_path().
    cache_dir: where the real images' Inception statistics are kept.
    require_inception: raise when FID/KID are asked for and the weights are absent, rather than
      warn and go on with the weight-free metrics.
    """
    check_names(metrics)
    self.metrics = tuple(metrics)
    self._real = np.asarray(real_images)
    self._key = key
    self._features = None
    if _INCEPTION_METRICS & set(self.metrics):
      try:
        self._features = inception.load_inception(inception_weights or None)
      except UserError as e:
        if require_inception:
          raise
        logging.warning("Skipping FID and KID: %s", e)
        self.metrics = tuple(m for m in self.metrics if m not in _INCEPTION_METRICS)
    if self._features is not None:
      self._real_features = self._features(self._real)
      self._real_stats = fid.reference_statistics(cache_dir, reference, lambda: self._real_features)

  def __call__(self, fake_images: np.ndarray) -> dict[str, float]:
    """The metrics of `fake_images` ([M, R, R, 3] in [-1, 1]) against the real set."""
    fake = np.asarray(fake_images)
    results = {}
    if "swd" in self.metrics:
      results.update(swd.sliced_wasserstein(self._real, fake, self._key))
    if "precision_recall" in self.metrics:
      results.update(precision_recall.precision_recall(self._real, fake))
    if self._features is not None:
      fake_features = self._features(fake)
      if "fid" in self.metrics:
        results["fid"] = fid.frechet_distance(
          *self._real_stats, *fid.feature_statistics(fake_features)
        )
      if "kid" in self.metrics:
        results["kid"], results["kid_std"] = fid.kernel_inception_distance(
          self._real_features, fake_features
        )
    return {k: float(v) for k, v in results.items()}
