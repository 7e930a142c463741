"""Quality metrics during training and in scripts/evaluate.py, the best-checkpoint policy."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from conftest import run_script, tiny_config
from inception_layout import random_state_dict
from PIL import Image
from torch_files import write_pth

from configs import default
from gan import checkpointing, trainer
from gan import config as config_lib
from gan import state as state_lib
from gan.data import synthetic_faces
from gan.errors import UserError
from gan.metrics import inception, quality, random_vgg

pytestmark = pytest.mark.xdist_group("test_evaluate")  # its tests share runs: one worker


@pytest.fixture(scope="session")  # once per worker, however the tests interleave
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config("dense", train__num_steps=4)
  config.eval.num_samples = 16
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_every_checkpoint_stores_the_quality_metrics(run):
  ckpt = checkpointing.Checkpointer(os.path.join(run, "checkpoints"))
  for step in ckpt.all_steps():
    metrics = ckpt.metrics(step)
    assert "eval/swd_mean" in metrics and metrics["eval/swd_mean"] > 0, step
    assert metrics["eval_raw/swd_mean"] > 0, step  # the raw generator's, beside the EMA's
    assert "eval/precision" not in metrics  # no Inception metric by default


def test_policy_keeps_the_best_checkpoint_by_the_chosen_metric(tmp_path):
  config = tiny_config("dense")
  config.checkpoint.keep_latest = 1
  _, state = state_lib.create_train_state(config)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
  for step, swd in [(2, 50.0), (4, 10.0), (6, 30.0), (8, 40.0)]:
    ckpt.save(step, state, {"eval/swd_mean": swd})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8]


@pytest.mark.slow
def test_evaluate_prints_the_weight_free_metrics_as_json_for_either_generator(run):
  scores = {}
  for generator in ("ema", "raw"):
    result = run_script(
      "evaluate.py",
      f"--workdir={run}",
      "--num_samples=16",
      *(["--generator=raw"] if generator == "raw" else []),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scores[generator] = json.loads(result.stdout)
    assert scores[generator]["generator"] == generator
    assert scores[generator]["step"] == 4 and scores[generator]["num_samples"] == 16
    assert scores[generator]["swd_mean"] > 0 and "recall" not in scores[generator]
  assert scores["ema"]["swd_mean"] != scores["raw"]["swd_mean"]  # the same noise, other weights


@pytest.mark.slow
def test_evaluate_asked_for_fid_without_weights_says_where_to_get_them(run, tmp_path):
  result = run_script(
    "evaluate.py",
    f"--workdir={run}",
    "--metrics=fid",
    "--num_samples=16",
    env={"GAN_INCEPTION_WEIGHTS": str(tmp_path / "missing.pth")},
  )
  assert result.returncode == 2
  assert inception.WEIGHTS_URL in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_prints_fid_and_kid_with_the_weights_file_present(run, tmp_path):
  # Random weights in pytorch-fid's layout: real numbers out, comparable with nothing.
  weights = tmp_path / "weights.pth"
  write_pth(weights, random_state_dict())
  env = {"GAN_INCEPTION_WEIGHTS": str(weights), "HOME": str(tmp_path / "home")}
  args = ("evaluate.py", f"--workdir={run}", "--metrics=fid,kid", "--num_samples=16")
  result = run_script(*args, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads(result.stdout)
  assert scores["fid"] > 0 and np.isfinite(scores["kid"]) and scores["kid_std"] >= 0
  cache = tmp_path / "home" / ".cache" / "gan" / "reference_features"
  assert len(os.listdir(cache)) == 1  # the real images' features, for both


@pytest.mark.slow
def test_evaluate_scores_every_checkpoint_and_both_generators_as_single_calls_do(run):
  result = run_script(
    "evaluate.py", f"--workdir={run}", "--step=all", "--generator=ema,raw", "--num_samples=16"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert [(r["step"], r["generator"]) for r in lines] == [
    (2, "ema"),
    (2, "raw"),
    (4, "ema"),
    (4, "raw"),
  ]
  # The same real images, noise and metric randomness for each: a single call agrees exactly.
  single = run_script(
    "evaluate.py", f"--workdir={run}", "--step=2", "--generator=raw", "--num_samples=16"
  )
  assert single.returncode == 0, single.stderr[-2000:]
  assert json.loads(single.stdout) == lines[1]
  assert lines[0]["swd_mean"] != lines[2]["swd_mean"]  # other weights, other scores


@pytest.mark.slow
@pytest.mark.parametrize(
  "flag, says",
  [
    ("--step=3", "saved steps: 2, 4"),
    ("--step=2,3", "no checkpoint at step 3"),
    ("--step=last", "--step takes checkpoint steps (N or N,M,...) or all"),
    ("--generator=emma", "--generator takes ema, raw or ema,raw"),
  ],
)
def test_evaluate_a_step_or_generator_it_cannot_have_is_one_line(run, flag, says):
  result = run_script("evaluate.py", f"--workdir={run}", flag)
  assert result.returncode == 2
  assert says in result.stderr.strip().splitlines()[-1]
  assert result.stdout == ""  # nothing evaluated before the error


def _faces(first: int, num: int) -> np.ndarray:
  images, _ = synthetic_faces.render_indices(np.arange(first, first + num), 32, seed=0)
  return images.astype(np.float32) / 127.5 - 1


@pytest.mark.slow
def test_the_default_metrics_rate_grey_noise_and_one_repeated_face_below_real_faces():
  metrics = default.get_config().eval.metrics
  assert not quality.INCEPTION_METRICS & set(metrics)  # no weights, no download, by default
  real, held_out = _faces(0, 256), _faces(10_000, 256)
  grey_noise = np.clip(0.1 * np.random.default_rng(0).normal(size=real.shape), -1, 1)
  repeated = np.repeat(held_out[:1], 256, axis=0)
  evaluate = quality.Evaluator(metrics, real, key=jax.random.key(0), reference="unused")
  real_swd = evaluate(held_out)["swd_mean"]
  assert evaluate(grey_noise)["swd_mean"] > 3 * real_swd
  assert evaluate(repeated)["swd_mean"] > 3 * real_swd


def _fake_inception(monkeypatch, calls: list) -> None:
  """Stands in for the Inception network: 4x4 average-pooled pixels as 48-d "features"."""

  def load_inception(path):
    del path

    def features(images):
      calls.append(len(images))
      n, h, w, c = images.shape
      return images.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)

    return features

  monkeypatch.setattr(inception, "resolve_weights", lambda path=None: ("w.pth", "ab" * 32))
  monkeypatch.setattr(inception, "load_inception", load_inception)


def test_inception_metrics_share_one_cached_file_of_the_real_features(tmp_path, monkeypatch):
  calls = []
  _fake_inception(monkeypatch, calls)
  real, fake = _faces(0, 32), _faces(100, 24)
  names = ("fid", "kid", "precision_recall", "density_coverage")

  def evaluator():
    return quality.Evaluator(
      names, real, key=jax.random.key(0), reference="faces_train_32px_32", cache_dir=str(tmp_path)
    )

  scores = evaluator()(fake)
  assert set(scores) == {"fid", "kid", "kid_std", "precision", "recall", "density", "coverage"}
  assert calls == [32, 24]  # the real images once, then the samples
  assert os.listdir(tmp_path) == ["faces_train_32px_32_inception-abababab.npz"]
  assert evaluator()(fake) == scores
  assert calls == [32, 24, 24]  # the second evaluator read the real features from the cache


def test_inception_metrics_without_weights_are_skipped_or_an_error_when_required(monkeypatch):
  def no_weights(path=None):
    raise UserError("no weights here")

  monkeypatch.setattr(inception, "resolve_weights", no_weights)
  real = _faces(0, 16)
  kwargs = dict(key=jax.random.key(0), reference="r")
  evaluator = quality.Evaluator(("swd", "fid", "precision_recall"), real, **kwargs)
  assert evaluator.metrics == ("swd",)
  with pytest.raises(UserError, match="no weights here"):
    quality.Evaluator(("fid",), real, require_inception=True, **kwargs)


def test_random_vgg_metrics_need_no_weights_and_cache_their_own_real_features(
  tmp_path, monkeypatch
):
  def no_weights(path=None):
    raise UserError("no weights here")

  monkeypatch.setattr(inception, "resolve_weights", no_weights)
  real, fake = _faces(0, 32), _faces(100, 24)
  names = ("precision_recall_rvgg", "density_coverage_rvgg")

  def evaluator():
    return quality.Evaluator(
      names, real, key=jax.random.key(0), reference="faces_train_32px_32", cache_dir=str(tmp_path)
    )

  scores = evaluator()(fake)
  assert set(scores) == set(quality.scalar_names(names, 32))
  assert set(scores) == {"precision_rvgg", "recall_rvgg", "density_rvgg", "coverage_rvgg"}
  assert os.listdir(tmp_path) == [f"faces_train_32px_32_rvgg-{random_vgg.SEED}.npz"]
  assert evaluator()(fake) == scores


def test_the_reference_key_tells_datasets_apart():
  data = tiny_config("dense").data
  key = quality.reference_key(data, 1000)
  assert key.startswith("synthetic_faces-") and key.endswith("_train_32px_1000")
  assert quality.reference_key(data.copy_and_resolve_references(), 1000) == key
  other = data.copy_and_resolve_references()
  other.seed += 1  # another synthetic dataset
  assert quality.reference_key(other, 1000) != key
  folder = data.copy_and_resolve_references()
  folder.source, folder.path = "image_folder", "/data/a"
  elsewhere = folder.copy_and_resolve_references()
  elsewhere.path = "/data/b"
  assert quality.reference_key(folder, 1000) != quality.reference_key(elsewhere, 1000)


@pytest.mark.slow
def test_compare_fid_without_pytorch_fid_says_what_to_install(tmp_path):
  if importlib.util.find_spec("pytorch_fid") is not None:
    pytest.skip("pytorch-fid is installed: the check would run for real")
  result = run_script("compare_fid.py", f"--real={tmp_path}", f"--fake={tmp_path}")
  assert result.returncode == 2
  assert "pip install torch torchvision pytorch-fid" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_counts_the_modes_of_a_synthetic_run_and_of_as_many_real_images(run):
  result = run_script("evaluate.py", f"--workdir={run}", "--metrics=modes", "--num_samples=1000")
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads(result.stdout)
  assert scores["num_samples"] == 1000
  # tiny_config's 128 images hold at most 128 modes, each about equally often.
  assert 90 <= scores["modes_covered_real"] <= 128
  assert scores["kl_uniform_real"] == pytest.approx(np.log(1000 / 128), abs=0.3)
  assert 1 <= scores["modes_covered"] <= 1000 and 0 <= scores["kl_uniform"] <= np.log(1000)


def test_the_modes_metric_reads_the_classifier_on_both_sets():
  real = _faces(0, 400)
  evaluator = quality.Evaluator(["modes"], real, key=None, reference="unused")
  one_face = evaluator(np.repeat(real[:1], 400, axis=0))
  assert one_face["modes_covered"] == 1 and one_face["kl_uniform"] == pytest.approx(np.log(1000))
  varied = evaluator(_faces(400, 400))
  assert varied["modes_covered"] > 250 and varied["modes_covered_real"] > 250


def test_the_modes_metric_needs_synthetic_faces():
  config = tiny_config("dense")
  config.data.source, config.data.path = "image_folder", "/nowhere"
  config.eval.metrics = ("modes",)
  with pytest.raises(UserError, match="synthetic_faces"):
    config_lib.validate(config)


def _write_solid_images(folder, colours):
  folder.mkdir()
  for i, colour in enumerate(colours):
    Image.new("RGB", (32, 32), colour).save(folder / f"{i:02d}.png")


@pytest.mark.slow
def test_evaluate_compares_with_a_held_out_folder_given_by_real_path(tmp_path):
  """The same samples score another SWD against other images, and the output names them."""
  _write_solid_images(tmp_path / "train", [(16 * i, 255 - 16 * i, 128) for i in range(16)])
  _write_solid_images(tmp_path / "held_out", [(0, 0, 0)] * 8 + [(255, 255, 255)] * 8)
  config = tiny_config("dense", train__num_steps=2)
  config.data.source, config.data.path = "image_folder", str(tmp_path / "train")
  config.eval.num_samples = 16
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  scores = {}
  for name in ("train", "held_out"):
    args = [] if name == "train" else [f"--real_path={tmp_path / name}"]
    result = run_script("evaluate.py", f"--workdir={workdir}", "--num_samples=16", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    scores[name] = json.loads(result.stdout)
    assert scores[name]["real"] == str(tmp_path / name)
  assert scores["train"]["swd_mean"] != scores["held_out"]["swd_mean"]

  missing = run_script("evaluate.py", f"--workdir={workdir}", f"--real_path={tmp_path / 'nowhere'}")
  last = missing.stderr.strip().splitlines()[-1]
  assert (
    missing.returncode == 2 and last == f"error: --real_path {tmp_path / 'nowhere'} does not exist"
  )


@pytest.mark.slow
def test_evaluate_refuses_a_real_path_for_synthetic_faces(run):
  result = run_script("evaluate.py", f"--workdir={run}", "--real_path=/tmp")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "--real_path needs a run on anime_faces or image_folder" in result.stderr.splitlines()[-1]
