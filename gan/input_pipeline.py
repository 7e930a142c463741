"""The input pipeline: a data config in, an endless deterministic iterator of numpy batches out.

    source -> decode -> centre crop -> resize -> [cache] -> per epoch: shuffle -> random flip
           -> batch -> scale to [-1, 1] -> prefetch -> numpy

Sources: `synthetic_faces` (drawn on the fly), `anime_faces` (the TFDS builder) and
`image_folder`. Files are checked once before training (bad ones are skipped and counted), so a
file can only fail to decode mid-epoch if it changed since; such a file is dropped with a warning.

The batch sequence is a pure function of (data config, batch size, seed). Each epoch is the same
ordered source, shuffled with a seed drawn statelessly from (seed, epoch) and flipped with seeds
from (seed, epoch, position), and the epochs follow one another without a seam. So resuming at
`start_step` starts from the right epoch without touching the earlier ones, and skips only the
examples of that epoch that were already used.
"""

import contextlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from gan.datasets import image_folder, synthetic_faces
from gan.errors import UserError

# TensorFlow only feeds data; the accelerators belong to JAX. (RuntimeError: TensorFlow's
# devices were already initialised by whoever imported it first.)
with contextlib.suppress(RuntimeError):
  tf.config.set_visible_devices([], "GPU")

SOURCES = ("synthetic_faces", "anime_faces", "image_folder")
_RENDER_CHUNK = 1024  # synthetic faces drawn per call into numpy


def num_examples(data_config) -> int:
  """How many examples one epoch has: the source's size after skipping bad files."""
  _, size = _source(data_config)
  return size


def create_dataset(
  data_config, *, batch_size: int, seed: int, start_step: int = 0, rows: slice | None = None
) -> Iterator[dict[str, np.ndarray]]:
  """An endless iterator of training batches.

  Args:
    data_config: the config's `data` section.
    batch_size: examples per (global) batch.
    seed: the training seed; it alone (with the config) decides the order and the flips.
    start_step: yield the batches from this one on, as an uninterrupted iterator would.
    rows: yield only these rows of each batch: a process's share of the global batch when
      several processes train together. The batches are the same whatever the process count.

  Returns:
    An iterator of {'image': float32 [B, R, R, 3] in [-1, 1], 'label': int32 [B]}; the label is
    the synthetic_faces mode (0..999), -1 for the other sources.

  Raises:
    UserError: for a bad data config, missing or unreadable data, or a batch larger than it.
  """
  examples, size = _source(data_config)
  if batch_size > size:
    raise UserError(
      f"batch size {batch_size} is larger than the {size:,} images of data.source "
      f"{data_config.source}: lower --config.train.batch_size or use more images"
    )
  if data_config.cache:
    examples = examples.cache()
  buffer_size = max(1, min(int(data_config.shuffle_buffer), size))
  random_flip = bool(data_config.random_flip)

  def epoch(index):
    shuffle_seed, flip_seed = tf.unstack(
      tf.random.stateless_uniform(
        [2], seed=tf.stack([tf.constant(seed, tf.int64), index]), minval=None, dtype=tf.int64
      )
    )
    # tf.data pairs the op seed with the graph-level seed, which a tf.random.set_seed anywhere
    # in the process would set; clear it in this function's own graph so only our seeds count.
    tf.compat.v1.get_default_graph().seed = None
    shuffled = examples.shuffle(buffer_size, seed=shuffle_seed, reshuffle_each_iteration=False)
    if not random_flip:
      return shuffled

    def flip(position, example):
      image = tf.image.stateless_random_flip_left_right(
        example["image"], seed=tf.stack([flip_seed, position])
      )
      return {"image": image, "label": example["label"]}

    return shuffled.enumerate().map(flip, num_parallel_calls=tf.data.AUTOTUNE)

  first_epoch, offset = divmod(start_step * batch_size, size)
  batches = (
    tf.data.Dataset.counter(first_epoch)
    .flat_map(epoch)
    .skip(offset)
    .batch(batch_size, drop_remainder=True)
  )
  if rows is not None:
    batches = batches.map(lambda batch: {k: v[rows.start : rows.stop] for k, v in batch.items()})
  batches = batches.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return batches.with_options(options).as_numpy_iterator()


def _to_float(batch):
  return {"image": tf.cast(batch["image"], tf.float32) / 127.5 - 1.0, "label": batch["label"]}


def _source(data_config) -> tuple[tf.data.Dataset, int]:
  """One epoch of {"image": uint8 [R, R, 3], "label": int32} in a fixed order, and its size."""
  source = data_config.source
  resolution = int(data_config.resolution)
  if resolution < 1:
    raise UserError(f"data.resolution must be a positive number of pixels, not {resolution}")
  if source == "synthetic_faces":
    return _synthetic_faces(int(data_config.num_examples), resolution, int(data_config.seed))
  if source == "image_folder":
    index = image_folder.index_folder(data_config.path, int(data_config.min_image_size))
    paths = tf.data.Dataset.from_tensor_slices(list(index.paths)).map(lambda path: (path, ""))
    return _decoded(paths, resolution, read=True), len(index.paths)
  if source == "anime_faces":
    # Imported here: TFDS takes seconds to import and only this source needs it.
    from gan.datasets import anime_faces

    builder = anime_faces.prepare(data_config.path, data_config.tfds_data_dir)
    encoded, size = anime_faces.encoded_images(builder, int(data_config.min_image_size))
    files = encoded.map(lambda example: (example["file_name"], example["image"]))
    return _decoded(files, resolution, read=False), size
  raise UserError(f"unknown data.source {source!r}: use one of {', '.join(SOURCES)}")


def _synthetic_faces(num: int, resolution: int, seed: int) -> tuple[tf.data.Dataset, int]:
  if num < 1:
    raise UserError(f"data.num_examples must be at least 1 for synthetic_faces, not {num}")

  def render(indices):
    images, labels = tf.numpy_function(
      lambda i: synthetic_faces.render_indices(i, resolution, seed),
      [indices],
      [tf.uint8, tf.int32],
      stateful=False,
    )
    images.set_shape([None, resolution, resolution, 3])
    labels.set_shape([None])
    return {"image": images, "label": labels}

  examples = tf.data.Dataset.range(num).batch(_RENDER_CHUNK).map(render).unbatch()
  return examples, num


def _decoded(files: tf.data.Dataset, resolution: int, *, read: bool) -> tf.data.Dataset:
  """Decodes (name, bytes) pairs, or reads named files if `read`, to uint8 squares labelled -1.

  Decoding is PIL through tf.numpy_function, in parallel with the order kept.
  """

  def decode(name, data):
    try:
      if read:
        with open(name, "rb") as f:
          data = f.read()
      return image_folder.decode(data, resolution), True
    except Exception as e:  # noqa: BLE001 -- a file that changed or vanished since it was checked
      logging.warning("dropping %s: it no longer decodes (%s)", name.decode(errors="replace"), e)
      return np.zeros((resolution, resolution, 3), np.uint8), False

  def decode_op(name, data):
    image, ok = tf.numpy_function(decode, [name, data], [tf.uint8, tf.bool], stateful=False)
    image.set_shape([resolution, resolution, 3])
    return {"image": image, "label": tf.constant(-1, tf.int32)}, ok

  return (
    files.map(decode_op, num_parallel_calls=tf.data.AUTOTUNE)
    .filter(lambda _, ok: ok)
    .map(lambda example, _: example)
  )
