"""The synthetic faces: 1000 equally likely labelled modes, deterministic per (seed, index)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from gan.data import synthetic_faces

PALETTES = {
  "hair": synthetic_faces.HAIR_COLOURS,
  "eyes": synthetic_faces.EYE_COLOURS,
  "background": synthetic_faces.BACKGROUND_COLOURS,
}


def test_render_gives_uint8_images_and_int32_labels():
  images, labels = synthetic_faces.render(5, 24, seed=0)
  assert images.shape == (5, 24, 24, 3) and images.dtype == np.uint8
  assert labels.shape == (5,) and labels.dtype == np.int32
  assert ((labels >= 0) & (labels < synthetic_faces.NUM_MODES)).all()


def test_a_prefix_of_the_dataset_is_the_smaller_dataset():
  big_images, big_labels = synthetic_faces.render(300, 16, seed=3)  # more than one chunk
  images, labels = synthetic_faces.render(10, 16, seed=3)
  np.testing.assert_array_equal(big_images[:10], images)
  np.testing.assert_array_equal(big_labels[:10], labels)


@settings(max_examples=10, deadline=None)
@given(indices=st.lists(st.integers(0, 10**9), min_size=1, max_size=5), seed=st.integers(0, 2**40))
def test_each_image_depends_only_on_seed_and_index(indices, seed):
  images, labels = synthetic_faces.render_indices(indices, 16, seed)
  for i, index in enumerate(indices):
    alone_images, alone_labels = synthetic_faces.render_indices([index], 16, seed)
    np.testing.assert_array_equal(images[i], alone_images[0])
    assert labels[i] == alone_labels[0]


def test_different_seeds_draw_different_datasets():
  images_a, labels_a = synthetic_faces.render(20, 16, seed=0)
  images_b, labels_b = synthetic_faces.render(20, 16, seed=1)
  assert not np.array_equal(labels_a, labels_b)
  assert not np.array_equal(images_a, images_b)


def test_all_modes_appear_and_are_equally_likely():
  _, labels = synthetic_faces.render(20_000, 4, seed=0)
  counts = np.bincount(labels, minlength=synthetic_faces.NUM_MODES)
  assert synthetic_faces.NUM_MODES == 1000 and len(counts) == 1000
  assert (counts > 0).all()
  assert stats.chisquare(counts).pvalue > 1e-3


def test_attributes_are_independent_and_uniform():
  _, labels = synthetic_faces.render(20_000, 4, seed=1)
  hair, eyes, background = synthetic_faces.attributes(labels)
  table = np.zeros((10, 10))
  np.add.at(table, (hair, eyes), 1)
  assert stats.chi2_contingency(table).pvalue > 1e-3
  for attribute in (hair, eyes, background):
    assert stats.chisquare(np.bincount(attribute, minlength=10)).pvalue > 1e-3


def test_mode_label_and_attributes_are_inverse():
  labels = np.arange(synthetic_faces.NUM_MODES)
  np.testing.assert_array_equal(
    synthetic_faces.mode_label(*synthetic_faces.attributes(labels)), labels
  )
  assert synthetic_faces.mode_label(hair=3, eyes=4, background=5) == 345


@pytest.mark.parametrize("name", PALETTES)
def test_palettes_have_ten_well_separated_colours(name):
  palette = PALETTES[name].astype(float)
  assert palette.shape == (10, 3)
  distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
  assert min(distances) > 70


def test_the_corner_shows_the_background_colour_of_the_label():
  images, labels = synthetic_faces.render(200, 32, seed=0)
  _, _, background = synthetic_faces.attributes(labels)
  np.testing.assert_array_equal(images[:, 0, 0], synthetic_faces.BACKGROUND_COLOURS[background])


def test_every_image_shows_skin():
  images, _ = synthetic_faces.render(500, 32, seed=0)
  red, green, blue = np.moveaxis(images.astype(float), -1, 0)
  red = np.maximum(red, 1)
  # The skin tones are jittered multiples of one beige; no palette colour has its proportions.
  skin = (red > 170) & (np.abs(green / red - 0.86) < 0.05) & (np.abs(blue / red - 0.74) < 0.06)
  assert skin.mean(axis=(1, 2)).min() > 0.02
