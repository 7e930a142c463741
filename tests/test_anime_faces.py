"""The anime_faces TFDS builder, on a small fake of the Kaggle archive made at test time."""

import io
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from gan.data import anime_faces, pipeline
from gan.errors import UserError

pytestmark = pytest.mark.xdist_group("test_anime_faces")  # its tests share runs: one worker

NUM_GOOD = 10


def jpeg(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def face(i: int) -> Image.Image:
  """A 96-104 px crop, as in the Kaggle set: noise around a per-image colour."""
  rng = np.random.default_rng(i)
  size = 96 + i % 9
  pixels = rng.normal((25 * i, 200 - 15 * i, 120), 20, (size, size, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def kaggle_files() -> dict[str, bytes]:
  """images/<id>_<year>.jpg like the Kaggle archive, with some bad and odd files among them."""
  files = {f"images/{i}_{2000 + i}.jpg": jpeg(face(i)) for i in range(NUM_GOOD)}
  files["images/100_2010.jpg"] = jpeg(face(100))[:800]  # truncated: skipped
  files["images/101_2010.jpg"] = b"<html>404 Not Found</html>"  # not an image: skipped
  files["images/102_2011.jpg"] = jpeg(Image.new("CMYK", (96, 96), (0, 255, 255, 0)))  # kept, RGB
  files["images/103_2011.jpg"] = jpeg(Image.new("RGB", (8, 8), (0, 0, 255)))  # kept; too small
  return files


@pytest.fixture(scope="module")
def kaggle_zip(tmp_path_factory):
  """A manual dir holding archive.zip."""
  manual_dir = tmp_path_factory.mktemp("zip_manual")
  with zipfile.ZipFile(manual_dir / "archive.zip", "w") as zf:
    zf.writestr("images/", b"")
    for name, data in kaggle_files().items():
      zf.writestr(name, data)
  return manual_dir


@pytest.fixture(scope="module")
def kaggle_folder(tmp_path_factory):
  """A manual dir holding the unpacked images/ folder."""
  manual_dir = tmp_path_factory.mktemp("folder_manual")
  for name, data in kaggle_files().items():
    (manual_dir / name).parent.mkdir(exist_ok=True)
    (manual_dir / name).write_bytes(data)
  return manual_dir


@pytest.fixture(scope="module")
def prepared(kaggle_zip, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return anime_faces.prepare(str(kaggle_zip), data_dir), data_dir


def stored(builder) -> list[tuple[str, bytes]]:
  """(file name, stored bytes) of each example, in the prepared order."""
  examples = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  return [(e["file_name"].decode(), e["image"]) for e in examples.as_numpy_iterator()]


def data_config(manual_dir, data_dir, **overrides):
  config = default.get_config().data
  config.update(dict(source="anime_faces", path=str(manual_dir), tfds_data_dir=data_dir))
  config.update(dict(resolution=32, min_image_size=16), **overrides)
  return config


def test_preparing_the_zip_keeps_the_good_files_and_counts_the_bad(prepared):
  builder, _ = prepared
  assert builder.info.splits["train"].num_examples == NUM_GOOD + 2
  assert builder.info.metadata["skipped"] == {"truncated": 1, "not an image": 1}


def test_the_unpacked_folder_gives_the_same_dataset_as_the_zip(prepared, kaggle_folder, tmp_path):
  builder, _ = prepared
  from_folder = anime_faces.prepare(str(kaggle_folder), str(tmp_path))
  assert stored(from_folder) == stored(builder)


@pytest.mark.parametrize("form", ["the zip itself", "the images folder itself"])
def test_data_path_may_name_the_zip_or_the_images_folder(prepared, kaggle_zip, kaggle_folder, form):
  builder, _ = prepared
  path = kaggle_zip / "archive.zip" if form == "the zip itself" else kaggle_folder / "images"
  data_dir = str(kaggle_zip.parent / f"tfds_{form.replace(' ', '_')}")
  assert stored(anime_faces.prepare(str(path), data_dir)) == stored(builder)
  assert pipeline.num_examples(data_config(path, data_dir)) == NUM_GOOD + 1


def test_rgb_jpegs_are_stored_as_their_original_bytes(prepared):
  builder, _ = prepared
  files = kaggle_files()
  images = dict(stored(builder))
  assert images["3_2003.jpg"] == files["images/3_2003.jpg"]
  # The CMYK JPEG was converted and re-encoded, so TensorFlow decodes it as RGB red.
  assert images["102_2011.jpg"] != files["images/102_2011.jpg"]
  red = tf.io.decode_jpeg(images["102_2011.jpg"], channels=3).numpy().reshape(-1, 3).mean(0)
  np.testing.assert_allclose(red, (255, 0, 0), atol=3)


def test_training_batches_come_from_the_prepared_images(kaggle_zip, prepared):
  _, data_dir = prepared
  config = data_config(kaggle_zip, data_dir, random_flip=False)
  assert pipeline.num_examples(config) == NUM_GOOD + 1  # the 8 px image is too small
  batches = pipeline.create_dataset(config, batch_size=11, seed=0)
  for _ in range(3):
    batch = next(batches)
    assert batch["image"].shape == (11, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    np.testing.assert_array_equal(batch["label"], -1)
  # Every good face is there once: its mean colour identifies it.
  means = np.round((batch["image"].mean(axis=(1, 2)) + 1) * 127.5)
  expected = [(25 * i, 200 - 15 * i, 120) for i in range(NUM_GOOD)] + [(255, 0, 0)]
  np.testing.assert_allclose(sorted(means.tolist()), sorted(expected), atol=8)


def test_a_prepared_dataset_no_longer_needs_the_download(prepared):
  _, data_dir = prepared
  assert pipeline.num_examples(data_config("", data_dir, min_image_size=1)) == NUM_GOOD + 2


def test_another_download_is_not_silently_replaced_by_the_prepared_one(prepared, tmp_path):
  _, data_dir = prepared
  other = tmp_path / "other"
  (other / "images").mkdir(parents=True)
  for name, data in list(kaggle_files().items())[:4]:  # a subset of the same files
    (other / name).write_bytes(data)
  with pytest.raises(
    UserError, match=r"prepared from .*zip_manual.* holds other images \(4 files\)"
  ):
    anime_faces.prepare(str(other), data_dir)
  # A copy of the same download (unpacked, elsewhere) is the same dataset.
  for name, data in list(kaggle_files().items())[4:]:
    (other / name).write_bytes(data)
  assert stored(anime_faces.prepare(str(other), data_dir)) == stored(prepared[0])


def test_a_vanished_download_leaves_the_prepared_dataset_in_use(prepared, tmp_path, caplog):
  _, data_dir = prepared
  builder = anime_faces.prepare(str(tmp_path / "deleted"), data_dir)
  assert builder.info.splits["train"].num_examples == NUM_GOOD + 2
  assert any("holds no images; using those prepared" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
  "contents",
  ["nothing", "unrelated zip", "broken zip", "empty images folder", "a file", "no such path"],
)
def test_missing_files_say_where_to_download_and_put_them(tmp_path, contents):
  manual_dir = tmp_path / "manual"
  if contents == "a file":
    manual_dir.write_bytes(jpeg(face(0)))
  elif contents != "no such path":
    manual_dir.mkdir()
  if contents == "unrelated zip":
    with zipfile.ZipFile(manual_dir / "archive.zip", "w") as zf:
      zf.writestr("photos/cat.jpg", jpeg(face(0)))
  elif contents == "broken zip":
    (manual_dir / "archive.zip").write_bytes(b"PK\x03\x04 cut short")
  elif contents == "empty images folder":
    (manual_dir / "images").mkdir()
  config = data_config(manual_dir, str(tmp_path / "tfds"))
  with pytest.raises(UserError) as error:
    pipeline.create_dataset(config, batch_size=4, seed=0)
  message = str(error.value)
  assert "\n" not in message
  assert f"data.path {manual_dir}" in message
  assert "splcher/animefacedataset" in message and anime_faces.KAGGLE_URL in message
  assert "archive.zip" in message and "a folder holding it" in message and "images/" in message


def test_an_empty_path_says_to_set_it(tmp_path):
  with pytest.raises(UserError, match=r"data.path \(now empty\).*--config.data.path"):
    pipeline.num_examples(data_config("", str(tmp_path / "tfds")))
