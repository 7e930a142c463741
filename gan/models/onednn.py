"""The k4-s2 layers run by oneDNN on the CPU, through XLA's FFI.

XLA:CPU's own convolution kernels reach about half of what oneDNN (the library PyTorch runs on
the CPU) does for DCGAN's shapes, and for bf16 no more than their float32 speed. `onednn_conv.cc`
wraps oneDNN's convolution and its two gradients as XLA FFI handlers; this module compiles it
once per source and jaxlib version (into ~/.cache/gan, with g++ against the oneDNN wheel's
headers), registers the handlers, and calls them; `layers` builds the k4-s2 layers' functions
and gradients from the three calls.

In float32, the layers with at least 16 input channels and heights and widths that are multiples
of 8 (DCGAN's middle layers) go by Winograd's minimal filtering F(4x4, 2x2) instead: a k4-s2
convolution is a k2-s1 convolution of the input's space-to-depth form, and each 4 x 4 tile of its
output takes 25 multiplications per channel pair in place of 64, as 25 matrix products by oneDNN.
Its rounding error is a few times the direct convolution's (up to 1e-5 of the largest value,
against 3e-6); `GAN_WINOGRAD=0` keeps oneDNN's direct convolutions.

The data gradient of the RGB layers (under 16 channels on the large side: D's first layer, and
G's last, whose forward pass it is) goes as one matrix product into the windows' gradients, which
are then added back in place (col2im), in float32 and bf16: oneDNN's direct data gradient ran these
thin layers 2-3x slower. So does the bf16 kernel gradient of layers with at most 64 pixels on the
large side (DCGAN's widest): one product of the gathered windows and the output gradient, which
oneDNN 3.2's own bf16 kernel gradient (not a brgemm one without AMX) ran 1.6x slower.
`GAN_IM2COL=0` keeps oneDNN's direct passes.

Where oneDNN cannot be used (no g++, another platform, `GAN_ONEDNN=0` in the environment), the
layers keep XLA's convolutions; `available()` says which, and why, once in the log.
"""

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {
  "GanConvForward": "gan_onednn_conv_forward",
  "GanConvBackwardData": "gan_onednn_conv_backward_data",
  "GanConvBackwardWeights": "gan_onednn_conv_backward_weights",
}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_plain_convolutions = False  # see plain_convolutions()


def _installed_file(distribution: str, relative: str) -> Path:
  """Where `distribution`'s file ending in `relative` is installed."""
  for file in importlib.metadata.files(distribution) or ():
    if file.as_posix().endswith(relative):
      return Path(file.locate()).resolve()
  raise FileNotFoundError(f"{distribution} has no {relative}")


def _cache_dir() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gan"


def _build() -> Path:
  """Compiles onednn_conv.cc unless this source, jaxlib and oneDNN were compiled before."""
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise FileNotFoundError("no C++ compiler (g++, or $CXX)")
  header = _installed_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
  library = _installed_file("onednn-cpu-gomp", "/libdnnl.so.3")
  includes = (header.parents[2], Path(jax.ffi.include_dir()))
  fingerprint = hashlib.sha256(_SOURCE.read_bytes())
  for part in (*includes, library, importlib.metadata.version("jaxlib")):
    fingerprint.update(str(part).encode())
  target = _cache_dir() / f"onednn_conv-{fingerprint.hexdigest()[:16]}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside the target and renamed into place: processes building at once never see half.
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    built = Path(scratch) / target.name
    command = [compiler, "-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]
    command += [f"-I{include}" for include in includes]
    command += [str(_SOURCE), str(library), f"-Wl,-rpath,{library.parent}", "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
    os.replace(built, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the oneDNN handlers are built and registered (logs why not, once)."""
  if os.environ.get("GAN_ONEDNN", "1") == "0":
    logging.info("GAN_ONEDNN=0: the k4-s2 layers use XLA's convolutions on the CPU.")
    return False
  # GNU OpenMP, loaded with oneDNN, reads this once. Its idle workers then sleep at once instead
  # of spinning on the cores that XLA's own work needs between two convolutions (DCGAN bf16 on
  # 2 cores: a median of 107.5 img/s over 13 runs, against 101 over 5 runs spinning).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    path = _build()
    library = ctypes.CDLL(str(path))
  except (OSError, RuntimeError, importlib.metadata.PackageNotFoundError) as error:
    logging.warning("oneDNN convolutions unavailable (%s); using XLA's, which are slower.", error)
    return False
  for symbol, name in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  logging.info("The k4-s2 layers run by oneDNN on the CPU (%s).", path)
  return True


def winograd() -> bool:
  """Whether float32 layers that fit go by Winograd's form (the handlers read GAN_WINOGRAD at
  each call)."""
  return os.environ.get("GAN_WINOGRAD", "1") != "0"


@contextlib.contextmanager
def plain_convolutions():
  """Functions traced inside run the k4-s2 layers as XLA's plain convolutions, neither by oneDNN
  nor as dots: for XLA's cost analysis, which cannot see into oneDNN's custom calls and would
  count the dot forms' extra border work. The function is the same, so are its FLOPs."""
  global _plain_convolutions
  _plain_convolutions, before = True, _plain_convolutions
  try:
    yield
  finally:
    _plain_convolutions = before


def tracing_plain_convolutions() -> bool:
  return _plain_convolutions


def usable(dtype, kernel: jax.Array) -> bool:
  """Whether a k4-s2 layer computing in `dtype` from `kernel` runs by oneDNN here."""
  return (
    not _plain_convolutions
    and jax.default_backend() == "cpu"
    and jnp.dtype(dtype) in _DTYPES
    and kernel.dtype in _DTYPES
    and available()
  )


def _call(symbol: str, result: jax.ShapeDtypeStruct, *args: jax.Array) -> jax.Array:
  if not available():
    raise RuntimeError("The oneDNN layers are unavailable here; the log says why.")
  return jax.ffi.ffi_call(_TARGETS[symbol], result)(*args)


def forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The strided convolution (2H x 2W -> H x W) of x by an HWIO kernel, in x's dtype."""
  batch, height, width, _ = x.shape
  shape = jax.ShapeDtypeStruct((batch, height // 2, width // 2, kernel.shape[3]), x.dtype)
  return _call("GanConvForward", shape, x, kernel)


def backward_data(cotangent: jax.Array, kernel: jax.Array) -> jax.Array:
  """The strided convolution's transpose (H x W -> 2H x 2W) applied to `cotangent`."""
  batch, height, width, _ = cotangent.shape
  shape = jax.ShapeDtypeStruct((batch, 2 * height, 2 * width, kernel.shape[2]), cotangent.dtype)
  return _call("GanConvBackwardData", shape, cotangent, kernel)


def backward_kernel(x: jax.Array, cotangent: jax.Array, dtype) -> jax.Array:
  """d<forward(x, kernel), cotangent>/dkernel, accumulated in float32, returned in `dtype`."""
  shape = jax.ShapeDtypeStruct((4, 4, x.shape[3], cotangent.shape[3]), dtype)
  return _call("GanConvBackwardWeights", shape, x, cotangent)
