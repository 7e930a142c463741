"""Folders of images: find them, check each once, decode them to RGB squares.

Any folder of JPEG, PNG, GIF, BMP or WebP files, searched recursively and taken in sorted path
order so that an index (and the batches drawn from it) is the same on every run. Symbolic links
are followed, each folder and each file at most once, so a link that loops back counts nothing
twice. One indexing pass decodes every file with PIL and keeps the good ones; what it skips
(truncated, not an image, smaller than `min_image_size`, ...) is counted by reason and logged
once, and the index names each skipped file. Everything that can
be converted is: grayscale, RGBA, palette, CMYK and 16-bit images all come out as 8-bit RGB, and
huge JPEGs are decoded at a reduced scale (PIL's draft mode) so memory stays bounded.

This module is plain PIL and numpy; `gan.input_pipeline` wraps `decode` in tf.data, and the
anime_faces builder reuses `skip_reason` and `load_rgb` when it prepares the Kaggle archive.
"""

import collections
import dataclasses
import io
import os
import threading
from concurrent import futures

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from gan.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})

# JPEGs are decoded at the smallest DCT scale that keeps both sides at least this large when
# checking them: a 6000 px photo is checked at 750 px, in 1/64 of the memory.
_CHECK_DRAFT_SIZE = 256
_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


@dataclasses.dataclass(frozen=True)
class Index:
  """The good images of a folder, in order, and what was skipped.

  Attributes:
    paths: the readable images, sorted.
    skipped: number of skipped files by reason ('truncated', 'not an image', ...).
    skipped_files: (path, reason) of each skipped file, in path order.
  """

  paths: tuple[str, ...]
  skipped: collections.Counter
  skipped_files: tuple[tuple[str, str], ...] = ()

  @property
  def num_files(self) -> int:
    return len(self.paths) + sum(self.skipped.values())


def find_images(root: str) -> list[str]:
  """Paths of the files under `root` (recursively) with an image extension, sorted.

  Links are followed, but a folder or file reached a second time (through a link, or a link
  that loops back to a folder above it) is not searched or listed again: the first path to it
  in sorted order stands for it.
  """
  seen_folders, seen_files, found = set(), set(), []
  for directory, folders, names in os.walk(root, followlinks=True):
    folders.sort()
    identity = _identity(directory)
    if identity in seen_folders:
      folders.clear()
      continue
    seen_folders.add(identity)
    for name in sorted(names):
      path = os.path.join(directory, name)
      if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        continue
      identity = _identity(path)
      if identity not in seen_files:
        seen_files.add(identity)
        found.append(path)
  return sorted(found)


def _identity(path: str) -> tuple[int, int] | str:
  """What a path names, whichever links lead there: its (device, inode), else its real path."""
  try:
    stat = os.stat(path)
  except OSError:
    return os.path.realpath(path)
  return (stat.st_dev, stat.st_ino)


def load_rgb(data: bytes, *, draft_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
  """Decodes an image file's bytes fully into an 8-bit RGB PIL image.

  Args:
    data: the encoded file.
    draft_size: JPEGs only: decode at the smallest DCT scale that keeps both sides at least this
      many pixels (fast, bounded memory for huge images); None decodes at full size.

  Returns:
    The RGB image (upright per its EXIF orientation) and the file's original (width, height).

  Raises:
    Whatever PIL raises for a bad file; `skip_reason` names it.
  """
  image = Image.open(io.BytesIO(data))
  original_size = image.size
  if draft_size is not None and image.format == "JPEG":
    image.draft("RGB", (draft_size, draft_size))
  image.load()  # decodes everything, so truncated files fail here and not later
  image = ImageOps.exif_transpose(image)
  return _to_rgb(image), original_size


def _to_rgb(image: Image.Image) -> Image.Image:
  if image.mode.startswith("I;16") or image.mode == "I":
    # PIL's own conversion clips 16-bit values at 255; keep the top 8 bits instead.
    pixels = np.asarray(image).astype(np.int64) >> 8
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
  if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND + (255,)), rgba)
  return image.convert("RGB")


def skip_reason(data: bytes, min_image_size: int) -> str | None:
  """Why an image file would be skipped ('truncated', 'too small', ...), or None if it is good."""
  if not data:
    return "empty file"
  try:
    _, (width, height) = load_rgb(data, draft_size=_CHECK_DRAFT_SIZE)
  except Image.UnidentifiedImageError:
    return "not an image"
  except Image.DecompressionBombError:
    return "too large"
  except OSError as e:
    return "truncated" if "truncated" in str(e) else "corrupt"
  except Exception:  # noqa: BLE001 -- a malformed file can make PIL raise almost anything
    return "corrupt"
  if min(width, height) < min_image_size:
    return "too small"
  return None


def decode(data: bytes, resolution: int) -> np.ndarray:
  """Decodes an image file to uint8 [resolution, resolution, 3]: centre square, resized.

  Downscaling is antialiased (PIL's bilinear filter widens with the scale factor), after an
  exact box reduction by an integer factor when the image is much larger than the target.
  """
  image, _ = load_rgb(data, draft_size=resolution)
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  # Crop first: resize(box=...) would let the filter reach outside the square.
  image = image.crop((left, top, left + side, top + side))
  image = image.resize((resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=2.0)
  return np.asarray(image, np.uint8)


def skip_summary(skipped: collections.Counter, total: int, what: str) -> str:
  """'skipped 5 of 1,210 files in DIR: 2 truncated, 1 not an image, ...'."""
  reasons = ", ".join(f"{count:,} {reason}" for reason, count in skipped.most_common())
  return f"skipped {sum(skipped.values()):,} of {total:,} files in {what}: {reasons}"


# Checks are remembered per (path, size, mtime, min_image_size): a folder is read once per
# process however often it is indexed (num_examples, then create_dataset).
_checked: dict[tuple, str | None] = {}
_logged: set[str] = set()
_lock = threading.Lock()


def index_folder(path: str, min_image_size: int) -> Index:
  """Finds and checks the images under `path`; logs what it skipped, once.

  Raises:
    UserError: if `path` is missing or not a folder, or holds no readable image.
  """
  if not path:
    raise UserError(
      "data.path is empty: set --config.data.path to a folder of images for image_folder"
    )
  if not os.path.isdir(path):
    what = "is not a folder" if os.path.exists(path) else "does not exist"
    raise UserError(f"data.path {path} {what}: point --config.data.path at a folder of images")
  paths = find_images(path)
  if not paths:
    raise UserError(
      f"no image files (.jpg, .png, .gif, .bmp, .webp) under {path}: "
      "put images there or point --config.data.path elsewhere"
    )

  def check(file_path):
    try:
      stat = os.stat(file_path)
    except OSError:
      return "unreadable"
    key = (file_path, stat.st_size, stat.st_mtime_ns, min_image_size)
    with _lock:
      if key in _checked:
        return _checked[key]
    try:
      with open(file_path, "rb") as f:
        reason = skip_reason(f.read(), min_image_size)
    except OSError:
      reason = "unreadable"
    with _lock:
      _checked[key] = reason
    return reason

  # PIL releases the GIL while decoding, so threads use every core.
  with futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
    reasons = list(pool.map(check, paths))
  good = tuple(p for p, reason in zip(paths, reasons, strict=True) if reason is None)
  skipped_files = tuple((p, r) for p, r in zip(paths, reasons, strict=True) if r is not None)
  skipped = collections.Counter(reason for _, reason in skipped_files)
  if skipped:
    message = skip_summary(skipped, len(paths), path)
    with _lock:
      first_time = message not in _logged
      _logged.add(message)
    if first_time:
      logging.warning("image_folder: %s", message)
  if not good:
    raise UserError(
      f"no readable images under {path} ({skip_summary(skipped, len(paths), path)}): "
      "put valid JPEG/PNG images there"
    )
  return Index(paths=good, skipped=skipped, skipped_files=skipped_files)
