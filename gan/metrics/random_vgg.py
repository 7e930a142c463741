"""A VGG-16 with random weights: an embedding for the k-NN metrics that needs no download.

Precision/recall and density/coverage need an embedding in which distances mean something; the
papers use an ImageNet VGG-16, we use Inception pool3 when its weights can be had
(`gan.metrics.inception`). Naeem et al. (2020) show that a randomly initialised network serves
too, and better where the data are far from ImageNet's photographs. This is that embedding:
VGG-16's thirteen 3x3 convolutions (ReLU) and five 2x2 max pools on images resized bilinearly to
64x64, then a dense layer of 4,096 (ReLU) and one of 64, the features.

The weights come from NumPy's legacy `RandomState(SEED)`, whose stream NumPy keeps fixed across
versions, with torchvision's VGG initialisation (convolutions He-normal by fan-out, dense layers
N(0, 0.01), biases zero, hence left out), so every run on every machine embeds alike and values
compare between runs. They compare with no published numbers: the network is ours.
"""

import jax
import jax.numpy as jnp
import numpy as np

from gan.metrics import embedding

SEED = 0
INPUT_SIZE = 64
FEATURES = 64
# VGG-16's convolution widths, "M" a 2x2 max pool (configuration D of Simonyan & Zisserman).
_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_HIDDEN = 4096


def random_weights(seed: int = SEED) -> dict[str, list[jax.Array]]:
  """The network's weights: {"convs": [HWIO kernels], "dense": [two matrices]}."""
  rng = np.random.RandomState(seed)
  convs, channels = [], 3
  for width in _LAYERS:
    if width == "M":
      continue
    fan_out = 3 * 3 * width
    kernel = rng.standard_normal((3, 3, channels, width)) * np.sqrt(2.0 / fan_out)
    convs.append(jnp.asarray(kernel, jnp.float32))
    channels = width
  side = INPUT_SIZE // 2 ** _LAYERS.count("M")
  dense = [
    jnp.asarray(rng.standard_normal(shape) * 0.01, jnp.float32)
    for shape in ((side * side * channels, _HIDDEN), (_HIDDEN, FEATURES))
  ]
  return {"convs": convs, "dense": dense}


def embed(weights: dict[str, list[jax.Array]], images: jax.Array) -> jax.Array:
  """Images [N, H, W, 3] in [-1, 1] -> features [N, 64]."""
  x = jax.image.resize(
    images.astype(jnp.float32), (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear"
  )
  kernels = iter(weights["convs"])
  for width in _LAYERS:
    if width == "M":
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    else:
      x = jax.lax.conv_general_dilated(
        x, next(kernels), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      x = jax.nn.relu(x)
  hidden, out = weights["dense"]
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ hidden) @ out


def load_random_vgg(batch_size: int = 100):
  """A function mapping images [N, H, W, 3] in [-1, 1] to float32 numpy features [N, 64].

  Images go through the network `batch_size` at a time; a short last batch is padded, so each
  run compiles the network once.
  """
  weights = random_weights()
  forward = jax.jit(embed)

  def features(images) -> np.ndarray:
    return embedding.in_batches(lambda batch: forward(weights, batch), images, batch_size, FEATURES)

  return features
