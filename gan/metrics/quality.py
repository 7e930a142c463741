"""Sample quality against real images, as periodic evaluation and scripts/evaluate.py use it.

Metrics, by name:
  swd               sliced Wasserstein distance on Laplacian-pyramid patches (x1e3; no weights)
  fid, kid          Frechet and kernel Inception distances
  precision_recall  improved precision and recall (k=3) on Inception features
  density_coverage  density and coverage (k=5) on Inception features
  precision_recall_rvgg, density_coverage_rvgg
                    the same two on the features of a VGG-16 with fixed random weights
                    (`random_vgg`; no download), as `precision_rvgg`, `recall_rvgg`, ...
  modes             synthetic_faces only: of its 1,000 modes, how many the samples cover and
                    the KL divergence of their mode histogram from uniform (PacGAN's count),
                    and the same for the real images; by the project's mode classifier
fid, kid, precision_recall and density_coverage need pytorch-fid's Inception weights, downloaded
on first use (`inception.resolve_weights`). The real images' features are cached per reference
set and embedding (and weights file), and shared by the metrics on that embedding.
"""

import hashlib
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from gan.errors import UserError
from gan.metrics import fid, inception, mode_classifier, precision_recall, random_vgg, swd

METRICS = (
  "swd",
  "fid",
  "kid",
  "precision_recall",
  "density_coverage",
  "precision_recall_rvgg",
  "density_coverage_rvgg",
  "modes",
)
INCEPTION_METRICS = frozenset({"fid", "kid", "precision_recall", "density_coverage"})
RANDOM_VGG_METRICS = frozenset({"precision_recall_rvgg", "density_coverage_rvgg"})
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gan", "reference_features")


def check_names(metrics: Sequence[str]) -> None:
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise UserError(f"unknown metrics {', '.join(unknown)}; choose from {', '.join(METRICS)}")


def scalar_names(metrics: Sequence[str], resolution: int) -> list[str]:
  """The names of the scalars `metrics` give at `resolution` (what checkpoint.best_metric may
  rank by)."""
  names = {
    "swd": [f"swd_{size}px" for size in swd.level_sizes(resolution)] + ["swd_mean"],
    "fid": ["fid"],
    "kid": ["kid", "kid_std"],
    "precision_recall": ["precision", "recall"],
    "density_coverage": ["density", "coverage"],
    "precision_recall_rvgg": ["precision_rvgg", "recall_rvgg"],
    "density_coverage_rvgg": ["density_rvgg", "coverage_rvgg"],
    "modes": ["modes_covered", "kl_uniform"],
  }
  return [name for metric in metrics for name in names[metric]]


def reference_key(data_config, num_samples: int, split: str = "train") -> str:
  """Names a reference set in the feature cache: dataset, split, resolution and image count.

  The dataset is `data.source` plus a digest of every `data` field (the folder or archive, the
  synthetic seed, ...), so two datasets never share an entry.
  """
  fields = dict(data_config)
  if fields.get("path"):
    fields["path"] = os.path.abspath(os.path.expanduser(fields["path"]))
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
  dataset = f"{fields['source']}-{digest[:10]}"
  return fid.reference_key(dataset, split, fields["resolution"], num_samples)


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
    reference: names the real set in the feature cache (see `reference_key`).
    inception_weights: the Inception .pth; '' for `inception.resolve_weights`' choice.
    cache_dir: where the real images' features are kept.
    require_inception: raise when Inception metrics are asked for and the weights cannot be
      had, rather than warn and go on with the weight-free metrics.
    """
    check_names(metrics)
    self.metrics = tuple(metrics)
    self._real = np.asarray(real_images)
    self._key = key
    self._features = None
    wanted = sorted(INCEPTION_METRICS & set(self.metrics))
    if wanted:
      try:
        path, sha256 = inception.resolve_weights(inception_weights or None)
        self._features = inception.load_inception(path)
      except UserError as e:
        if require_inception:
          raise
        logging.warning("Skipping %s: %s", ", ".join(wanted), e)
        self.metrics = tuple(m for m in self.metrics if m not in INCEPTION_METRICS)
    if "modes" in self.metrics:
      self._classifier = mode_classifier.load_classifier()
      self._real_modes = mode_counts(self._classifier, self._real, "_real")
    if self._features is not None:
      self._real_features = fid.reference_features(
        cache_dir, f"{reference}_inception-{sha256[:8]}", lambda: self._features(self._real)
      )
      self._real_stats = fid.feature_statistics(self._real_features)
    self._rvgg = None
    if RANDOM_VGG_METRICS & set(self.metrics):
      self._rvgg = random_vgg.load_random_vgg()
      self._real_rvgg = fid.reference_features(
        cache_dir, f"{reference}_rvgg-{random_vgg.SEED}", lambda: self._rvgg(self._real)
      )

  def __call__(self, fake_images: np.ndarray) -> dict[str, float]:
    """The metrics of `fake_images` ([M, R, R, 3] in [-1, 1]) against the real set."""
    fake = np.asarray(fake_images)
    results = {}
    if "swd" in self.metrics:
      results.update(swd.sliced_wasserstein(self._real, fake, self._key))
    if "modes" in self.metrics:
      results.update(mode_counts(self._classifier, fake), **self._real_modes)
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
      if "precision_recall" in self.metrics:
        results.update(precision_recall.precision_recall(self._real_features, fake_features))
      if "density_coverage" in self.metrics:
        results.update(precision_recall.density_coverage(self._real_features, fake_features))
    if self._rvgg is not None:
      fake_rvgg = self._rvgg(fake)
      if "precision_recall_rvgg" in self.metrics:
        found = precision_recall.precision_recall(self._real_rvgg, fake_rvgg)
        results.update({f"{k}_rvgg": v for k, v in found.items()})
      if "density_coverage_rvgg" in self.metrics:
        found = precision_recall.density_coverage(self._real_rvgg, fake_rvgg)
        results.update({f"{k}_rvgg": v for k, v in found.items()})
    return {k: float(v) for k, v in results.items()}


def mode_counts(classifier, images: np.ndarray, suffix: str = "", chunk: int = 1000) -> dict:
  """modes_covered and kl_uniform of `images`, read `chunk` at a time to bound memory."""
  modes = np.concatenate(
    [
      np.asarray(mode_classifier.predict_modes(classifier, images[i : i + chunk]))
      for i in range(0, len(images), chunk)
    ]
  )
  hist = mode_classifier.mode_histogram(modes)
  return {
    f"modes_covered{suffix}": float(mode_classifier.modes_covered(hist)),
    f"kl_uniform{suffix}": float(mode_classifier.kl_from_uniform(hist)),
  }
