"""The random-VGG embedding: fixed weights, its shapes, and recall/coverage that see a collapse
on images no network has been trained on."""

import numpy as np
import pytest

from gan.data import synthetic_faces
from gan.metrics import precision_recall, random_vgg


def _faces(first: int, num: int, resolution: int = 32) -> np.ndarray:
  images, _ = synthetic_faces.render_indices(np.arange(first, first + num), resolution, seed=0)
  return images.astype(np.float32) / 127.5 - 1


@pytest.fixture(scope="module")
def embed():
  return random_vgg.load_random_vgg(batch_size=16)


def test_the_weights_are_numpys_fixed_stream_with_torchvisions_vgg_init():
  weights = random_vgg.random_weights()
  rng = np.random.RandomState(random_vgg.SEED)
  first = rng.standard_normal((3, 3, 3, 64)) * np.sqrt(2 / (3 * 3 * 64))
  np.testing.assert_allclose(weights["convs"][0], first, rtol=1e-6)
  assert [k.shape[-1] for k in weights["convs"]] == [64, 64, 128, 128] + [256] * 3 + [512] * 6
  assert [d.shape for d in weights["dense"]] == [(2 * 2 * 512, 4096), (4096, random_vgg.FEATURES)]
  for a, b in zip(weights["convs"], random_vgg.random_weights()["convs"], strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("resolution", [32, 64])
def test_any_resolution_gives_64_features_however_the_images_are_batched(embed, resolution):
  images = _faces(0, 20, resolution)
  features = embed(images)
  assert features.shape == (20, random_vgg.FEATURES) and np.isfinite(features).all()
  assert features.std() > 0
  one_by_one = np.concatenate([embed(images[i : i + 1]) for i in range(3)])
  np.testing.assert_allclose(one_by_one, features[:3], rtol=1e-4, atol=1e-6)


def test_images_that_are_not_rgb_batches_are_refused(embed):
  with pytest.raises(ValueError, match=r"expected images \[N, H, W, 3\]"):
    embed(np.zeros((4, 32, 32), np.float32))


@pytest.mark.slow
def test_recall_and_coverage_fall_to_zero_for_a_collapse_and_stay_high_for_other_faces(embed):
  real = embed(_faces(0, 256))

  def scores(images):
    fake = embed(images)
    return {
      **precision_recall.precision_recall(real, fake),
      **precision_recall.density_coverage(real, fake),
    }

  held_out = _faces(10_000, 256)
  varied = scores(held_out)
  assert varied["recall"] > 0.8 and varied["coverage"] > 0.8 and varied["precision"] > 0.8
  for collapsed in (np.repeat(held_out[:1], 256, axis=0), np.concatenate([held_out[:4]] * 64)):
    found = scores(collapsed)
    assert found["recall"] < 0.05 and found["coverage"] < 0.1
  grey_noise = np.clip(0.1 * np.random.default_rng(0).normal(size=held_out.shape), -1, 1)
  noise = scores(grey_noise.astype(np.float32))
  assert noise["precision"] < 0.05 and noise["density"] < 0.05
