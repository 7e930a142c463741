"""Health signals: how diverse a generator's samples are, against the same on real images.

Every `eval.every` steps the trainer draws `collapse.num_samples` images from the generator (a
fixed noise batch, so evaluations compare like with like) and measures:

- `ms_ssim`: mean MS-SSIM between random pairs of samples; collapse drives it towards 1.
- `duplicate_rate`: the fraction of samples with a near-identical neighbour among the others.
- `ndb_fraction`: NDB / K (gan/metrics/ndb.py), the share of K k-means bins of the real images'
  layouts whose share of samples differs significantly from the real images' share: label-free
  coverage, for any dataset.
- on synthetic_faces, `modes_covered` of the 1,000 and `kl_uniform`, the KL divergence of the
  sample's mode histogram from uniform, read by the project's own mode classifier.

Each but `ndb_fraction` and `kl_uniform` comes with the real images' value as `<signal>_real`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gan import parallel
from gan.metrics import diversity, mode_classifier, ndb


class HealthProbe:
  """Measures the diversity signals of a generator against a fixed batch of real images.

  Nothing is loaded or measured until the first call (the mode classifier, the real images' own
  signals), so the probe adds nothing to a run's time to its first step.
  """

  def __init__(self, config, real_images: np.ndarray, noise: np.ndarray, generate, key):
    """Args:
    config: the whole config (`collapse` and `data` sections are read).
    real_images: [N, R, R, 3] in [-1, 1], the reference the samples are compared with.
    noise: [N, latent_dim], the fixed noise the samples are drawn from (None: `measure` only).
    generate: (g_params, g_batch_stats, z) -> images, jit-compatible (None: `measure` only).
    key: chooses the MS-SSIM pairs, the same at every evaluation.
    """
    self._config = config
    self._real_images = real_images
    self._noise = noise
    self._generate = generate
    self._key = key

  @functools.cached_property
  def _signals(self):
    """images -> {signal: value}, jit-compatible."""
    collapse_config = self._config.collapse
    classifier = None
    if self._config.data.source == "synthetic_faces":
      classifier = mode_classifier.load_classifier()
    bins = ndb.NDB(self._real_images, collapse_config.ndb_bins, seed=self._config.train.seed)

    def signals(images):
      out = {
        "ms_ssim": diversity.mean_pairwise_ms_ssim(images, self._key, collapse_config.num_pairs),
        "duplicate_rate": diversity.near_duplicate_rate(images, collapse_config.duplicate_distance),
        "ndb_fraction": bins.fraction(images),
      }
      if classifier is not None:
        hist = mode_classifier.mode_histogram(mode_classifier.predict_modes(classifier, images))
        out["modes_covered"] = mode_classifier.modes_covered(hist)
        out["kl_uniform"] = mode_classifier.kl_from_uniform(hist)
      return out

    return signals

  @functools.cached_property
  def _probe(self):
    signals, noise = self._signals, jnp.asarray(self._noise)  # made outside the trace
    return jax.jit(lambda params, stats: signals(self._generate(params, stats, noise)))

  def _on_host(self, images) -> dict[str, float]:
    measured = jax.device_get(jax.jit(self._signals)(jnp.asarray(images)))
    return {k: float(v) for k, v in measured.items()}

  @functools.cached_property
  def reference(self) -> dict[str, float]:
    """The real images' signals, named `<signal>_real`."""
    real = self._on_host(self._real_images)
    return {f"{k}_real": v for k, v in real.items() if k not in ("kl_uniform", "ndb_fraction")}

  def __call__(self, g_params, g_batch_stats) -> dict[str, float]:
    """The generator's signals beside the real reference, as host floats."""
    measured = parallel.to_host(self._probe(g_params, g_batch_stats))
    return {**{k: float(v) for k, v in measured.items()}, **self.reference}

  def measure(self, images: np.ndarray) -> dict[str, float]:
    """The signals of any images in [-1, 1] (stand-ins for samples: scripts/probe_stand_ins.py)
    beside the real reference, as host floats."""
    return {**self._on_host(images), **self.reference}
