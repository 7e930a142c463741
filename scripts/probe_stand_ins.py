"""How the health probe judges stand-ins for a generator built from real images: its margins.

    python scripts/probe_stand_ins.py --config=configs/dcgan.py:cpu \
        --config.data.source=image_folder --config.data.path=tune --faces_path=unseen

The probe's reference is `collapse.num_samples` images of the config's dataset, as in training.
The stand-ins for the samples are as many other faces (from --faces_path, a folder of the same
kind, or else another draw of the same dataset): as they are (a varied generator), blurred (a
young one), recoloured, and reduced to k distinct faces repeated to fill the batch, as they are
and recoloured (a generator drawing k layouts, or k layouts in many colours). Each stand-in is
measured by the probe itself and judged by the config's bounds as one evaluation past the warm-up
(healthy or suspect; `collapse.patience` suspect ones in a row make a collapse). Repeated over
--draws draws of both sets; prints a Markdown table of the ranges and the verdicts.
"""

import collections

from absl import flags
from ml_collections import config_flags

from gan import cli
from gan.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "The config whose data, probe and bounds are used.", lock_config=True
)
_FACES_PATH = flags.DEFINE_string(
  "faces_path",
  None,
  "The images the stand-ins are made of (a data.path of the config's data.source, e.g. a "
  "held-out split); default: another draw of the config's dataset.",
)
_DRAWS = flags.DEFINE_integer("draws", 5, "Draws of the reference and the faces.", lower_bound=1)
_LAYOUTS = flags.DEFINE_list(
  "layouts", ["1", "2", "4", "8", "16", "32", "64"], "The numbers of distinct faces k."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the draws, recolourings and MS-SSIM pairs.")
flags.mark_flags_as_required(["config"])

# Recolouring: each image's channels scaled and shifted at random, in [-1, 1] units.
_GAIN = (0.4, 1.0)
_OFFSET = (-0.4, 0.4)


def _stand_ins(faces, layouts, resolution: int, rng) -> dict:
  """name -> images [N, R, R, 3] in [-1, 1], made from `faces` [N, R, R, 3]."""
  import numpy as np
  import scipy.ndimage

  num = len(faces)

  def recoloured(images):
    gain = rng.uniform(*_GAIN, (len(images), 1, 1, 3))
    offset = rng.uniform(*_OFFSET, (len(images), 1, 1, 3))
    return np.clip(images * gain + offset, -1, 1)

  sigma = resolution / 32  # 2 px at 64 px
  made = {
    "distinct faces": faces,
    f"blurred (sigma {sigma:g} px)": np.stack(
      [scipy.ndimage.gaussian_filter(x, (sigma, sigma, 0)) for x in faces]
    ),
    "recoloured": recoloured(faces),
  }
  for k in layouts:
    repeated = np.resize(faces[:k], faces.shape)  # faces 0..k-1, over and over
    name = f"{k} face{'s' if k > 1 else ''} x {num // k}"
    made[name] = repeated
    made[f"{name}, recoloured"] = recoloured(repeated)
  return made


def _first_batch(data_config, num: int, seed: int):
  import numpy as np

  from gan.data import pipeline

  source = pipeline.Source(data_config)
  if source.size < num:
    raise UserError(
      f"{data_config.path or data_config.source} holds {source.size} images; the probe compares "
      f"{num} (collapse.num_samples)"
    )
  return np.asarray(next(source.batches(batch_size=num, seed=seed))["image"])


def _span(values, fmt: str) -> str:
  def text(value: float) -> str:
    shown = fmt.format(value)
    return shown.lstrip("-") if float(shown.rstrip("%")) == 0 else shown  # no "-0.00"

  low, high = text(min(values)), text(max(values))
  return low if low == high else f"{low} to {high}"


def main(argv):
  del argv
  # Imported here, not above: --help and flag errors answer before JAX and TensorFlow load.
  import jax
  import numpy as np

  from gan.health import signals, verdict

  config = _CONFIG.value
  layouts = [int(k) for k in _LAYOUTS.value]
  num = config.collapse.num_samples
  if any(k < 1 or k >= num for k in layouts):
    raise UserError(f"--layouts must lie in 1..{num - 1} (collapse.num_samples is {num})")
  faces_config = config.data.copy_and_resolve_references()
  if _FACES_PATH.value is not None:
    if config.data.source == "synthetic_faces":
      raise UserError("--faces_path needs data.source anime_faces or image_folder")
    faces_config.path = _FACES_PATH.value
  rows = collections.defaultdict(list)
  real_ms_ssim = []
  for draw in range(_DRAWS.value):
    seed = _SEED.value + draw
    real = _first_batch(config.data, num, seed)
    # Another order of the same dataset where no other folder is given.
    faces = _first_batch(faces_config, num, seed if _FACES_PATH.value else seed + 10_000)
    key = jax.random.key(seed, impl=config.train.prng_impl)
    probe = signals.HealthProbe(config, real, noise=None, generate=None, key=key)
    real_ms_ssim.append(probe.reference["ms_ssim_real"])
    made = _stand_ins(faces, layouts, config.data.resolution, np.random.default_rng(seed))
    for name, images in made.items():
      measured = probe.measure(images)
      judged = verdict.judge(measured, config.collapse, streak=0, step=config.collapse.warmup_steps)
      rows[name].append((measured, judged.verdict))
  print(f"Real images' MS-SSIM: {_span(real_ms_ssim, '{:.3f}')}, over {_DRAWS.value} draws")
  print("\n| stand-in | MS-SSIM gap | near duplicates | NDB fraction | verdicts |")
  print("|---|---|---|---|---|")
  for name, results in rows.items():
    measured = [m for m, _ in results]
    verdicts = collections.Counter(v for _, v in results)
    print(
      f"| {name} | {_span([m['ms_ssim'] - m['ms_ssim_real'] for m in measured], '{:.2f}')} "
      f"| {_span([100 * m['duplicate_rate'] for m in measured], '{:.0f}%')} "
      f"| {_span([m['ndb_fraction'] for m in measured], '{:.2f}')} "
      f"| {', '.join(f'{n} {v}' for v, n in verdicts.items())} |"
    )


if __name__ == "__main__":
  cli.run(main)
