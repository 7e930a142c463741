"""Draws samples from a trained run's EMA generator (or, with --generator=raw, its raw weights).

    python scripts/sample.py --workdir=runs/dcgan --out=grid.png [--num=64] [--truncation=1.5]
    python scripts/sample.py --workdir=runs/dcgan --out=samples/ --single
    python scripts/sample.py --workdir=runs/dcgan --out=walk.png --interpolate
    python scripts/sample.py --workdir=runs/dcgan --out=nearest.png --nearest --num=16

The default writes one grid PNG of --num samples. --single writes one PNG per sample into the
folder --out. --interpolate writes rows of 8-step spherical interpolations between random noise
vectors (ceil(--num / 8) rows) as a PNG strip, and the same as an animated GIF beside it.
--nearest writes each sample followed by its --k nearest training images (pixel L2 among
--nearest_pool of them, as stored; for a run trained on random flips each also in its mirrored
form, shown in the nearer one): a generator that memorised its data shows copies.
"""

import math
import os

import numpy as np
from absl import flags

from gan import cli
from gan.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_OUT = flags.DEFINE_string("out", None, "The PNG to write (a folder with --single).", required=True)
_STEP = flags.DEFINE_integer("step", None, "The checkpoint to sample; the latest by default.")
_NUM = flags.DEFINE_integer("num", 64, "How many samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the noise.")
_TRUNCATION = flags.DEFINE_float(
  "truncation", None, "Resample noise values beyond +-T (the truncation trick); unset or 0: none."
)
_SINGLE = flags.DEFINE_bool("single", False, "One PNG per sample in the folder --out.")
_INTERPOLATE = flags.DEFINE_bool("interpolate", False, "Latent interpolations: PNG and GIF.")
_NEAREST = flags.DEFINE_bool("nearest", False, "Each sample beside its nearest training images.")
_K = flags.DEFINE_integer("k", 3, "--nearest: training images shown per sample.")
_NEAREST_POOL = flags.DEFINE_integer("nearest_pool", 2048, "--nearest: training images searched.")
_GENERATOR = flags.DEFINE_enum(
  "generator", "ema", ["ema", "raw"], "The EMA of G's weights (as training draws) or the raw ones."
)

# Columns of an interpolation strip, and frames of its GIF each way.
_STEPS = 8
# Samples normalise with their batch's BatchNorm statistics (gan.step.generate), which are
# meaningless for a handful of images; smaller requests are cut from a batch this big.
_MIN_BATCH = 64


def _validate() -> None:
  if _NUM.value < 1:
    raise UserError(f"--num must be at least 1, not {_NUM.value}")
  if _TRUNCATION.value is not None and _TRUNCATION.value < 0:
    raise UserError(f"--truncation must be positive (or 0 for none), not {_TRUNCATION.value}")
  if _K.value < 1:
    raise UserError(f"--k must be at least 1, not {_K.value}")
  if _NEAREST_POOL.value < _K.value:
    raise UserError(f"--nearest_pool ({_NEAREST_POOL.value}) must be at least --k ({_K.value})")
  modes = [
    name
    for name, flag in (("single", _SINGLE), ("interpolate", _INTERPOLATE), ("nearest", _NEAREST))
    if flag.value
  ]
  if len(modes) > 1:
    raise UserError(f"--{' and --'.join(modes)} exclude each other: pick one")


def _generate(nets, state, z: np.ndarray, key) -> np.ndarray:
  """Images for noise [N, D], in batches of at least _MIN_BATCH padded with fresh noise
  drawn from `key`."""
  from gan import inference, sampling

  num = z.shape[0]
  if num < _MIN_BATCH:
    pad = sampling.truncated_noise(key, _MIN_BATCH - num, z.shape[1], _TRUNCATION.value)
    z = np.concatenate([z, np.asarray(pad)])
  params = inference.generator_params(state, _GENERATOR.value)
  images = inference.sampler(nets)(params, state.g.batch_stats, z)
  return np.asarray(images[:num])


def _training_images(config, pool: int) -> np.ndarray:
  """`pool` training images as stored (not flipped), drawn as training draws them."""
  from gan.data import pipeline

  data = config.data.copy_and_resolve_references()
  data.random_flip = False
  size = min(pool, pipeline.num_examples(data))
  batches = pipeline.create_dataset(data, batch_size=size, seed=config.train.seed)
  return next(iter(batches))["image"]


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  _validate()
  # Imported here, not above: --help and flag errors answer before JAX and TensorFlow load.
  import jax

  from gan import inference, sampling

  config, nets, state = inference.load_run(_WORKDIR.value, _STEP.value)
  key, pad_key = (
    jax.random.key(seed, impl=config.train.prng_impl) for seed in (_SEED.value, _SEED.value + 1)
  )
  out = _OUT.value

  if _INTERPOLATE.value:
    rows = math.ceil(_NUM.value / _STEPS)
    ends = sampling.truncated_noise(key, 2 * rows, nets.latent_dim, _TRUNCATION.value)
    z = sampling.interpolate(ends[:rows], ends[rows:], _STEPS)  # [rows, steps, D]
    images = _generate(nets, state, np.asarray(z).reshape(rows * _STEPS, -1), pad_key)
    images = images.reshape(rows, _STEPS, *images.shape[1:])
    sampling.save_png(out, sampling.make_grid(images.reshape(-1, *images.shape[2:]), cols=_STEPS))
    # Frame t shows every row's t-th step; forward then back, so the loop has no jump.
    order = [*range(_STEPS), *range(_STEPS - 2, 0, -1)]
    frames = np.stack([sampling.make_grid(images[:, t], cols=1) for t in order])
    gif = os.path.splitext(out)[0] + ".gif"
    sampling.save_gif(gif, frames, duration_ms=150)
    print(f"wrote {rows} interpolations of {_STEPS} steps to {out} and {gif}")
    return

  z = np.asarray(sampling.truncated_noise(key, _NUM.value, nets.latent_dim, _TRUNCATION.value))
  images = _generate(nets, state, z, pad_key)
  if _SINGLE.value:
    for i, image in enumerate(sampling.to_uint8(images)):
      sampling.save_png(os.path.join(out, f"sample_{i:05d}.png"), image)
    print(f"wrote {len(images)} samples to {out}/")
  elif _NEAREST.value:
    pool = _training_images(config, _NEAREST_POOL.value)
    if pool.shape[0] < _K.value:
      raise UserError(f"--k={_K.value} is more than the {pool.shape[0]} training images")
    nearest = sampling.nearest_images(images, pool, _K.value, mirrored=config.data.random_flip)
    rows = [
      np.concatenate([image[None], found]) for image, found in zip(images, nearest, strict=True)
    ]
    sampling.save_png(out, sampling.make_grid(np.concatenate(rows), cols=1 + _K.value))
    print(
      f"wrote {len(images)} samples, each beside its {_K.value} nearest of {len(pool)} "
      f"training images, to {out}"
    )
  else:
    sampling.save_png(out, sampling.make_grid(images))
    print(f"wrote a grid of {len(images)} samples to {out}")


if __name__ == "__main__":
  cli.run(main)
