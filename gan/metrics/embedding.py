"""Running an image embedding over many images, a fixed-size batch at a time.

The feature networks (`inception`, `random_vgg`) are jit-compiled for one batch shape; padding a
short last batch keeps every call to that shape, so each run compiles the network once.
"""

from collections.abc import Callable

import numpy as np


def in_batches(
  forward: Callable[[np.ndarray], np.ndarray], images, batch_size: int, dim: int
) -> np.ndarray:
  """float32 numpy features [N, dim] of images [N, H, W, 3], `batch_size` images per call.

  Raises:
    ValueError: if `images` is not [N, H, W, 3].
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
  chunk = max(1, min(batch_size, images.shape[0]))
  out = [np.zeros((0, dim), np.float32)]
  for start in range(0, images.shape[0], chunk):
    batch = np.asarray(images[start : start + chunk], np.float32)
    real = batch.shape[0]
    padded = np.concatenate([batch, np.zeros((chunk - real, *batch.shape[1:]), np.float32)])
    out.append(np.asarray(forward(padded), np.float32)[:real])
  return np.concatenate(out)
