"""Synthetic cartoon faces with 1000 labelled, equally likely modes; built in, no download.

The faces-for-GANs version of Stacked MNIST: each image has a hair colour, an eye colour and a
background colour, ten of each, so there are exactly `NUM_MODES` = 1000 modes and every image
carries its mode label (`hair * 100 + eyes * 10 + background`). A generator's mode coverage can
then be counted with a small classifier. Continuous nuisance (face position and size, hair
length and fringe, eye placement, mouth shape, skin tone) keeps the images from being 1000 copies.

Images are drawn with numpy, vectorised over a chunk of images, straight at the target
resolution with one-pixel soft edges. Image i depends only on `(seed, i)`: its random numbers
come from a counter-based hash rather than a sequential generator, so any subset of indices can
be rendered on its own (the input pipeline renders lazily in chunks).
"""

from concurrent import futures

import numpy as np

# Well separated in RGB so that a small classifier tells them apart even at 32 px; the names
# are for plots and logs. Hair and background palettes avoid skin tones.
HAIR_COLOURS = np.array(
  [
    (25, 25, 30),  # black
    (105, 60, 25),  # brown
    (245, 215, 80),  # blonde
    (205, 30, 35),  # red
    (250, 135, 20),  # orange
    (250, 120, 200),  # pink
    (125, 45, 185),  # purple
    (35, 80, 225),  # blue
    (30, 160, 70),  # green
    (230, 235, 245),  # silver
  ],
  np.uint8,
)
HAIR_NAMES = (
  "black",
  "brown",
  "blonde",
  "red",
  "orange",
  "pink",
  "purple",
  "blue",
  "green",
  "silver",
)

EYE_COLOURS = np.array(
  [
    (225, 20, 20),  # red
    (255, 145, 0),  # amber
    (240, 230, 0),  # yellow
    (20, 190, 40),  # green
    (0, 210, 210),  # cyan
    (20, 60, 240),  # blue
    (150, 40, 220),  # violet
    (255, 80, 170),  # pink
    (110, 60, 20),  # brown
    (20, 20, 20),  # black
  ],
  np.uint8,
)
EYE_NAMES = ("red", "amber", "yellow", "green", "cyan", "blue", "violet", "pink", "brown", "black")

BACKGROUND_COLOURS = np.array(
  [
    (255, 255, 255),  # white
    (150, 150, 150),  # grey
    (45, 45, 55),  # charcoal
    (150, 200, 255),  # sky
    (15, 25, 140),  # navy
    (150, 245, 180),  # mint
    (25, 115, 35),  # forest
    (215, 150, 245),  # lavender
    (240, 240, 90),  # lemon
    (120, 20, 45),  # maroon
  ],
  np.uint8,
)
BACKGROUND_NAMES = (
  "white",
  "grey",
  "charcoal",
  "sky",
  "navy",
  "mint",
  "forest",
  "lavender",
  "lemon",
  "maroon",
)

NUM_MODES = len(HAIR_COLOURS) * len(EYE_COLOURS) * len(BACKGROUND_COLOURS)

_SKIN = np.array((250, 215, 185), np.float32)
_DARK = np.array((40, 25, 30), np.float32)
_WHITE = np.array((255, 255, 255), np.float32)
_MOUTH = np.array((170, 50, 60), np.float32)
_BLUSH = np.array((250, 150, 150), np.float32)
_CHUNK = 256  # images drawn together: big enough to vectorise, small enough to stay in cache
_NUM_UNIFORMS = 20  # random numbers per image; the order of use below is part of the dataset


def mode_label(hair, eyes, background):
  """The mode label of the given attribute indices (ints or arrays)."""
  return hair * 100 + eyes * 10 + background


def attributes(label):
  """(hair, eyes, background) indices of a mode label (int or array); inverse of mode_label."""
  return label // 100, label // 10 % 10, label % 10


def render(num: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws the first `num` faces of the dataset `seed`.

  Returns:
    images: uint8 [num, resolution, resolution, 3].
    labels: int32 [num], the mode label of each image, in [0, NUM_MODES).
  """
  return render_indices(np.arange(num), resolution, seed)


def render_indices(indices, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws the faces with the given indices of the dataset `seed`; see `render`."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  chunks = [indices[i : i + _CHUNK] for i in range(0, len(indices), _CHUNK)]
  images = np.empty((len(indices), resolution, resolution, 3), np.uint8)
  labels = np.empty((len(indices),), np.int32)
  # numpy releases the GIL in its array loops, so threads share the cores.
  with futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = pool.map(lambda chunk: _render_chunk(chunk, resolution, seed), chunks)
    for start, (chunk_images, chunk_labels) in zip(
      range(0, len(indices), _CHUNK), results, strict=True
    ):
      images[start : start + len(chunk_images)] = chunk_images
      labels[start : start + len(chunk_labels)] = chunk_labels
  return images, labels


def _uniforms(seed: int, indices: np.ndarray, count: int) -> np.ndarray:
  """[len(indices), count] uniforms in [0, 1): numbers index * count + k of a splitmix64 stream."""
  golden = np.uint64(0x9E37_79B9_7F4A_7C15)
  with np.errstate(over="ignore"):
    # Hash the seed first so that streams of nearby seeds are not shifted copies of each other.
    state = _finalise(np.uint64(seed & 0xFFFF_FFFF_FFFF_FFFF) + golden)
    counters = indices.astype(np.uint64)[:, None] * np.uint64(count) + np.arange(
      count, dtype=np.uint64
    )
    bits = _finalise(state + (counters + np.uint64(1)) * golden)
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _finalise(z):
  """The splitmix64 output function (uint64 in, uint64 out; wraps on overflow)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
  return z ^ (z >> np.uint64(31))


def _render_chunk(indices: np.ndarray, resolution: int, seed: int):
  u = _uniforms(seed, indices, _NUM_UNIFORMS).astype(np.float32)
  hair, eyes, background = (np.minimum((u[:, k] * 10).astype(np.int32), 9) for k in range(3))
  labels = mode_label(hair, eyes, background).astype(np.int32)

  def param(k, low, high):  # [n, 1, 1] so that it broadcasts against the pixel grid
    return (low + (high - low) * u[:, k])[:, None, None]

  def colour(rgb):  # [3, n, 1, 1] or [3, 1, 1, 1]
    return np.asarray(rgb, np.float32).reshape(-1, 3).T[:, :, None, None]

  # Pixel centres in [0, 1]; y grows downwards.
  grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
  x, y = grid[None, None, :], grid[None, :, None]
  pixel = 1.0 / resolution

  cx, cy = param(3, 0.42, 0.58), param(4, 0.5, 0.6)
  rx = param(5, 0.23, 0.3)  # face half-width
  ry = rx * param(6, 1.05, 1.25)
  skin = _SKIN * (0.82 + 0.2 * u[:, 7, None]) + (u[:, 8, None] - 0.5) * np.float32([12, 0, -12])
  hair_rgb, eye_rgb = HAIR_COLOURS[hair], EYE_COLOURS[eyes].astype(np.float32)

  # Channels first: numpy loops fast over the long pixel axes, slowly over a trailing 3.
  image = np.empty((3, len(indices), resolution, resolution), np.float32)
  image[...] = colour(BACKGROUND_COLOURS[background])

  def paint(alpha, rgb):
    rgb = np.broadcast_to(colour(rgb), (3, len(indices), 1, 1))
    for c in range(3):
      image[c] += alpha * (rgb[c] - image[c])

  # Hair behind the head: a cap plus, for longer hair, a curtain down to the hair length.
  cap_rx, cap_ry, cap_cy = rx * 1.22, ry * 1.18, cy - 0.08 * ry
  hair_back = _ellipse(x, y, cx, cap_cy, cap_rx, cap_ry, pixel)
  length = cy + ry * param(9, 0.0, 1.6)
  curtain = _box(x, y, cx, (cap_cy + length) / 2, cap_rx, np.maximum(length - cap_cy, 0) / 2, pixel)
  paint(np.maximum(hair_back, curtain), hair_rgb)
  paint(_ellipse(x, y, cx, cy, rx, ry, pixel), skin)

  # Fringe: the top of the cap above a zig-zag line of bangs.
  fringe_y = cy - ry * param(10, 0.2, 0.5)
  teeth = param(11, 3.0, 6.0)
  phase = (x - cx) / (2 * rx) * teeth + param(12, 0.0, 1.0)
  zigzag = np.abs(phase - np.floor(phase) - 0.5) * 2  # triangle wave in [0, 1]
  bangs = np.clip((fringe_y + 0.14 * ry * zigzag - y) / pixel + 0.5, 0, 1)
  paint(_ellipse(x, y, cx, cap_cy, cap_rx * 0.97, cap_ry * 0.97, pixel) * bangs, hair_rgb)

  # Both eyes at once: mirror x about the face centre.
  mirrored = cx + np.abs(x - cx)
  ex, ey = cx + rx * param(13, 0.38, 0.5), cy + ry * param(14, 0.0, 0.15)
  ew, eh = rx * 0.25, ry * 0.3
  paint(_ellipse(mirrored, y, ex, ey, ew * 1.15, eh * 1.1, pixel), _DARK)
  paint(_ellipse(mirrored, y, ex, ey + eh * 0.05, ew, eh, pixel), _WHITE)
  paint(_ellipse(mirrored, y, ex, ey + eh * 0.12, ew * 0.8, eh * 0.85, pixel), eye_rgb)
  paint(_ellipse(mirrored, y, ex, ey + eh * 0.15, ew * 0.35, eh * 0.4, pixel), eye_rgb * 0.3)
  paint(_ellipse(mirrored, y, ex + ew * 0.3, ey - eh * 0.3, ew * 0.25, ew * 0.25, pixel), _WHITE)
  paint(0.5 * _ellipse(mirrored, y, ex + ew * 0.3, ey + eh * 1.5, ew, eh * 0.3, pixel), _BLUSH)

  # Mouth: a stroke along a parabola, from frown (bend < 0) to smile, or an open mouth.
  mx, my = cx, cy + ry * param(15, 0.5, 0.62)
  mw = rx * param(16, 0.12, 0.32)
  bend = ry * param(17, -0.08, 0.14)
  along = np.clip((x - mx) / mw, -1, 1)
  centre = my + bend * (1 - along**2)
  stroke = np.clip((0.6 * pixel + 0.01 - np.abs(y - centre)) / pixel + 0.5, 0, 1)
  stroke = stroke * np.clip((mw - np.abs(x - mx)) / pixel + 0.5, 0, 1)
  open_mouth = _ellipse(x, y, mx, my + 0.5 * bend, mw * 0.7, np.abs(bend) * 0.6 + pixel, pixel)
  is_open = param(18, 0.0, 1.0) < 0.3
  paint(np.where(is_open, open_mouth, stroke), _MOUTH)

  image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
  return image.transpose(1, 2, 3, 0), labels


def _ellipse(x, y, cx, cy, rx, ry, pixel):
  """Coverage in [0, 1] of an axis-aligned ellipse, with an antialiased one-pixel edge."""
  q = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
  return np.clip((1 - q) * (np.minimum(rx, ry) / pixel) + 0.5, 0, 1)


def _box(x, y, cx, cy, hw, hh, pixel):
  """Coverage in [0, 1] of an axis-aligned box of half-sizes (hw, hh), antialiased."""
  inside_x = np.clip((hw - np.abs(x - cx)) / pixel + 0.5, 0, 1)
  inside_y = np.clip((hh - np.abs(y - cy)) / pixel + 0.5, 0, 1)
  return inside_x * inside_y
