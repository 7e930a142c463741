"""The input pipeline: batch format, determinism and resumption, flips, image folders, bad files."""

import io
import logging
import os
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT
from PIL import Image

from configs import default
from gan.data import image_folder, pipeline, synthetic_faces
from gan.errors import UserError

RESOLUTION = 16


def data_config(**overrides):
  """The real data section, shrunk: 100 synthetic faces of 16 px."""
  config = default.get_config("smoke").data
  config.update(
    dict(
      source="synthetic_faces",
      resolution=RESOLUTION,
      num_examples=100,
      min_image_size=8,
    )
  )
  config.update(overrides)
  return config


def take(batches, n):
  return [next(batches) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def to_uint8(images):
  return np.round((images + 1) * 127.5).astype(np.uint8)


# --- batches ---------------------------------------------------------------------------------


def test_batches_are_float32_images_in_minus_one_to_one_and_int32_labels():
  batch = next(pipeline.create_dataset(data_config(), batch_size=8, seed=0))
  assert batch["image"].shape == (8, RESOLUTION, RESOLUTION, 3)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["image"].min() == -1 or batch["image"].max() == 1  # the full range is used
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32


@pytest.mark.parametrize("cache", [True, False])
def test_an_epoch_holds_every_synthetic_face_once_with_its_label(cache):
  config = data_config(random_flip=False, cache=cache)
  epoch = take(pipeline.create_dataset(config, batch_size=10, seed=0), 10)
  images = np.concatenate([to_uint8(b["image"]) for b in epoch])
  labels = np.concatenate([b["label"] for b in epoch])
  expected_images, expected_labels = synthetic_faces.render(100, RESOLUTION, config.seed)
  order = [
    next(j for j, e in enumerate(expected_images) if np.array_equal(e, image)) for image in images
  ]
  assert sorted(order) == list(range(100))
  np.testing.assert_array_equal(labels, expected_labels[order])


def test_num_examples_of_synthetic_faces_is_the_configured_number():
  assert pipeline.num_examples(data_config(num_examples=123)) == 123


# --- determinism and resumption ---------------------------------------------------------------


def test_the_same_seed_gives_the_same_batches():
  a = take(pipeline.create_dataset(data_config(), batch_size=8, seed=7), 20)
  b = take(pipeline.create_dataset(data_config(), batch_size=8, seed=7), 20)
  assert_same_batches(a, b)


def test_a_different_seed_gives_a_different_order():
  a = next(pipeline.create_dataset(data_config(), batch_size=8, seed=0))
  b = next(pipeline.create_dataset(data_config(), batch_size=8, seed=1))
  assert not np.array_equal(a["label"], b["label"])


def test_the_order_is_pinned_across_runs():
  # The first labels of seed 0: a change here changes the data order of every run (and of
  # every run resumed from an old checkpoint), so change it only on purpose.
  batch = next(pipeline.create_dataset(data_config(), batch_size=8, seed=0))
  assert batch["label"].tolist() == PINNED_FIRST_LABELS


PINNED_FIRST_LABELS = [756, 270, 943, 905, 724, 133, 137, 168]


@pytest.mark.parametrize("global_seed", [0, 123])
def test_a_global_tensorflow_seed_does_not_change_the_order(global_seed):
  tf.random.set_seed(global_seed)
  try:
    batch = next(pipeline.create_dataset(data_config(), batch_size=8, seed=0))
  finally:
    tf.random.set_seed(None)
  assert batch["label"].tolist() == PINNED_FIRST_LABELS


def test_epochs_are_shuffled_differently():
  config = data_config(random_flip=False)
  epochs = take(pipeline.create_dataset(config, batch_size=10, seed=0), 20)
  first = np.concatenate([b["label"] for b in epochs[:10]])
  second = np.concatenate([b["label"] for b in epochs[10:]])
  assert sorted(first) == sorted(second) and not np.array_equal(first, second)


@pytest.mark.parametrize("start_step", [1, 12, 13, 25, 40])
def test_resuming_at_a_step_continues_the_uninterrupted_sequence(start_step):
  # 100 examples in batches of 8: epochs end in the middle of batches 12, 25 and 37.
  uninterrupted = take(pipeline.create_dataset(data_config(), batch_size=8, seed=3), 45)
  resumed = pipeline.create_dataset(data_config(), batch_size=8, seed=3, start_step=start_step)
  assert_same_batches(take(resumed, 5), uninterrupted[start_step : start_step + 5])


def test_caching_does_not_change_the_batches():
  cached = take(pipeline.create_dataset(data_config(cache=True), batch_size=8, seed=0), 15)
  uncached = take(pipeline.create_dataset(data_config(cache=False), batch_size=8, seed=0), 15)
  assert_same_batches(cached, uncached)


@pytest.fixture
def rendered(monkeypatch):
  """The synthetic positions the pipeline renders (decodes), in order, as it renders them."""
  positions = []
  render_indices = synthetic_faces.render_indices

  def render(indices, resolution, seed):
    positions.extend(indices)
    return render_indices(indices, resolution, seed)

  monkeypatch.setattr(pipeline.synthetic_faces, "render_indices", render)
  return positions


def test_pipelines_of_one_source_share_what_it_decoded(rendered):
  source = pipeline.Source(data_config(num_examples=97))
  first = take(source.batches(batch_size=8, seed=0), 13)  # > 1 epoch
  assert sorted(set(rendered)) == list(range(97))
  rendered.clear()
  again = take(source.batches(batch_size=8, seed=0, start_step=3), 10)
  assert rendered == []
  assert_same_batches(again, first[3:13])


def test_a_newly_opened_source_decodes_afresh(rendered):
  config = data_config(num_examples=96)
  take(pipeline.create_dataset(config, batch_size=8, seed=0), 13)  # every position
  rendered.clear()
  take(pipeline.create_dataset(config, batch_size=8, seed=0), 1)
  assert rendered


# --- flips ----------------------------------------------------------------------------------


def test_random_flip_mirrors_some_images_and_only_mirrors():
  flipped = take(pipeline.create_dataset(data_config(), batch_size=10, seed=0), 10)
  plain = take(pipeline.create_dataset(data_config(random_flip=False), batch_size=10, seed=0), 10)
  num_mirrored = 0
  for f, p in zip(flipped, plain, strict=True):
    np.testing.assert_array_equal(f["label"], p["label"])
    for f_image, p_image in zip(f["image"], p["image"], strict=True):
      mirrored = np.array_equal(f_image, p_image[:, ::-1])
      assert mirrored or np.array_equal(f_image, p_image)
      num_mirrored += mirrored and not np.array_equal(f_image, p_image)
  assert 20 < num_mirrored < 80


def test_without_random_flip_every_image_is_a_source_image():
  config = data_config(random_flip=False)
  source, _ = synthetic_faces.render(100, RESOLUTION, config.seed)
  source = {image.tobytes() for image in source}
  for batch in take(pipeline.create_dataset(config, batch_size=10, seed=0), 20):
    assert all(image.tobytes() in source for image in to_uint8(batch["image"]))


# --- user errors ----------------------------------------------------------------------------


def test_a_batch_larger_than_the_dataset_is_a_user_error():
  with pytest.raises(UserError, match="batch size 101 is larger than the 100 images"):
    pipeline.create_dataset(data_config(), batch_size=101, seed=0)


def test_an_unknown_source_is_a_user_error():
  with pytest.raises(UserError, match="unknown data.source 'mnist'"):
    pipeline.num_examples(data_config(source="mnist"))


@pytest.mark.parametrize("path", ["", "does/not/exist"])
def test_a_missing_image_folder_is_a_user_error(tmp_path, path):
  config = data_config(source="image_folder", path=str(tmp_path / path) if path else "")
  with pytest.raises(UserError, match="data.path"):
    pipeline.num_examples(config)


def test_an_empty_image_folder_is_a_user_error(tmp_path):
  (tmp_path / "notes.txt").write_text("no images here")
  with pytest.raises(UserError, match=f"no image files .* under {tmp_path}"):
    pipeline.create_dataset(
      data_config(source="image_folder", path=str(tmp_path)), batch_size=1, seed=0
    )


def test_a_folder_of_only_bad_images_is_a_user_error(tmp_path):
  (tmp_path / "a.jpg").write_bytes(b"")
  (tmp_path / "b.png").write_text("not a png")
  with pytest.raises(UserError, match=f"no readable images under {tmp_path}"):
    pipeline.num_examples(data_config(source="image_folder", path=str(tmp_path)))


# --- image folders ---------------------------------------------------------------------------


def encode(image: Image.Image, format: str, **params) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=format, **params)
  return buffer.getvalue()


def noise(size, mode="RGB", seed=0) -> Image.Image:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), np.uint8)
  return Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)


def write_good_images(folder, count=12):
  """`count` solid-colour images in nested folders, alternately JPEG and PNG, 20-40 px."""
  for i in range(count):
    colour = (20 * i, 255 - 20 * i, 128)
    image = Image.new("RGB", (20 + 2 * i, 40 - i), colour)
    path = folder / f"set{i % 3}" / f"{i:02d}.{'jpg' if i % 2 else 'png'}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image, "JPEG" if i % 2 else "PNG"))


def test_find_images_searches_recursively_in_sorted_order(tmp_path):
  write_good_images(tmp_path)
  (tmp_path / "readme.txt").write_text("ignored")
  (tmp_path / "set0" / "UPPER.JPEG").write_bytes(encode(noise((20, 20)), "JPEG"))
  found = image_folder.find_images(str(tmp_path))
  assert len(found) == 13 and found == sorted(found)
  assert str(tmp_path / "set0" / "UPPER.JPEG") in found


def test_an_image_folder_gives_batches_of_its_images_labelled_minus_one(tmp_path):
  write_good_images(tmp_path)
  config = data_config(source="image_folder", path=str(tmp_path), random_flip=False)
  assert pipeline.num_examples(config) == 12
  epoch = take(pipeline.create_dataset(config, batch_size=4, seed=0), 3)
  for batch in epoch:
    assert batch["image"].shape == (4, RESOLUTION, RESOLUTION, 3)
    np.testing.assert_array_equal(batch["label"], -1)
  # Solid colours survive decoding, cropping and resizing (JPEG within a few levels).
  colours = sorted(to_uint8(b["image"][:, 8, 8]).tolist() for b in epoch)
  colours = np.array(sorted(sum(colours, [])), float)
  expected = np.array(sorted((20 * i, 255 - 20 * i, 128) for i in range(12)), float)
  np.testing.assert_allclose(colours, expected, atol=6)


def test_decode_centre_crops_to_a_square_before_resizing():
  image = Image.new("RGB", (60, 20), (255, 0, 0))
  image.paste((0, 0, 255), (20, 0, 40, 20))  # a blue centre square between red sides
  decoded = image_folder.decode(encode(image, "PNG"), 8)
  assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, np.broadcast_to([0, 0, 255], (8, 8, 3)))


# One test per kind of bad input: converted to RGB at the right size, or skipped and counted.


def rgb48_png(width, height, rgb16) -> bytes:
  """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  row = b"\0" + np.tile(np.array(rgb16, ">u2"), width).tobytes()
  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", zlib.compress(row * height))
    + chunk(b"IEND", b"")
  )


def transparent_png() -> bytes:
  image = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent blue
  return encode(image, "PNG")


def palette_gif() -> bytes:
  image = Image.new("P", (32, 32), 1)
  image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
  return encode(image, "GIF", transparency=0)


CONVERTED = {
  # name: (file bytes, the RGB colour it decodes to)
  "grayscale jpeg": (encode(Image.new("L", (32, 32), 100), "JPEG"), (100, 100, 100)),
  "grayscale png": (encode(Image.new("L", (32, 32), 100), "PNG"), (100, 100, 100)),
  "rgba png": (transparent_png(), (255, 255, 255)),  # transparency composited onto white
  "la png": (encode(Image.new("LA", (32, 32), (50, 255)), "PNG"), (50, 50, 50)),
  "palette png": (
    encode(
      Image.new("RGB", (32, 32), (200, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"
    ),
    (200, 0, 0),
  ),
  "palette gif": (palette_gif(), (0, 200, 0)),
  "cmyk jpeg": (encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
  "16-bit grayscale png": (
    encode(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG"),
    (156, 156, 156),  # the top 8 bits, not clipped at 255
  ),
  "16-bit rgb png": (rgb48_png(32, 32, (40000, 10000, 65535)), (156, 39, 255)),
  "bilevel png": (encode(Image.new("1", (32, 32), 1), "PNG"), (255, 255, 255)),
  "bmp": (encode(Image.new("RGB", (32, 32), (10, 20, 30)), "BMP"), (10, 20, 30)),
  "webp": (encode(Image.new("RGB", (32, 32), (10, 200, 30)), "WEBP", lossless=True), (10, 200, 30)),
}


@pytest.mark.parametrize("kind", CONVERTED)
def test_convertible_images_come_out_rgb(kind):
  data, colour = CONVERTED[kind]
  assert image_folder.skip_reason(data, min_image_size=16) is None
  decoded = image_folder.decode(data, RESOLUTION)
  assert decoded.shape == (RESOLUTION, RESOLUTION, 3) and decoded.dtype == np.uint8
  np.testing.assert_allclose(decoded.reshape(-1, 3).mean(0), colour, atol=3)


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale():
  data = encode(Image.new("RGB", (6000, 6000), (30, 200, 90)), "JPEG")
  assert image_folder.skip_reason(data, min_image_size=16) is None
  image, original_size = image_folder.load_rgb(data, draft_size=RESOLUTION)
  assert original_size == (6000, 6000) and image.size == (750, 750)  # 1/8 scale: 1/64 memory
  decoded = image_folder.decode(data, RESOLUTION)
  np.testing.assert_allclose(decoded.reshape(-1, 3).mean(0), (30, 200, 90), atol=3)


def test_an_exif_rotated_jpeg_is_turned_upright():
  image = Image.new("RGB", (40, 20), (255, 0, 0))
  image.paste((0, 0, 255), (0, 0, 20, 20))  # blue left half, red right half
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
  upright, _ = image_folder.load_rgb(encode(image, "JPEG", exif=exif))
  assert upright.size == (20, 40)  # portrait now, blue on top
  assert upright.getpixel((10, 5))[2] > 200 and upright.getpixel((10, 35))[0] > 200


def truncated_jpeg() -> bytes:
  data = encode(noise((64, 64)), "JPEG")
  return data[: len(data) // 2]


SKIPPED = {
  # name: (file bytes, the reason it is counted under)
  "truncated jpeg": (truncated_jpeg(), "truncated"),
  "truncated png": (encode(noise((64, 64)), "PNG")[:-300], "truncated"),
  "zero-byte file": (b"", "empty file"),
  "text named .jpg": (b"this is not a jpeg\n", "not an image"),
  "1x1 image": (encode(Image.new("RGB", (1, 1)), "PNG"), "too small"),
  "narrow image": (encode(Image.new("RGB", (200, 4)), "PNG"), "too small"),
}


@pytest.mark.parametrize("kind", SKIPPED)
def test_bad_images_are_skipped_with_a_reason(kind):
  data, reason = SKIPPED[kind]
  assert image_folder.skip_reason(data, min_image_size=16) == reason


def test_a_folder_with_every_kind_of_bad_file_trains_on_the_good_ones(tmp_path, caplog):
  write_good_images(tmp_path, count=8)
  for i, kind in enumerate(CONVERTED):
    extension = {"bmp": "bmp", "webp": "webp", "palette gif": "gif"}.get(kind, "png")
    extension = "jpg" if "jpeg" in kind else extension
    (tmp_path / f"converted{i:02d}.{extension}").write_bytes(CONVERTED[kind][0])
  for i, kind in enumerate(SKIPPED):
    (tmp_path / "bad" / f"{i}.jpg").parent.mkdir(exist_ok=True)
    (tmp_path / "bad" / f"{i}.jpg").write_bytes(SKIPPED[kind][0])
  config = data_config(source="image_folder", path=str(tmp_path), min_image_size=16)
  num_good = 8 + len(CONVERTED)

  with caplog.at_level(logging.WARNING):
    assert pipeline.num_examples(config) == num_good
    batches = take(pipeline.create_dataset(config, batch_size=5, seed=0), 12)  # 3 epochs
  for batch in batches:
    assert batch["image"].shape == (5, RESOLUTION, RESOLUTION, 3)
    assert np.isfinite(batch["image"]).all()

  index = image_folder.index_folder(str(tmp_path), 16)
  assert index.skipped == {"truncated": 2, "empty file": 1, "not an image": 1, "too small": 2}
  summaries = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(summaries) == 1  # logged once, though the folder was indexed three times
  total = num_good + len(SKIPPED)
  assert f"skipped 6 of {total} files in {tmp_path}: 2 truncated, 2 too small" in summaries[0]
  assert sorted(index.skipped_files) == sorted(
    (str(tmp_path / "bad" / f"{i}.jpg"), reason) for i, (_, reason) in enumerate(SKIPPED.values())
  )


def test_links_are_followed_once_and_a_loop_counts_nothing_twice(tmp_path):
  write_good_images(tmp_path / "faces", count=3)
  (tmp_path / "faces" / "again").symlink_to(tmp_path)  # loops back to the top
  (tmp_path / "linked").symlink_to(tmp_path / "faces")  # the same folder by another path
  (tmp_path / "one.png").symlink_to(tmp_path / "faces" / "set0" / "00.png")
  outside = tmp_path.parent / f"{tmp_path.name}_outside"
  write_good_images(outside, count=2)
  (tmp_path / "more").symlink_to(outside)  # a link out of the folder is followed

  paths = image_folder.find_images(str(tmp_path))

  assert len(paths) == 5
  assert len({os.path.realpath(p) for p in paths}) == 5
  assert pipeline.num_examples(data_config(source="image_folder", path=str(tmp_path))) == 5


def break_after_indexing(path):
  """Zeroes a file, keeping its size and time, so the folder's index still counts it good."""
  stat = os.stat(path)
  with open(path, "r+b") as f:
    f.write(bytes(stat.st_size))
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_file_that_breaks_after_indexing_stands_in_for_by_another_of_its_batch(tmp_path, caplog):
  write_good_images(tmp_path, count=6)
  config = data_config(source="image_folder", path=str(tmp_path), cache=False, random_flip=False)
  intact = take(pipeline.create_dataset(config, batch_size=2, seed=0), 9)  # 3 epochs
  broken = to_uint8(intact[0]["image"][0])  # whichever image comes first breaks
  (path,) = [
    p
    for p in image_folder.find_images(str(tmp_path))
    if np.array_equal(image_folder.decode(pathlib.Path(p).read_bytes(), RESOLUTION), broken)
  ]
  break_after_indexing(path)
  with caplog.at_level(logging.WARNING):
    batches = take(pipeline.create_dataset(config, batch_size=2, seed=0), 9)
  stand_ins = 0
  for before, after in zip(intact, batches, strict=True):
    for row, image in enumerate(to_uint8(before["image"])):
      if np.array_equal(image, broken):
        np.testing.assert_array_equal(after["image"][row], after["image"][1 - row])
        stand_ins += 1
      else:
        np.testing.assert_array_equal(after["image"][row], before["image"][row])
  assert stand_ins == 3  # once per epoch
  assert any(f"{path} no longer decodes" in r.getMessage() for r in caplog.records)


def test_a_batch_of_which_nothing_decodes_any_more_is_a_clear_error(tmp_path):
  write_good_images(tmp_path, count=4)
  config = data_config(source="image_folder", path=str(tmp_path), cache=False)
  next(pipeline.create_dataset(config, batch_size=2, seed=0))
  for path in image_folder.find_images(str(tmp_path)):
    break_after_indexing(path)
  with pytest.raises(UserError, match="^none of the 2 images of a batch decodes any more: the"):
    next(pipeline.create_dataset(config, batch_size=2, seed=0))


# --- lifetime -------------------------------------------------------------------------------

_ONE_BATCH_THEN_EXIT = """
from configs import default
from gan.data import pipeline
config = default.get_config("smoke").data
config.update(dict(resolution=128, num_examples=4096))  # slow batches: some still loading
batches = pipeline.create_dataset(config, batch_size=256, seed=0)
next(batches)
print("exiting")
"""


@pytest.mark.slow
def test_a_process_exits_while_its_pipeline_is_still_loading_batches():
  # Left to the interpreter's shutdown, the pipeline's loader would wait for the GIL forever.
  # Without the fix this hung in 4 tries out of 4 here.
  result = subprocess.run(
    [sys.executable, "-c", _ONE_BATCH_THEN_EXIT],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0 and result.stdout == "exiting\n", result.stderr[-2000:]


def test_closed_batches_end():
  batches = pipeline.create_dataset(data_config(), batch_size=8, seed=0)
  next(batches)
  batches.close()
  assert list(batches) == []
