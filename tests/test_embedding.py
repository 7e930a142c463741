"""Batched embedding: every image once, in order, through one batch shape."""

import numpy as np
import pytest

from gan.metrics import embedding


def _recording_forward(shapes):
  def forward(batch):
    shapes.append(batch.shape)
    return batch.reshape(batch.shape[0], -1)[:, :2] * 10  # two features per image

  return forward


def test_every_image_once_in_order_through_one_shape():
  images = np.arange(7 * 2 * 2 * 3, dtype=np.float32).reshape(7, 2, 2, 3)
  shapes = []
  features = embedding.in_batches(_recording_forward(shapes), images, batch_size=3, dim=2)
  assert features.dtype == np.float32
  np.testing.assert_array_equal(features, images.reshape(7, -1)[:, :2] * 10)
  assert shapes == [(3, 2, 2, 3)] * 3  # the last batch of one is padded to three


def test_fewer_images_than_a_batch_make_one_call_of_their_own_size():
  shapes = []
  features = embedding.in_batches(_recording_forward(shapes), np.ones((2, 2, 2, 3)), 50, dim=2)
  assert features.shape == (2, 2) and shapes == [(2, 2, 2, 3)]


def test_no_images_give_no_features_and_no_call():
  shapes = []
  features = embedding.in_batches(_recording_forward(shapes), np.ones((0, 2, 2, 3)), 4, dim=5)
  assert features.shape == (0, 5) and shapes == []


@pytest.mark.parametrize("shape", [(4, 2, 2), (4, 2, 2, 1)])
def test_images_of_the_wrong_shape_are_refused(shape):
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    embedding.in_batches(_recording_forward([]), np.ones(shape), 4, dim=2)
