"""Turning generator outputs into pictures: image grids and PNG files."""

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255]; non-finite pixels (a diverged run) become black."""
  images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
  return np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, padding: int = 2) -> np.ndarray:
  """Tiles [N, H, W, 3] images in [-1, 1] into one near-square uint8 [H', W', 3] grid."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, np.uint8)
  for i, image in enumerate(to_uint8(images)):
    top = padding + (i // cols) * (h + padding)
    left = padding + (i % cols) * (w + padding)
    grid[top : top + h, left : left + w] = image
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image, atomically so a crash never leaves half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)
