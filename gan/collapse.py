"""Mode collapse: health signals -> a verdict per evaluation -> the rollback decision.

Every `eval.every` steps the trainer draws `collapse.num_samples` images from the generator (a
fixed noise batch, so evaluations compare like with like) and measures how diverse they are
against the same measures on real images:

- `ms_ssim`: mean MS-SSIM between random pairs of samples; collapse drives it towards 1.
- `duplicate_rate`: the fraction of samples with a near-identical neighbour among the others.
- on synthetic_faces, `modes_covered` of the 1,000 and `kl_uniform`, the KL divergence of the
  sample's mode histogram from uniform, read by the project's own mode classifier.

`judge` turns them into a verdict: healthy, suspect (some signal is out of bounds) or collapsed
(out of bounds for `collapse.patience` evaluations in a row, or anything non-finite at once).
During the warm-up (`collapse.warmup_steps`) only non-finite values are judged; the rest is
unjudged. A rollback goes back only to a checkpoint judged healthy, else to the start.
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gan import parallel
from gan.errors import UserError
from gan.metrics import diversity, mode_classifier

HEALTHY, SUSPECT, COLLAPSED, UNJUDGED = "healthy", "suspect", "collapsed", "unjudged"
VERDICTS = (HEALTHY, SUSPECT, COLLAPSED, UNJUDGED)  # stored in checkpoint metrics by index
ROLLBACKS_FILE = "rollbacks.jsonl"


class CollapseError(UserError):
  """Training collapsed with rollback off, or more often than `collapse.max_rollbacks` allows."""

  def __init__(self, message: str, step: int, signals: Mapping[str, float]):
    super().__init__(message)
    self.step = step
    self.signals = dict(signals)


@dataclasses.dataclass(frozen=True)
class Judgement:
  verdict: str
  reasons: tuple[str, ...]
  streak: int  # evaluations in a row with a signal out of bounds


def judge(signals: Mapping[str, float], config, streak: int, step: int) -> Judgement:
  """The verdict on one evaluation's signals.

  Args:
    signals: from `HealthProbe` plus the training scalars (`nonfinite` among them).
    config: the `collapse` config section.
    streak: the previous evaluation's streak of out-of-bounds signals.
    step: the step evaluated; before `collapse.warmup_steps` only non-finite values count, as a
      young generator's samples all look alike without having collapsed.

  Returns:
    The verdict, the reasons for it and the new streak.
  """
  bad = sorted(k for k, v in signals.items() if not np.isfinite(v))
  if bad or signals.get("nonfinite", 0) > 0:
    return Judgement(COLLAPSED, (f"non-finite {', '.join(bad) or 'loss or gradient'}",), streak + 1)
  if step < config.warmup_steps:
    return Judgement(UNJUDGED, (), 0)
  reasons = []
  gap = signals["ms_ssim"] - signals["ms_ssim_real"]
  if gap > config.max_ms_ssim_gap:
    reasons.append(
      f"samples' MS-SSIM {signals['ms_ssim']:.3f} exceeds real {signals['ms_ssim_real']:.3f} by {gap:.3f}"
    )
  if signals["duplicate_rate"] > config.max_duplicate_rate:
    reasons.append(f"{signals['duplicate_rate']:.0%} of samples are near duplicates")
  if "modes_covered" in signals:
    floor = config.min_mode_coverage * signals["modes_covered_real"]
    if signals["modes_covered"] < floor:
      reasons.append(
        f"{signals['modes_covered']:.0f} modes covered, below {floor:.0f} "
        f"({config.min_mode_coverage:.0%} of real images' {signals['modes_covered_real']:.0f})"
      )
  if not reasons:
    return Judgement(HEALTHY, (), 0)
  streak += 1
  return Judgement(COLLAPSED if streak >= config.patience else SUSPECT, tuple(reasons), streak)


class HealthProbe:
  """Measures the diversity signals of a generator against a fixed batch of real images.

  Nothing is loaded or measured until the first call (the mode classifier, the real images' own
  signals), so the probe adds nothing to a run's time to its first step.
  """

  def __init__(self, config, real_images: np.ndarray, noise: np.ndarray, generate, key):
    """Args:
    config: the whole config (`collapse` and `data` sections are read).
    real_images: [N, R, R, 3] in [-1, 1], the reference the samples are compared with.
    noise: [N, latent_dim], the fixed noise the samples are drawn from.
    generate: (g_params, g_batch_stats, z) -> images, jit-compatible.
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

    def signals(images):
      out = {
        "ms_ssim": diversity.mean_pairwise_ms_ssim(images, self._key, collapse_config.num_pairs),
        "duplicate_rate": diversity.near_duplicate_rate(images, collapse_config.duplicate_distance),
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

  @functools.cached_property
  def reference(self) -> dict[str, float]:
    """The real images' signals, named `<signal>_real`."""
    real = jax.device_get(jax.jit(self._signals)(jnp.asarray(self._real_images)))
    return {f"{k}_real": float(v) for k, v in real.items() if k != "kl_uniform"}

  def __call__(self, g_params, g_batch_stats) -> dict[str, float]:
    """The generator's signals beside the real reference, as host floats."""
    measured = parallel.to_host(self._probe(g_params, g_batch_stats))
    return {**{k: float(v) for k, v in measured.items()}, **self.reference}


def record_rollback(workdir: str, event: Mapping) -> None:
  """Appends one JSON line per rollback to WORKDIR/rollbacks.jsonl."""
  with open(os.path.join(workdir, ROLLBACKS_FILE), "a") as f:
    f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}) + "\n")


def count_rollbacks(workdir: str) -> int:
  """How many rollbacks WORKDIR/rollbacks.jsonl records."""
  path = os.path.join(workdir, ROLLBACKS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.strip())
