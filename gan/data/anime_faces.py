"""The Kaggle "animefacedataset" as a TFDS dataset, prepared from the user's download.

63,565 JPEG face crops of about 90-120 px (splcher, scraped from getchu.com), laid out as
`images/<id>_<year>.jpg`. The builder reads them from `data.path`, which is one of three: the
downloaded `archive.zip` itself, a folder holding it (any *.zip there holding `images/...`) or
its unpacked `images/` folder (itself, or a folder holding it). Preparing checks every file once,
skips and counts the bad ones, and writes TFRecords into `data.tfds_data_dir`; after that the
download is no longer needed. The prepared dataset remembers its download (file names and
sizes): a data.path naming another one is an error, never the old images in its place.

Stored images: the original JPEG bytes whenever the file is already an RGB or grayscale JPEG
(as the Kaggle crops are): no second lossy encoding, the smallest files, and the fastest
preparation. Anything else (a CMYK JPEG, a PNG named .jpg, ...) is converted to RGB and
re-encoded as JPEG at quality 95, so every stored image is a JPEG that TensorFlow decodes too.
"""

import collections
import dataclasses
import hashlib
import io
import itertools
import os
import time
import zipfile
from collections.abc import Iterator
from concurrent import futures

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from gan.data import image_folder
from gan.errors import UserError

KAGGLE_URL = "https://www.kaggle.com/datasets/splcher/animefacedataset"
_IMAGES_DIR = "images"
_CHUNK = 512  # files checked together in the thread pool
_JPEG_QUALITY = 95


class AnimeFaces(tfds.core.GeneratorBasedBuilder):
  """Anime face crops from the Kaggle "animefacedataset" (splcher)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original JPEGs kept; bad files skipped and counted."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Download the Kaggle dataset "splcher/animefacedataset" from {KAGGLE_URL}
  (the "Download" button gives archive.zip, about 400 MB; or
  `kaggle datasets download -d splcher/animefacedataset`) and put archive.zip into the manual
  dir (data.path). Unzipping it there instead, so that the dir holds images/<id>_<year>.jpg,
  works too.
  """
  # The builder downloads nothing, so it has no checksums file beside its code. Saying so also
  # keeps TFDS 4.9.10 from importing `importlib_resources`, a dependency it forgot to declare
  # (tensorflow/datasets#11212).
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Anime face crops (about 90-120 px) from the Kaggle animefacedataset.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "file_name": tfds.features.Text(),
        }
      ),
      homepage=KAGGLE_URL,
      metadata=tfds.core.MetadataDict(),
    )

  # What data.path named, when it is not the manual dir itself (a zip, an images/ folder).
  source_path: str | None = None

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(self.source_path or str(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir):
    start = time.time()
    files = find_files(manual_dir)
    contents = files.contents()
    skipped = collections.Counter()
    with futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
      # Chunks keep the order and bound the memory; the checks run in parallel.
      for chunk_start in range(0, len(files.names), _CHUNK):
        names = files.names[chunk_start : chunk_start + _CHUNK]
        datas = list(itertools.islice(contents, len(names)))
        for name, (image, reason) in zip(names, pool.map(_stored_image, datas), strict=True):
          if reason:
            skipped[reason] += 1
          else:
            yield name, {"image": image, "file_name": name}
    self.info.metadata["skipped"] = dict(skipped)
    self.info.metadata["source"] = os.path.abspath(manual_dir)
    self.info.metadata["fingerprint"] = files.fingerprint()
    total = len(files.names)
    if skipped:
      logging.warning("anime_faces: %s", image_folder.skip_summary(skipped, total, manual_dir))
    logging.info("anime_faces: checked %d files in %.1f s", total, time.time() - start)


def _stored_image(data: bytes) -> tuple[bytes | None, str | None]:
  """(the bytes to store, None) for a good file; (None, reason) for a bad one."""
  reason = image_folder.skip_reason(data, min_image_size=1)
  if reason:
    return None, reason
  with Image.open(io.BytesIO(data)) as original:
    if original.format == "JPEG" and original.mode in ("RGB", "L"):
      return data, None
  rgb, _ = image_folder.load_rgb(data)
  buffer = io.BytesIO()
  rgb.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  return buffer.getvalue(), None


@dataclasses.dataclass(frozen=True)
class _Files:
  """The images found in a manual dir.

  Attributes:
    names: their paths below the images/ folder, sorted: the same for the zip and the unpacked
      folder, so both prepare the same dataset in the same order.
    paths: where to read each: a file path, or a member of `archive`.
    sizes: each file's size in bytes (unpacked).
    archive: the zip they are in, or None for an unpacked folder.
  """

  names: list[str]
  paths: list[str]
  sizes: list[int]
  archive: str | None = None

  def fingerprint(self) -> str:
    """A digest of the names and sizes: the same for a zip and its unpacked folder, different
    for another download (a subset, a resized copy)."""
    digest = hashlib.sha256()
    for name, size in zip(self.names, self.sizes, strict=True):
      digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()

  def contents(self) -> Iterator[bytes]:
    """The bytes of each file, in order."""
    if self.archive is None:
      for path in self.paths:
        with open(path, "rb") as f:
          yield f.read()
      return
    with zipfile.ZipFile(self.archive) as zf:
      for member in self.paths:
        yield zf.read(member)


def find_files(manual_dir: str) -> _Files:
  """The images `data.path` names: the images/ folder itself, else an images/ folder in it,
  else the zip it names, else the first zip in it holding images/.

  Raises:
    UserError: if none of these is there.
  """
  for folder in (manual_dir, os.path.join(manual_dir, _IMAGES_DIR)):
    is_images = os.path.basename(os.path.normpath(folder)) == _IMAGES_DIR
    if is_images and os.path.isdir(folder) and (paths := image_folder.find_images(folder)):
      names = [os.path.relpath(path, folder) for path in paths]
      return _Files(names, paths, [os.path.getsize(path) for path in paths])
  for archive in _zips(manual_dir):
    try:
      with zipfile.ZipFile(archive) as zf:
        members = sorted(
          (info.filename, info.file_size)
          for info in zf.infolist()
          if not info.is_dir()
          and f"/{info.filename}".rsplit("/", 2)[-2] == _IMAGES_DIR
          and os.path.splitext(info.filename)[1].lower() in image_folder.IMAGE_EXTENSIONS
        )
    except (zipfile.BadZipFile, OSError):
      continue
    if members:
      paths = [member for member, _ in members]
      names = [member.rsplit("/", 1)[-1] for member in paths]
      return _Files(names, paths, [size for _, size in members], archive)
  raise _missing_files_error(manual_dir)


def _zips(manual_dir: str) -> list[str]:
  """The zip files in the manual dir (or the manual dir itself, if it names a zip)."""
  if manual_dir.lower().endswith(".zip") and os.path.isfile(manual_dir):
    return [manual_dir]
  if not os.path.isdir(manual_dir):
    return []
  return sorted(
    os.path.join(manual_dir, name)
    for name in os.listdir(manual_dir)
    if name.lower().endswith(".zip")
  )


def _missing_files_error(manual_dir: str) -> UserError:
  where = f"data.path {manual_dir}" if manual_dir else "data.path (now empty)"
  return UserError(
    f"anime_faces files not found in {where}: it must be the Kaggle dataset's archive.zip "
    f'("splcher/animefacedataset", {KAGGLE_URL}), a folder holding it, or its unpacked images/ '
    "folder; set it with --config.data.path"
  )


def prepare(manual_dir: str, data_dir: str) -> AnimeFaces:
  """The prepared builder, preparing it from the manual dir first if needed.

  Args:
    manual_dir: data.path: archive.zip, a folder holding it, or the images/ folder; unused
      once prepared.
    data_dir: where TFDS keeps prepared datasets (data.tfds_data_dir); '' is TFDS's default.

  Raises:
    UserError: if the dataset is not prepared yet and the manual dir lacks the files.
  """
  builder = AnimeFaces(data_dir=data_dir or None)
  if builder.is_prepared():
    _check_source(builder, manual_dir)
    return builder
  if not manual_dir:
    raise _missing_files_error(manual_dir)
  find_files(manual_dir)  # fails early, in words, if the files are not there
  start = time.time()
  logging.info("anime_faces: preparing from %s into %s", manual_dir, builder.data_dir)
  # TFDS wants a folder as the manual dir: a zip's own folder stands in, and the builder reads
  # what data.path names.
  builder.source_path = manual_dir
  folder = manual_dir if os.path.isdir(manual_dir) else os.path.dirname(manual_dir)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(folder), try_download_gcs=False
    )
  )
  logging.info(
    "anime_faces: prepared %d images in %.1f s",
    builder.info.splits["train"].num_examples,
    time.time() - start,
  )
  return builder


def _check_source(builder: AnimeFaces, manual_dir: str) -> None:
  """Fails if data.path names another download than the one the builder was prepared from:
  the prepared images would silently stand in for it. An empty or vanished data.path is fine
  (the download is not needed once prepared)."""
  recorded = builder.info.metadata.get("fingerprint")
  if not manual_dir or recorded is None:  # None: prepared before sources were recorded
    return
  source = builder.info.metadata.get("source", "another download")
  try:
    files = find_files(manual_dir)
  except UserError:
    logging.warning(
      "anime_faces: data.path %s holds no images; using those prepared in %s from %s",
      manual_dir,
      builder.data_dir,
      source,
    )
    return
  if files.fingerprint() != recorded:
    raise UserError(
      f"anime_faces in {builder.data_dir} was prepared from {source}, and data.path "
      f"{manual_dir} holds other images ({len(files.names)} files): give this download its own "
      "--config.data.tfds_data_dir, or delete that folder to prepare it there instead"
    )


# The stored images per prepared dataset dir, read once per process: num_examples and
# create_dataset share them, and training reads them by position.
_stored: dict[str, tuple[list[str], list[bytes], np.ndarray]] = {}
_logged: set[str] = set()


def stored_images(builder: AnimeFaces, min_image_size: int) -> tuple[list[str], list[bytes]]:
  """The file names and JPEG bytes of the stored images at least `min_image_size` on both
  sides, in a fixed order."""
  key = os.fspath(builder.data_dir)
  if key not in _stored:
    examples = builder.as_dataset(
      split="train",
      shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False),
    )
    examples = examples.map(
      lambda example: {**example, "size": tf.image.extract_jpeg_shape(example["image"])[:2]},
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    names, contents, sizes = [], [], [np.zeros((0, 2), np.int32)]
    for chunk in examples.batch(4096).as_numpy_iterator():
      names.extend(name.decode() for name in chunk["file_name"])
      contents.extend(chunk["image"])
      sizes.append(chunk["size"])
    _stored[key] = names, contents, np.concatenate(sizes)
  names, contents, sizes = _stored[key]
  keep = (sizes >= min_image_size).all(axis=1)
  num_small = int((~keep).sum())
  message = image_folder.skip_summary(collections.Counter({"too small": num_small}), len(keep), key)
  if num_small and message not in _logged:
    _logged.add(message)
    logging.warning("anime_faces: %s", message)
  if not num_small:
    return names, contents
  positions = np.flatnonzero(keep)
  return [names[i] for i in positions], [contents[i] for i in positions]
