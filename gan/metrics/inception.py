"""The Inception-v3 network of FID, a JAX port of pytorch-fid's `FIDInceptionV3`.

pytorch-fid ports the TensorFlow graph of 2015-12-05 that the original FID code used; its blocks
differ from torchvision's Inception3 in the pooling of Mixed_5b-5d, 6b-6e and 7b (average pools
that do not count padding) and of Mixed_7c (a max pool instead of an average pool). Features are
the 2048-d pool3 activations of images resized bilinearly to 299x299, so FID and KID computed
here agree with pytorch-fid's.

The weights are pytorch-fid's own file, `pt_inception-2015-12-05-6726825d.pth`, read without
PyTorch (`gan.metrics.pth`); its state-dict keys name the modules below and its kernels keep
PyTorch's OIHW layout. On first use it is downloaded into ~/.cache/gan and its SHA-256 checked:

    path, sha256 = resolve_weights()   # $GAN_INCEPTION_WEIGHTS, or the cache (downloaded)
    features = load_inception(path)    # [N, H, W, 3] in [-1, 1] -> float32 [N, 2048]
"""

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax import lax

from gan.errors import UserError
from gan.metrics import embedding, pth

FID_WEIGHTS_ENV = "GAN_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# Where pytorch-fid publishes the file, and its SHA-256 (the name ends with its first 8 digits,
# torch.hub's convention); the download is kept only when it matches.
WEIGHTS_URL = (
  f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
)
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
_DOWNLOAD_TIMEOUT_S = 60
INPUT_SIZE = 299
FEATURES = 2048

# State-dict entries the feature extractor does not use: the 1008-way classifier and the
# BatchNorm step counters that newer PyTorch versions add.
_UNUSED_SUFFIXES = ("num_batches_tracked",)
_UNUSED_PREFIXES = ("fc.",)
# NNX variable name -> PyTorch parameter name.
_TORCH_NAMES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def cached_weights_path() -> str:
  """Where the downloaded weights are kept: ~/.cache/gan/pt_inception-2015-12-05-6726825d.pth."""
  return os.path.join(os.path.expanduser("~"), ".cache", "gan", WEIGHTS_FILE)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _fetch_failed(path: str, reason: str) -> UserError:
  return UserError(
    f"could not download the FID Inception weights ({reason}): fetch {WEIGHTS_URL} "
    f"(sha256 {WEIGHTS_SHA256}) by hand and put it at {path}, or point ${FID_WEIGHTS_ENV} at it"
  )


def _fetch(partial, path: str) -> str:
  """Streams WEIGHTS_URL into the open file `partial`; returns the bytes' SHA-256."""
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(WEIGHTS_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response:
      while chunk := response.read(1 << 20):
        digest.update(chunk)
        partial.write(chunk)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    reason = e.reason if type(e) is urllib.error.URLError else e
    raise _fetch_failed(path, str(reason)) from None
  return digest.hexdigest()


def download_weights(path: str) -> None:
  """Downloads WEIGHTS_URL to `path`, keeping it only if its SHA-256 is WEIGHTS_SHA256.

  The bytes go to a temporary file beside `path`, renamed into place once checked, so an
  interrupted or corrupt download never sits where the weights are looked for.

  Raises:
    UserError: without network, on an HTTP error, or when the hash differs.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  logging.info("downloading the FID Inception weights from %s to %s", WEIGHTS_URL, path)
  with tempfile.NamedTemporaryFile(dir=folder, suffix=".partial", delete=False) as partial:
    try:
      sha256 = _fetch(partial, path)
      if sha256 != WEIGHTS_SHA256:
        raise _fetch_failed(path, f"the download's sha256 is {sha256}; nothing was kept")
    except BaseException:
      os.unlink(partial.name)
      raise
  os.replace(partial.name, path)
  logging.info("saved the FID Inception weights to %s", path)


def resolve_weights(path: str | None = None) -> tuple[str, str]:
  """The Inception weights file to use, and its SHA-256.

  A file named by `path` or $GAN_INCEPTION_WEIGHTS is used as it is; weights other than
  pytorch-fid's only draw a warning, since their FID is comparable with nothing published.
  Otherwise the weights are pytorch-fid's file in the cache, downloaded when absent and
  refused when their hash differs.

  Raises:
    UserError: if a named file is missing, or the cached weights are missing and cannot be
      downloaded, or differ from pytorch-fid's.
  """
  named = path or os.environ.get(FID_WEIGHTS_ENV)
  if named:
    named = os.path.expanduser(named)
    if named.endswith(".npz"):
      raise UserError(
        f"{named} is an .npz; the Inception weights are pytorch-fid's .pth itself: point "
        f"eval.inception_weights or ${FID_WEIGHTS_ENV} at {WEIGHTS_FILE} ({WEIGHTS_URL}), or "
        f"leave both unset to have it downloaded"
      )
    if not os.path.isfile(named):
      raise UserError(
        f"no Inception weights at {named} (eval.inception_weights or ${FID_WEIGHTS_ENV}): "
        f"put pytorch-fid's {WEIGHTS_URL} (sha256 {WEIGHTS_SHA256}) there, or leave both "
        f"unset to have it downloaded to {cached_weights_path()}"
      )
    sha256 = file_sha256(named)
    if sha256 != WEIGHTS_SHA256:
      logging.warning(
        "the Inception weights at %s are not pytorch-fid's (sha256 %s): their FID and KID "
        "compare only with values computed with the same file",
        named,
        sha256,
      )
    return named, sha256
  cached = cached_weights_path()
  if not os.path.exists(cached):
    download_weights(cached)
  sha256 = file_sha256(cached)
  if sha256 != WEIGHTS_SHA256:
    raise UserError(
      f"{cached} has sha256 {sha256}, not that of pytorch-fid's weights ({WEIGHTS_SHA256}): "
      f"delete it to download them again, or point ${FID_WEIGHTS_ENV} at the weights you mean"
    )
  return cached, sha256


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nnx.Module):
  """Convolution without bias, BatchNorm (eps 0.001, running statistics), ReLU."""

  def __init__(self, in_features, out_features, kernel, *, stride=1, padding=0, rngs):
    self.conv = nnx.Conv(
      in_features,
      out_features,
      _pair(kernel),
      strides=stride,
      padding=tuple((p, p) for p in _pair(padding)),
      use_bias=False,
      precision=lax.Precision.HIGHEST,  # no TF32: features should not depend on the GPU
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(out_features, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool, NHWC; padding never wins (PyTorch pads max pools with -inf)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 average pool, stride 1, padding 1, NHWC, with PyTorch's `count_include_pad=False`."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  sums = lax.reduce_window(x, 0.0, lax.add, window, strides, pad)
  counts = lax.reduce_window(
    jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, window, strides, pad
  )
  return sums / counts


class FIDInceptionA(nnx.Module):
  """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pooled branches; 35x35."""

  def __init__(self, in_features, pool_features, *, rngs):
    self.branch1x1 = BasicConv2d(in_features, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_features, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_features, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: 35x35 -> 17x17."""

  def __init__(self, in_features, *, rngs):
    self.branch3x3 = BasicConv2d(in_features, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), branch3x3dbl, max_pool(x, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
  """Mixed_6b-6e: factorised 7x7 branches; 17x17."""

  def __init__(self, in_features, channels_7x7, *, rngs):
    c7 = channels_7x7
    row, col = dict(padding=(0, 3)), dict(padding=(3, 0))
    self.branch1x1 = BasicConv2d(in_features, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_features, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_features, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), **row, rngs=rngs)
    self.branch_pool = BasicConv2d(in_features, 192, 1, rngs=rngs)

  def __call__(self, x):
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = x
    for conv in (
      self.branch7x7dbl_1,
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      branch7x7dbl = conv(branch7x7dbl)
    branch_pool = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: 17x17 -> 8x8."""

  def __init__(self, in_features, *, rngs):
    self.branch3x3_1 = BasicConv2d(in_features, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_features, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool(x, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
  """Mixed_7b (`max_pool=False`, pytorch-fid's E_1) and Mixed_7c (`max_pool=True`, E_2); 8x8.

  The TF graph pools Mixed_7c's last branch with a max pool, unlike every other Inception; FID
  values depend on reproducing that.
  """

  def __init__(self, in_features, *, max_pool: bool, rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_features, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_features, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_features, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_features, 192, 1, rngs=rngs)

  def __call__(self, x):
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = jnp.concatenate([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], -1)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    dbl = jnp.concatenate([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], -1)
    pooled = max_pool(x, 1, padding=1) if self.max_pool else avg_pool_exclude_pad(x)
    return jnp.concatenate([self.branch1x1(x), branch3x3, dbl, self.branch_pool(pooled)], -1)


class FIDInceptionV3(nnx.Module):
  """Images [N, 299, 299, 3] in [-1, 1] -> pool3 features [N, 2048].

  Attribute names follow pytorch-fid's (torchvision's) modules, so every parameter path maps to
  one state-dict key: ('Mixed_5b', 'branch1x1', 'conv', 'kernel') is Mixed_5b.branch1x1.conv.weight.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(images)))
    x = max_pool(x, 2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
    for block in (
      self.Mixed_5b,
      self.Mixed_5c,
      self.Mixed_5d,
      self.Mixed_6a,
      self.Mixed_6b,
      self.Mixed_6c,
      self.Mixed_6d,
      self.Mixed_6e,
      self.Mixed_7a,
      self.Mixed_7b,
      self.Mixed_7c,
    ):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


def resize_to_input(images: jax.Array) -> jax.Array:
  """float32 [N, 299, 299, 3]: bilinear like PyTorch's `interpolate(align_corners=False)`.

  No antialiasing, as pytorch-fid; pixel values stay as given ([-1, 1] is what the network wants,
  pytorch-fid's `normalize_input` maps its [0, 1] inputs there).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
    return images
  shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, images.shape[3])
  return jax.image.resize(images, shape, "linear", antialias=False)


def _torch_key(path: tuple) -> str:
  *modules, name = path
  return ".".join([*map(str, modules), _TORCH_NAMES[name]])


def load_inception_model(path: str | None = None) -> FIDInceptionV3:
  """The network with the pytorch-fid weights at `path` (default: `resolve_weights()`).

  Raises:
    UserError: as `resolve_weights`, or if the file is no state dict, or a parameter is
      missing or has the wrong shape.
  """
  path = path or resolve_weights()[0]
  saved = pth.read_state_dict(path)
  # Shapes only: the real values come from the file, so nothing is initialised twice.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0))))
  loaded, used = [], set()
  for key, variable in nnx.to_flat_state(abstract):
    name = _torch_key(key)
    shape = variable.get_value().shape
    if name not in saved:
      raise UserError(f"the Inception weights at {path} lack {name}; are they pytorch-fid's?")
    value = saved[name]
    if key[-1] == "kernel" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.shape != shape:
      raise UserError(
        f"the Inception weights at {path} hold {name} with shape {saved[name].shape}; "
        f"pytorch-fid's network needs {shape} (after OIHW -> HWIO)"
      )
    loaded.append((key, jnp.asarray(value, jnp.float32)))
    used.add(name)
  unknown = [
    name
    for name in saved
    if name not in used
    and not name.endswith(_UNUSED_SUFFIXES)
    and not name.startswith(_UNUSED_PREFIXES)
  ]
  if unknown:
    logging.warning("ignoring %d unknown arrays in %s, e.g. %s", len(unknown), path, unknown[0])
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def load_inception(path: str | None = None, batch_size: int = 50):
  """A function mapping images [N, H, W, 3] in [-1, 1] to float32 numpy features [N, 2048].

  `path` is the weights file (default: `resolve_weights()`, which may download it).

  Images go through the network `batch_size` at a time; a short last batch is padded, so each
  run compiles the network once.

  Raises:
    UserError: as `load_inception_model`.
  """
  graphdef, state = nnx.split(load_inception_model(path))
  resize = jax.jit(resize_to_input)

  @jax.jit
  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  def features(images) -> np.ndarray:
    return embedding.in_batches(
      lambda batch: forward(state, resize(batch)), images, batch_size, FEATURES
    )

  return features
