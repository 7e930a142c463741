"""The verdict on one evaluation's health signals: healthy, suspect, collapsed or unjudged.

`judge` turns the signals of `gan.health.signals` into a verdict: suspect when some signal is out
of bounds, collapsed when out of bounds for `collapse.patience` evaluations in a row (or anything
non-finite, at once). During the warm-up (`collapse.warmup_steps`) only non-finite values are
judged; the rest is unjudged. Checkpoints carry the verdict among their metrics, so a rollback
can go back to the newest one judged healthy.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gan.errors import UserError

HEALTHY, SUSPECT, COLLAPSED, UNJUDGED = "healthy", "suspect", "collapsed", "unjudged"
VERDICTS = (HEALTHY, SUSPECT, COLLAPSED, UNJUDGED)  # stored in checkpoint metrics by index
VERDICT_METRIC = "health/verdict"  # the checkpoint metric holding the verdict's index


class CollapseError(UserError):
  """Training collapsed with rollback off, or more often than `collapse.max_rollbacks` allows."""

  def __init__(self, message: str, step: int, signals: Mapping[str, float], state=None):
    super().__init__(message)
    self.step = step
    self.signals = dict(signals)
    self.state = state  # the TrainState that collapsed, for a caller that wants to look at it


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
      f"samples' MS-SSIM {signals['ms_ssim']:.3f} exceeds real "
      f"{signals['ms_ssim_real']:.3f} by {gap:.3f}"
    )
  if signals["duplicate_rate"] > config.max_duplicate_rate:
    reasons.append(f"{signals['duplicate_rate']:.0%} of samples are near duplicates")
  if signals.get("ndb_fraction", 0) > config.max_ndb_fraction:
    reasons.append(
      f"{signals['ndb_fraction']:.0%} of the real images' {config.ndb_bins} layout bins hold "
      "significantly more or fewer samples than real images"
    )
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


def verdict_of(metrics: Mapping[str, Any] | None) -> str:
  """The verdict a checkpoint's metrics record; unjudged when they record none."""
  index = (metrics or {}).get(VERDICT_METRIC)
  return UNJUDGED if index is None else VERDICTS[int(index)]


def is_healthy(metrics: Mapping[str, Any] | None) -> bool:
  """Whether a checkpoint's metrics carry a healthy verdict."""
  return verdict_of(metrics) == HEALTHY
