"""Scores a trained run's samples against real images and prints the metrics as JSON.

    python scripts/evaluate.py --workdir=runs/dcgan [--step=N] [--metrics=swd,fid,kid]

Generates --num_samples images from the EMA generator of the chosen checkpoint (the latest by
default; --generator=raw for its raw weights) and compares them with as many training images, or
with the images at --real_path (a held-out split of the same kind of data). It prints one JSON
object per line: one per checkpoint and generator, with --step=N,M,... or --step=all (every saved
checkpoint, oldest first) and --generator=ema,raw; the real images, their features and the noise
are the same for all of them. fid, kid, precision_recall and density_coverage need pytorch-fid's
Inception weights, downloaded into ~/.cache/gan on first use (see README); swd and the `_rvgg` pair
need nothing. When the weights cannot be had, metrics asked for with --metrics are an error of one
line; metrics taken from the run's eval.metrics are skipped with a warning.

    python scripts/evaluate.py --workdir=runs/dcgan --real_path=held_out --step=all \
        --metrics=swd,precision_recall_rvgg --generator=ema,raw

scores both generators of every checkpoint against a held-out folder by SWD and by precision and
recall on the random-VGG embedding: the run's quality over training time.

    python scripts/evaluate.py --workdir=runs/dcgan_synthetic --metrics=modes

counts the modes of a synthetic_faces run as PacGAN counts Stacked-MNIST's: 26,000 samples by
default, and as many real images, each read by the project's mode classifier.
"""

import json
import os

from absl import flags, logging

from gan import cli
from gan.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_STEP = flags.DEFINE_list(
  "step", None, "The checkpoint(s) to evaluate: N, N,M,... or all; the latest by default."
)
flags.register_validator(
  "step",
  lambda steps: steps is None or steps == ["all"] or all(s.isdigit() for s in steps),
  "--step takes checkpoint steps (N or N,M,...) or all",
)
_METRICS = flags.DEFINE_list(
  "metrics", None, "Metrics to compute; the run's eval.metrics by default."
)
_NUM_SAMPLES = flags.DEFINE_integer(
  "num_samples", None, "Images per set; the run's by default (26,000 for --metrics=modes)."
)
_MODES_SAMPLES = 26_000  # PacGAN's protocol for counting Stacked-MNIST's 1,000 modes
_GENERATOR = flags.DEFINE_list(
  "generator", ["ema"], "ema (the EMA of G's weights, what samples show), raw, or both: ema,raw."
)
flags.register_validator(
  "generator",
  lambda names: bool(names) and set(names) <= {"ema", "raw"},
  "--generator takes ema, raw or ema,raw",
)
_REAL_PATH = flags.DEFINE_string(
  "real_path",
  None,
  "Compare with the images here (a data.path of the run's data.source, e.g. a held-out split) "
  "instead of the run's own.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generator noise and the metrics' randomness.")


def main(argv):
  del argv
  # Imported here, not above: --help and flag errors answer before JAX and TensorFlow load.
  import jax
  import numpy as np

  from gan import inference
  from gan.data import pipeline
  from gan.metrics import quality

  if _REAL_PATH.value is not None and not os.path.exists(_REAL_PATH.value):
    raise UserError(f"--real_path {_REAL_PATH.value} does not exist")
  steps = [None]  # the latest
  if _STEP.value:
    wanted = None if _STEP.value == ["all"] else [int(s) for s in _STEP.value]
    steps = inference.checkpoint_steps(_WORKDIR.value, wanted)
  config, nets, state = inference.load_run(_WORKDIR.value, steps[0])
  metrics = _METRICS.value or list(config.eval.metrics) or ["swd"]
  if "modes" in metrics and config.data.source != "synthetic_faces":
    raise UserError(f"--metrics=modes needs a synthetic_faces run, not {config.data.source}")
  if _REAL_PATH.value is not None:
    if config.data.source == "synthetic_faces":
      raise UserError("--real_path needs a run on anime_faces or image_folder, not synthetic_faces")
    config.data.path = _REAL_PATH.value
  modes_only = _METRICS.value == ["modes"]
  num = _NUM_SAMPLES.value or (_MODES_SAMPLES if modes_only else config.eval.num_samples)
  source = pipeline.Source(config.data)
  batch = min(num, source.size)  # more images than the dataset has: several epochs' worth
  batches = source.batches(batch_size=batch, seed=config.train.seed)
  real = np.concatenate([next(batches)["image"] for _ in range(-(-num // batch))])[:num]
  key = jax.random.key(_SEED.value, impl=config.train.prng_impl)
  evaluator = quality.Evaluator(
    metrics,
    real,
    key=key,
    reference=quality.reference_key(config.data, num),
    inception_weights=config.eval.inception_weights,
    require_inception=_METRICS.value is not None,
  )
  noise = inference.noise(key, num, nets.latent_dim)
  sample_fn = inference.sampler(nets)  # compiled once: every checkpoint has the same networks
  real_name = config.data.path if config.data.source != "synthetic_faces" else "synthetic_faces"
  for step in steps:
    if step != steps[0]:
      _, _, state = inference.load_run(_WORKDIR.value, step)
    for generator in dict.fromkeys(_GENERATOR.value):
      params = inference.generator_params(state, generator)
      fake = inference.generate_many(sample_fn, params, state.g.batch_stats, noise)
      results = {
        "step": int(state.step),
        "num_samples": num,
        "generator": generator,
        "real": real_name,
        **evaluator(fake),
      }
      logging.info("Evaluated %s: %s", os.path.abspath(_WORKDIR.value), results)
      print(json.dumps(results, sort_keys=True), flush=True)


if __name__ == "__main__":
  cli.run(main)
