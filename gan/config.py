"""Every check of a run's config, in one place, before any work starts.

`validate(config)` raises a UserError naming the first field that cannot work, and returns the
config the run will record: the same values with `model.conv_impl`'s `auto` resolved to the
implementation that will run, so that config.json says which one computed the run's numbers.
"""

import math
import os
from collections.abc import Sequence

import ml_collections
from absl import logging

from gan import losses, models
from gan.data import pipeline
from gan.errors import UserError
from gan.metrics import quality
from gan.models import augment

PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
_POSITIVE = (
  "train.batch_size",
  "train.num_steps",
  "train.d_steps",
  "train.log_every",
  "checkpoint.every",
  "checkpoint.keep_latest",
  "eval.every",
  "eval.grid_size",
  "model.latent_dim",
)


def _get(config: ml_collections.ConfigDict, dotted: str):
  section, _, name = dotted.rpartition(".")
  node = config[section] if section else config
  if name not in node:
    raise UserError(f"the config has no {dotted}, which this run needs")
  return node[name]


def _integer(config, dotted: str, minimum: int):
  value = _get(config, dotted)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    bound = "positive" if minimum == 1 else f">= {minimum}"
    raise UserError(f"{dotted} must be {bound} (an integer), got {value!r}")
  return value


def _number(config, dotted: str, low: float, high: float, *, open_low=False, open_high=True):
  """A finite number in the interval [low, high) (ends open or closed as asked)."""
  value = _get(config, dotted)
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise UserError(f"{dotted} must be a finite number, got {value!r}")
  above = value > low if open_low else value >= low
  below = value < high if open_high else value <= high
  if not (above and below):
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    raise UserError(f"{dotted} must be in {bounds}, got {value!r}")
  return value


def _choice(config, dotted: str, choices: Sequence[str]) -> str:
  value = _get(config, dotted)
  if value not in choices:
    raise UserError(f"unknown {dotted} {value!r}; choose one of {', '.join(choices)}")
  return value


def _boolean(config, dotted: str) -> bool:
  value = _get(config, dotted)
  if not isinstance(value, bool):
    raise UserError(f"{dotted} must be True or False, got {value!r}")
  return value


def _check_model(config) -> None:
  name = _choice(config, "model.name", models.MODEL_NAMES)
  _choice(config, "model.dtype", tuple(models.DTYPES))
  _choice(config, "model.conv_impl", models.CONV_IMPLS)
  _boolean(config, "model.d_spectral_norm")
  _boolean(config, "model.d_minibatch_std")
  _integer(config, "model.d_pack", 1)
  resolution = _integer(config, "data.resolution", 1)
  if name == "dcgan":
    _integer(config, "model.base_width", 1)
    _choice(config, "model.d_norm", models.DCGAN_D_NORMS)
    if resolution < 16 or resolution & (resolution - 1):
      raise UserError(
        f"dcgan cannot make {resolution} px images: it doubles 4x4 up, so data.resolution must "
        "be a power of two >= 16 (e.g. 32, 64, 128)"
      )
    return
  if resolution < 8:
    raise UserError(f"dense cannot make {resolution} px images: data.resolution must be >= 8")
  for widths in ("model.g_widths", "model.d_widths"):
    value = _get(config, widths)
    if (
      not isinstance(value, Sequence)
      or not value
      or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in value)
    ):
      raise UserError(f"{widths} must be a non-empty tuple of positive integers, got {value!r}")
  _choice(config, "model.activation", models.ACTIVATIONS)
  _choice(config, "model.g_norm", models.G_NORMS)
  _choice(config, "model.d_norm", models.D_NORMS)
  _number(config, "model.d_dropout", 0, 1)


def _check_train(config) -> None:
  for dotted in _POSITIVE:
    _integer(config, dotted, 1)
  _choice(config, "train.loss", losses.NAMES)
  _choice(config, "train.prng_impl", PRNG_IMPLS)
  _integer(config, "train.seed", 0)
  _number(config, "train.ema_kimg", 0, math.inf)
  _number(config, "train.ema_rampup", 0, math.inf)
  for rate in ("train.g_lr", "train.d_lr"):
    _number(config, rate, 0, math.inf, open_low=True)
  for beta in ("train.b1", "train.b2"):
    _number(config, beta, 0, 1)
  _check_regularizers(config)


def _check_regularizers(config) -> None:
  _number(config, "train.r1_gamma", 0, math.inf)
  _integer(config, "train.r1_every", 1)
  _number(config, "train.gp_gamma", 0, math.inf)
  policy = _get(config, "train.diffaugment")
  if not isinstance(policy, str):
    raise UserError(
      f"train.diffaugment must be a string such as 'color,translation', got {policy!r}"
    )
  names = augment.parse(policy)
  for name in names:
    if name not in augment.NAMES:
      raise UserError(
        f"unknown train.diffaugment transform {name!r}; choose from {', '.join(augment.NAMES)}"
      )
  if len(set(names)) < len(names):
    raise UserError(f"train.diffaugment names a transform twice: {policy!r}")
  batch, pack = config.train.batch_size, config.model.d_pack
  if batch % pack:
    raise UserError(f"train.batch_size ({batch}) must be a multiple of model.d_pack ({pack})")
  if config.train.loss != "wgan_gp":
    return
  if config.train.gp_gamma <= 0:
    raise UserError("train.loss=wgan_gp needs train.gp_gamma > 0 (the paper's is 10)")
  if config.model.get("d_norm") == "batch":
    raise UserError(
      "train.loss=wgan_gp penalises each sample's gradient, which BatchNorm mixes across the "
      "batch: set model.d_norm=layer (as the WGAN-GP paper) or none"
    )


def _needs_second_derivatives(config) -> bool:
  """Whether D's loss differentiates D's gradient (R1, WGAN-GP), which the CPU kernels cannot."""
  return config.train.r1_gamma > 0 or config.train.loss == "wgan_gp"


def _resolve_conv_impl(config) -> str:
  needs_second_derivatives = _needs_second_derivatives(config)
  if needs_second_derivatives and config.model.conv_impl == "onednn":
    raise UserError(
      "model.conv_impl=onednn cannot differentiate D's gradient, which train.r1_gamma > 0 and "
      "train.loss=wgan_gp need: use model.conv_impl=xla or auto"
    )
  conv_impl = models.resolve_conv_impl(config.model.conv_impl, config.model.dtype)
  if conv_impl != "onednn" or not needs_second_derivatives:
    return conv_impl
  logging.info("model.conv_impl=auto: xla, since the gradient penalty differentiates twice.")
  return "xla"


def _check_evaluation(config) -> None:
  _integer(config, "checkpoint.keep_every", 0)
  _choice(config, "checkpoint.best_mode", ("min", "max"))
  _choice(config, "checkpoint.best_generator", ("ema", "raw"))
  if config.checkpoint.best_generator == "raw" and config.train.ema_kimg == 0:
    raise UserError(
      "checkpoint.best_generator raw needs an EMA beside the raw weights, and train.ema_kimg 0 "
      "keeps none: its one generator is scored as ema; choose that"
    )
  if config.checkpoint.every % config.eval.every:
    raise UserError(
      f"checkpoint.every ({config.checkpoint.every}) must be a multiple of eval.every "
      f"({config.eval.every}), so that every checkpoint carries a fresh health verdict"
    )
  quality.check_names(config.eval.metrics)
  if "modes" in config.eval.metrics and config.data.source != "synthetic_faces":
    raise UserError(
      f"eval.metrics 'modes' counts the modes of synthetic_faces, which data.source "
      f"{config.data.source} does not have: leave it out"
    )
  names = quality.scalar_names(config.eval.metrics, config.data.resolution)
  best = config.checkpoint.best_metric
  if best and config.eval.metrics and best not in names:
    raise UserError(
      f"checkpoint.best_metric {best} is not among what eval.metrics "
      f"({', '.join(config.eval.metrics)}) gives: choose one of {', '.join(names)}, or '' for none"
    )
  if config.eval.metrics:
    _integer(config, "eval.num_samples", 2)


def _check_collapse(config) -> None:
  _integer(config, "collapse.num_samples", 2)
  _integer(config, "collapse.patience", 1)
  _integer(config, "collapse.num_pairs", 1)
  _integer(config, "collapse.warmup_steps", 0)
  _integer(config, "collapse.max_rollbacks", 0)
  _number(config, "collapse.lr_factor", 0, 1, open_low=True, open_high=False)
  for bound in ("collapse.max_ms_ssim_gap", "collapse.duplicate_distance"):
    _number(config, bound, 0, math.inf)
  _integer(config, "collapse.ndb_bins", 2)
  for rate in (
    "collapse.max_duplicate_rate",
    "collapse.min_mode_coverage",
    "collapse.max_ndb_fraction",
  ):
    _number(config, rate, 0, 1, open_high=False)
  if config.collapse.rollback_b1 is not None:
    _number(config, "collapse.rollback_b1", 0, 1)


def _check_data(config) -> None:
  source = _choice(config, "data.source", pipeline.SOURCES)
  if source == "synthetic_faces":
    _integer(config, "data.num_examples", 1)
    _integer(config, "data.seed", 0)
  _integer(config, "data.min_image_size", 1)


# The sections every recipe has (configs/default.py, and a model section of its own).
_SECTIONS = ("data", "model", "train", "checkpoint", "eval", "collapse", "mesh")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field a run reads; returns the config to run and record.

  Raises:
    UserError: naming the first field that cannot work, and why.
  """
  for section in _SECTIONS:
    if not isinstance(config.get(section), ml_collections.ConfigDict):
      raise UserError(
        f"the config has no {section} section: use a recipe such as configs/dcgan.py or "
        "configs/dense.py (configs/default.py only holds what they share)"
      )
  _check_data(config)
  _check_model(config)
  _check_train(config)
  _check_evaluation(config)
  _check_collapse(config)
  if config.restore_step is not None:
    _integer(config, "restore_step", 0)
  _integer(config, "mesh.data_axis_size", 0)
  resolved = config.copy_and_resolve_references()
  resolved.data.path = os.path.expanduser(config.data.path)  # `--config.data.path=~/...`
  resolved.model.conv_impl = _resolve_conv_impl(config)
  return resolved
