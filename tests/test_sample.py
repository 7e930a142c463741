"""scripts/sample.py on a tiny trained run, and the pure sampling helpers behind it."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from gan import inference, sampling, trainer

pytestmark = pytest.mark.xdist_group("test_sample")  # its tests share runs: one worker

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "sample.py")
RESOLUTION = 32  # the smoke configs' image size
PADDING = 2  # make_grid's default


# Each script run: its flags beside --workdir and --out (a path under the run's tmp folder).
_RUNS = {
  "grid": ["--out=grid.png", "--num=9", "--truncation=1.5"],
  "single": ["--out=samples", "--num=5", "--single"],
  "single_raw": ["--out=samples_raw", "--num=5", "--single", "--generator=raw"],
  "interpolate": ["--out=walk.png", "--num=16", "--interpolate"],
  "nearest": ["--out=nearest.png", "--num=4", "--nearest", "--k=2"],
  "no_workdir": ["--out=x.png", "--workdir=/nonexistent/run"],
  "unknown_step": ["--out=x.png", "--step=999"],
  "bad_num": ["--out=x.png", "--num=0"],
}


@pytest.fixture(scope="session")  # once per worker, however the tests interleave
def runs(tmp_path_factory):
  """Trains a two-step dense run once, then runs every case of the script on it side by side.

  Each run spends most of its seconds importing TensorFlow and JAX; in parallel the module stays
  well under a minute.
  """
  folder = tmp_path_factory.mktemp("sample")
  workdir = str(folder / "run")
  # A fast learning rate and an EMA with no warm-up: after two steps the raw weights have moved
  # visibly from their EMA, which has barely left the initial weights.
  config = tiny_config("dense", train__num_steps=2, train__g_lr=0.02, train__ema_rampup=0.0)
  trainer.train_and_evaluate(config, workdir)
  processes = {}
  for name, args in _RUNS.items():
    args = [a.replace("--out=", f"--out={folder}/") for a in args]
    if not any(a.startswith("--workdir=") for a in args):
      args.append(f"--workdir={workdir}")
    processes[name] = subprocess.Popen(
      [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
  results = {}
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=300)
    results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
  return folder, results


def _grid_side(count: int) -> int:
  return count * (RESOLUTION + PADDING) + PADDING


def _ok(runs, name: str):
  folder, results = runs
  assert results[name].returncode == 0, results[name].stderr
  return folder


@pytest.mark.slow
def test_writes_a_grid_of_num_samples(runs):
  folder = _ok(runs, "grid")
  assert Image.open(folder / "grid.png").size == (_grid_side(3), _grid_side(3))


@pytest.mark.slow
def test_single_writes_one_png_per_sample(runs):
  out = _ok(runs, "single") / "samples"
  files = sorted(os.listdir(out))
  assert len(files) == 5
  assert Image.open(out / files[0]).size == (RESOLUTION, RESOLUTION)


def _pngs(folder) -> np.ndarray:
  return np.stack([np.asarray(Image.open(folder / f)) for f in sorted(os.listdir(folder))])


@pytest.mark.slow
def test_generator_raw_draws_the_raw_weights(runs):
  """The same noise through the run's raw weights, computed here, gives --generator=raw's PNGs
  (the script pads a request below 64 samples to 64 with noise from --seed + 1)."""
  folder = _ok(runs, "single_raw")
  _ok(runs, "single")
  config, nets, state = inference.load_run(str(folder / "run"))
  impl = config.train.prng_impl
  z = sampling.truncated_noise(jax.random.key(0, impl=impl), 5, nets.latent_dim, None)
  pad = sampling.truncated_noise(jax.random.key(1, impl=impl), 64 - 5, nets.latent_dim, None)
  z = np.concatenate([z, pad])
  draw = inference.sampler(nets)
  raw = sampling.to_uint8(np.asarray(draw(state.g.params, state.g.batch_stats, z))[:5])
  ema = sampling.to_uint8(np.asarray(draw(state.ema, state.g.batch_stats, z))[:5])
  written_raw, written_ema = _pngs(folder / "samples_raw"), _pngs(folder / "samples")
  assert np.abs(raw.astype(int) - ema.astype(int)).max() > 8  # the two generators differ
  np.testing.assert_allclose(written_raw, raw, atol=1)
  np.testing.assert_allclose(written_ema, ema, atol=1)


@pytest.mark.slow
def test_interpolate_writes_a_strip_and_an_animated_gif(runs):
  folder = _ok(runs, "interpolate")
  assert Image.open(folder / "walk.png").size == (_grid_side(8), _grid_side(2))
  gif = Image.open(folder / "walk.gif")
  assert gif.n_frames > 4
  assert gif.size == (_grid_side(1), _grid_side(2))


@pytest.mark.slow
def test_nearest_writes_samples_beside_training_images(runs):
  folder = _ok(runs, "nearest")
  assert Image.open(folder / "nearest.png").size == (_grid_side(3), _grid_side(4))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["no_workdir", "unknown_step", "bad_num"])
def test_user_mistakes_are_one_line(runs, name):
  result = runs[1][name]
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.parametrize("truncation", [0.5, 1.0, 2.0])
def test_truncated_noise_stays_within_the_bound(truncation):
  z = sampling.truncated_noise(jax.random.key(0), 256, 32, truncation)
  assert z.shape == (256, 32)
  assert float(jnp.max(jnp.abs(z))) <= truncation
  # Resampled, not clipped: no pile-up at the bound.
  assert float(jnp.mean(jnp.abs(z) > 0.999 * truncation)) < 0.01


def test_no_truncation_is_plain_normal():
  key = jax.random.key(0)
  for none in (None, 0):
    z = sampling.truncated_noise(key, 8, 4, none)
    np.testing.assert_array_equal(z, jax.random.normal(key, (8, 4)))


@pytest.mark.slow
def test_interpolate_hits_both_endpoints_and_keeps_norms():
  z0, z1 = jax.random.normal(jax.random.key(1), (2, 3, 128))
  path = sampling.interpolate(z0, z1, 8)
  assert path.shape == (3, 8, 128)
  np.testing.assert_array_equal(path[:, 0], z0)
  np.testing.assert_array_equal(path[:, -1], z1)
  norms = jnp.linalg.norm(path, axis=-1)
  ends = jnp.stack([norms[:, 0], norms[:, -1]])
  # Near-orthogonal vectors of similar norm: slerp stays on (about) their sphere, where a
  # straight line's midpoint would shrink by about 1/sqrt(2).
  assert float(jnp.min(norms)) > 0.95 * float(jnp.min(ends))
  assert float(jnp.max(norms)) < 1.05 * float(jnp.max(ends))


def test_interpolate_between_parallel_vectors_is_finite():
  z = jnp.ones((4,))
  path = sampling.interpolate(z, 2 * z, 5)
  assert bool(jnp.all(jnp.isfinite(path)))
  np.testing.assert_allclose(path[:, 0], np.linspace(1, 2, 5), rtol=1e-6)


def test_nearest_neighbours_match_brute_force():
  rng = np.random.default_rng(0)
  samples = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
  candidates = rng.uniform(-1, 1, (40, 4, 4, 3)).astype(np.float32)
  found = sampling.nearest_neighbours(samples, candidates, 3)
  dists = ((samples[:, None] - candidates[None]) ** 2).sum(axis=(2, 3, 4))
  np.testing.assert_array_equal(found, np.argsort(dists, axis=1)[:, :3])


def test_nearest_neighbour_of_a_candidate_is_itself():
  candidates = np.random.default_rng(1).uniform(-1, 1, (10, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(
    sampling.nearest_neighbours(candidates, candidates, 1)[:, 0], range(10)
  )


def test_nearest_images_find_mirrored_copies_in_their_mirrored_form_and_each_image_once():
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (12, 6, 6, 3)).astype(np.float32)
  images[5] = images[5, :, ::-1] * 0.999  # all but symmetric: both forms of it are near a copy
  copies = np.stack([images[3, :, ::-1], images[5]])  # a mirrored copy, a (near) symmetric one

  found = sampling.nearest_images(copies, images, 3, mirrored=True)
  assert found.shape == (2, 3, 6, 6, 3)
  np.testing.assert_array_equal(found[0, 0], images[3, :, ::-1])  # shown as it was copied
  np.testing.assert_array_equal(found[1, 0], images[5])
  for row in found:  # three different training images, not one image in both forms
    originals = {
      i for f in row for i in range(12) if (f == images[i]).all() or (f == images[i, :, ::-1]).all()
    }
    assert len(originals) == 3

  # Without flips in training only the images as stored count, nearest first.
  plain = sampling.nearest_images(copies, images, 2, mirrored=False)
  distances = ((copies[:, None] - images[None]) ** 2).sum(axis=(2, 3, 4))
  np.testing.assert_array_equal(plain, images[np.argsort(distances, axis=1)[:, :2]])


def test_save_gif_round_trips_frames(tmp_path):
  frames = np.stack([np.full((6, 6, 3), 40 * i, np.uint8) for i in range(4)])
  path = str(tmp_path / "a.gif")
  sampling.save_gif(path, frames, duration_ms=50)
  gif = Image.open(path)
  assert gif.n_frames == 4
  gif.seek(2)
  assert np.asarray(gif.convert("RGB"))[0, 0, 0] == pytest.approx(80, abs=2)


def test_make_grid_with_fixed_columns():
  grid = sampling.make_grid(np.zeros((6, 4, 4, 3)), cols=3)
  assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
