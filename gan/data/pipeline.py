"""The input pipeline: a data config in, an endless deterministic iterator of numpy batches out.

    per epoch: shuffled positions -> batch -> [this process's rows]
      -> load: decode -> centre crop -> resize (or the cache) -> random flip -> scale to [-1, 1]
      -> prefetch -> numpy

Sources: `synthetic_faces` (drawn on the fly), `anime_faces` (the TFDS builder) and
`image_folder`. Each is read by position, so an epoch is a permutation of positions and only the
examples of the batches asked for are ever decoded: the first batch needs its own images, not a
shuffle buffer's worth, and resuming skips positions, not decoded images. Decoded images are kept
in memory (`data.cache`), so each is decoded at most once per process. Files are checked once
before training (bad ones are skipped and counted), so a file can only fail to decode mid-run if
it changed since; such a file is replaced in its batch by another image of that batch, with a
warning.

The batch sequence is a pure function of (data config, batch size, seed). Epoch e is the
permutation of positions drawn statelessly from (seed, e), with flips drawn from the same pair,
and the epochs follow one another without a seam, so resuming at `start_step` starts from the
right epoch and position without touching the earlier ones.
"""

import contextlib
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from gan.data import image_folder, synthetic_faces
from gan.errors import UserError

SOURCES = ("synthetic_faces", "anime_faces", "image_folder")

# (positions int64 [n]) -> (images uint8 [n, R, R, 3], labels int32 [n], decoded bool [n])
Loader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def num_examples(data_config) -> int:
  """How many examples one epoch has: the source's size after skipping bad files."""
  return _source(data_config)[1]


def create_dataset(
  data_config, *, batch_size: int, seed: int, start_step: int = 0, rows: slice | None = None
) -> "Batches":
  """`Source(data_config).batches(...)`: one pipeline of a source opened for it alone."""
  return Source(data_config).batches(
    batch_size=batch_size, seed=seed, start_step=start_step, rows=rows
  )


class Source:
  """A data source opened once (files indexed and checked), with the cache of what it decoded:
  every pipeline made from it (after a rollback, for evaluation) decodes nothing twice.

  Attributes:
    size: the examples of one epoch.
    skipped_files: (path, reason) of each file the source skipped (image_folder only).
  """

  def __init__(self, data_config):
    """Raises UserError for a bad data config or missing or unreadable data."""
    self.config = data_config
    load, self.size, self.skipped_files = _source(data_config)
    self._load = _Cache(load, self.size).load if data_config.cache else load

  def batches(
    self, *, batch_size: int, seed: int, start_step: int = 0, rows: slice | None = None
  ) -> "Batches":
    """An endless iterator of training batches.

    Args:
      batch_size: examples per (global) batch.
      seed: the training seed; it alone (with the config) decides the order and the flips.
      start_step: yield the batches from this one on, as an uninterrupted iterator would.
      rows: yield only these rows of each batch: a process's share of the global batch when
        several processes train together. The batches are the same whatever the process count,
        and a process loads only the images of its own rows.

    Returns:
      An iterator of {'image': float32 [B, R, R, 3] in [-1, 1], 'label': int32 [B]}; the label
      is the synthetic_faces mode (0..999), -1 for the other sources.

    Raises:
      UserError: for a batch larger than the source.
    """
    data_config, load, size = self.config, self._load, self.size
    _hide_gpus_from_tensorflow()
    if batch_size > size:
      raise UserError(
        f"batch size {batch_size} is larger than the {size:,} images of data.source "
        f"{data_config.source}: lower --config.train.batch_size or use more images"
      )
    resolution = int(data_config.resolution)
    random_flip = bool(data_config.random_flip)

    def epoch(index):
      order_seed, flip_seed = tf.unstack(
        tf.random.stateless_uniform(
          [2, 2], seed=tf.stack([tf.constant(seed, tf.int64), index]), minval=None, dtype=tf.int64
        )
      )
      order = tf.random.experimental.stateless_shuffle(tf.range(size, dtype=tf.int64), order_seed)
      flips = tf.random.stateless_uniform([size], seed=flip_seed) < 0.5
      return tf.data.Dataset.from_tensor_slices((order, flips & random_flip))

    def load_batch(positions, flips):
      images, labels = tf.numpy_function(
        lambda p: _whole_batch(load, p), [positions], [tf.uint8, tf.int32], stateful=False
      )
      images.set_shape([None, resolution, resolution, 3])
      labels.set_shape([None])
      images = tf.where(flips[:, None, None, None], tf.reverse(images, axis=[2]), images)
      return {"image": tf.cast(images, tf.float32) / 127.5 - 1.0, "label": labels}

    first_epoch, offset = divmod(start_step * batch_size, size)
    positions = (
      tf.data.Dataset.counter(first_epoch)
      .flat_map(epoch)
      .skip(offset)
      .batch(batch_size, drop_remainder=True)
    )
    if rows is not None:
      positions = positions.map(lambda order, flips: (order[rows], flips[rows]))
    batches = positions.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return Batches(batches.prefetch(tf.data.AUTOTUNE).with_options(options))


def _hide_gpus_from_tensorflow() -> None:
  """TensorFlow only feeds data; the accelerators belong to JAX. (RuntimeError: TensorFlow's
  devices were initialised already, by whoever used them first.)"""
  with contextlib.suppress(RuntimeError):
    tf.config.set_visible_devices([], "GPU")


class Batches(Iterator[dict[str, np.ndarray]]):
  """A tf.data pipeline's batches as numpy, closed at the latest when the interpreter exits.

  A UserError raised in a loader, which tf.data hands on wrapped in an UnknownError with its
  traceback, is raised again as itself. Closing stops the pipeline's threads. Left open, a
  pipeline still loading a batch would be destroyed while the interpreter shuts down, where the
  loader can never get the GIL back and the process hangs: so a finaliser closes it at exit.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = [dataset.as_numpy_iterator()]  # emptied to close
    weakref.finalize(self, self._iterator.clear)

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._iterator:
      raise StopIteration
    try:
      return next(self._iterator[0])
    except tf.errors.UnknownError as e:
      found = re.search(r"^gan\.errors\.UserError: (.*)$", e.message, re.MULTILINE)
      if found is None:
        raise
      raise UserError(found.group(1)) from None

  def close(self) -> None:
    self._iterator.clear()


def _whole_batch(load: Loader, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Loads a batch; an image that no longer decodes is replaced by the first one that does."""
  images, labels, decoded = load(positions)
  if not decoded.all():
    if not decoded.any():
      raise UserError(
        f"none of the {len(positions)} images of a batch decodes any more: "
        "the data changed since training started"
      )
    first = np.argmax(decoded)
    images[~decoded], labels[~decoded] = images[first], labels[first]
  return images, labels


class _Cache:
  """Keeps what a loader decoded, so each position is decoded at most once. Threads may load
  batches at the same time: at worst two decode the same position and store the same image."""

  def __init__(self, load: Loader, size: int):
    self._load = load
    self._size = size
    self._images = None
    self._labels = np.empty((size,), np.int32)
    self._stored = np.zeros((size,), bool)
    self._lock = threading.Lock()

  def load(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = np.unique(positions[~self._stored[positions]])
    if len(missing):
      images, labels, ok = self._load(missing)
      with self._lock:
        if self._images is None:
          self._images = np.empty((self._size, *images.shape[1:]), np.uint8)
      self._images[missing[ok]], self._labels[missing[ok]] = images[ok], labels[ok]
      self._stored[missing[ok]] = True
    # What no longer decodes stays out of the cache, so it is tried again next time.
    return self._images[positions], self._labels[positions], self._stored[positions]


def _source(data_config) -> tuple[Loader, int, tuple[tuple[str, str], ...]]:
  """The source's loader by position, its size (after skipping bad files) and the files it
  skipped, as (path, reason)."""
  source = data_config.source
  resolution = int(data_config.resolution)
  if resolution < 1:
    raise UserError(f"data.resolution must be a positive number of pixels, not {resolution}")
  if source == "synthetic_faces":
    num, seed = int(data_config.num_examples), int(data_config.seed)
    if num < 1:
      raise UserError(f"data.num_examples must be at least 1 for synthetic_faces, not {num}")

    def render(positions):
      images, labels = synthetic_faces.render_indices(positions, resolution, seed)
      return images, labels, np.ones(len(positions), bool)

    return render, num, ()
  if source == "image_folder":
    index = image_folder.index_folder(data_config.path, int(data_config.min_image_size))
    return _file_loader(index.paths, None, resolution), len(index.paths), index.skipped_files
  if source == "anime_faces":
    # Imported here: TFDS takes seconds to import and only this source needs it.
    from gan.data import anime_faces

    builder = anime_faces.prepare(data_config.path, data_config.tfds_data_dir)
    min_image_size = int(data_config.min_image_size)
    names, contents = anime_faces.stored_images(builder, min_image_size)
    return _file_loader(names, contents, resolution), len(names), ()
  raise UserError(f"unknown data.source {source!r}: use one of {', '.join(SOURCES)}")


def _file_loader(names: Sequence[str], contents: Sequence[bytes] | None, resolution: int) -> Loader:
  """Decodes the files at the given positions: `contents[i]` if given, else the file names[i].

  One batch decodes in one thread; tf.data loads several batches at a time, and PIL releases the
  GIL while it decodes.
  """

  def decode(position):
    try:
      if contents is not None:
        return image_folder.decode(contents[position], resolution)
      with open(names[position], "rb") as f:
        return image_folder.decode(f.read(), resolution)
    except Exception as e:  # noqa: BLE001 -- a file that changed or vanished since it was checked
      logging.warning(
        "%s no longer decodes (%s); another image of its batch stands in", names[position], e
      )
      return None

  def load(positions):
    decoded = [decode(position) for position in positions]
    ok = np.array([image is not None for image in decoded])
    images = np.zeros((len(positions), resolution, resolution, 3), np.uint8)
    for i in np.flatnonzero(ok):
      images[i] = decoded[i]
    return images, np.full(len(positions), -1, np.int32), ok

  return load
