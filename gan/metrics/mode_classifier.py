"""Counts the synthetic_faces modes a generator covers (the Stacked-MNIST test, for faces).

A small CNN with three 10-way heads (hair, eyes, background colour) labels each generated face
with one of the dataset's 1000 modes; three easy 10-way problems instead of one 1000-way one.
Inputs of any resolution >= 32 are resized to 32x32 inside the network, so one set of weights,
shipped in `weights/synthetic_modes.npz` and rebuilt by `scripts/train_mode_classifier.py`,
serves 32, 64 and 128 px runs.

    classifier = load_classifier()
    hist = mode_histogram(predict_modes(classifier, images))
    modes_covered(hist), kl_from_uniform(hist)
"""

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from gan.data import synthetic_faces
from gan.errors import UserError

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "synthetic_modes.npz")
REBUILD_COMMAND = (
  "python scripts/train_mode_classifier.py --out=gan/metrics/weights/synthetic_modes.npz"
)
INPUT_SIZE = 32
NUM_CLASSES = 10  # per head: hair, eyes, background
HEADS = ("hair", "eyes", "background")

# (features, stride) per 3x3 convolution: 32 -> 16 -> 8 -> 4 px.
_CONVS = ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (64, 2))
_HIDDEN = 64


class ModeClassifier(nnx.Module):
  """Images in [-1, 1], [N, H, W, 3] with H, W >= 32 -> logits of each head, 3 x [N, 10]."""

  def __init__(self, *, rngs: nnx.Rngs):
    convs, in_features = [], 3
    for features, stride in _CONVS:
      convs.append(nnx.Conv(in_features, features, (3, 3), strides=stride, rngs=rngs))
      in_features = features
    self.convs = nnx.List(convs)
    final_size = INPUT_SIZE // math.prod(stride for _, stride in _CONVS)
    self.hidden = nnx.Linear(final_size * final_size * in_features, _HIDDEN, rngs=rngs)
    self.hair = nnx.Linear(_HIDDEN, NUM_CLASSES, rngs=rngs)
    self.eyes = nnx.Linear(_HIDDEN, NUM_CLASSES, rngs=rngs)
    self.background = nnx.Linear(_HIDDEN, NUM_CLASSES, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    n, height, width, _ = images.shape
    if min(height, width) < INPUT_SIZE:
      raise ValueError(
        f"the mode classifier needs images of >= {INPUT_SIZE} px, got {images.shape}"
      )
    x = images.astype(jnp.float32)
    if (height, width) != (INPUT_SIZE, INPUT_SIZE):
      # Antialiased, so a 64 px face shrinks to what the renderer would draw at 32 px.
      x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, x.shape[-1]), "linear", antialias=True)
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    x = jax.nn.relu(self.hidden(x.reshape(n, -1)))
    return self.hair(x), self.eyes(x), self.background(x)


def _params(classifier: ModeClassifier):
  return nnx.to_flat_state(nnx.state(classifier, nnx.Param))


def _name(key: tuple) -> str:
  return "/".join(map(str, key))


def save_weights(classifier: ModeClassifier, path: str) -> None:
  """Writes the parameters as a flat .npz, keys = '/'-joined parameter paths (no pickle)."""
  arrays = {_name(key): np.asarray(variable.get_value()) for key, variable in _params(classifier)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def load_classifier(path: str = DEFAULT_WEIGHTS) -> ModeClassifier:
  """The classifier with the weights saved at `path`, ready for `predict_modes`.

  Raises:
    UserError: if the file is missing or its parameters do not fit `ModeClassifier`.
  """
  if not os.path.exists(path):
    raise UserError(f"no mode-classifier weights at {path}; rebuild them with: {REBUILD_COMMAND}")
  # Shapes only: every parameter is read from the file, so no initialiser need run.
  classifier = nnx.eval_shape(lambda: ModeClassifier(rngs=nnx.Rngs(0)))
  expected = {
    _name(key): (key, variable.get_value().shape) for key, variable in _params(classifier)
  }
  with np.load(path, allow_pickle=False) as saved:
    if set(saved.files) != set(expected) or any(
      saved[name].shape != shape for name, (_, shape) in expected.items()
    ):
      raise UserError(
        f"the mode-classifier weights at {path} do not fit this network; "
        f"rebuild them with: {REBUILD_COMMAND}"
      )
    loaded = [(key, jnp.asarray(saved[name])) for name, (key, _) in expected.items()]
  nnx.update(classifier, nnx.from_flat_state(loaded))
  return classifier


@jax.jit
def predict_modes(classifier: ModeClassifier, images: jax.Array) -> jax.Array:
  """int32 [N] mode labels (hair * 100 + eyes * 10 + background) of images in [-1, 1]."""
  hair, eyes, background = (jnp.argmax(logits, axis=-1) for logits in classifier(images))
  return synthetic_faces.mode_label(hair, eyes, background).astype(jnp.int32)


def mode_histogram(modes: jax.Array, num_modes: int = synthetic_faces.NUM_MODES) -> jax.Array:
  """int32 [num_modes]: how many of `modes` fall in each mode."""
  return jnp.bincount(jnp.ravel(modes), length=num_modes).astype(jnp.int32)


def modes_covered(hist: jax.Array, min_count: int = 1) -> jax.Array:
  """How many modes hold at least `min_count` samples."""
  return jnp.sum(hist >= min_count)


def kl_from_uniform(hist: jax.Array) -> jax.Array:
  """KL(p || uniform) in nats, p the normalised histogram: sum over p > 0 of p log(p * K).

  Empty bins contribute nothing (p log p -> 0 as p -> 0), the Stacked-MNIST convention, so the
  value is finite: 0 when every mode is equally frequent, log K when all samples share one mode.
  """
  p = hist / jnp.sum(hist)
  num_modes = hist.shape[-1]
  return jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0) * num_modes), 0.0))


def _to_unit_range(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 127.5 - 1.0


def train_classifier(
  num_steps: int, seed: int, data_seed: int, resolutions=(32, 64), batch_size: int = 64
) -> ModeClassifier:
  """Trains a fresh classifier on freshly rendered synthetic faces; deterministic given the seeds.

  Every step renders `batch_size` new faces of dataset `data_seed` at each resolution (distinct
  indices for each), so the network never sees a face twice.
  """
  classifier = ModeClassifier(rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(classifier)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, num_steps // 10, num_steps, 1e-5)
  optimizer = optax.adam(schedule)
  opt_state = optimizer.init(params)

  def loss_fn(params, batches):
    model = nnx.merge(graphdef, params)
    loss = 0.0
    for images, labels in batches:
      targets = synthetic_faces.attributes(labels)
      for logits, target in zip(model(_to_unit_range(images)), targets, strict=True):
        loss += optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    return loss / len(batches)

  @jax.jit
  def train_step(params, opt_state, batches):
    loss, grads = jax.value_and_grad(loss_fn)(params, batches)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def render(step):
    first = step * batch_size * len(resolutions)
    return [
      synthetic_faces.render_indices(
        first + k + len(resolutions) * np.arange(batch_size), resolution, data_seed
      )
      for k, resolution in enumerate(resolutions)
    ]

  start = time.perf_counter()
  batches = render(0)
  for step in range(num_steps):
    params, opt_state, loss = train_step(params, opt_state, batches)
    if step + 1 < num_steps:
      batches = render(step + 1)  # drawn while the step runs asynchronously
    if (step + 1) % 100 == 0 or step + 1 == num_steps:
      logging.info(
        "step %d/%d  loss %.4f  %.0f s", step + 1, num_steps, loss, time.perf_counter() - start
      )
  return nnx.merge(graphdef, params)


def accuracy(
  classifier: ModeClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 500
) -> dict[str, float]:
  """Fraction of uint8 `images` whose hair, eyes, background and full mode are predicted right."""
  predicted = np.concatenate(
    [
      np.asarray(predict_modes(classifier, _to_unit_range(images[i : i + batch_size])))
      for i in range(0, len(images), batch_size)
    ]
  )
  result = {
    head: float(np.mean(p == t))
    for head, p, t in zip(
      HEADS, synthetic_faces.attributes(predicted), synthetic_faces.attributes(labels), strict=True
    )
  }
  result["mode"] = float(np.mean(predicted == labels))
  return result
