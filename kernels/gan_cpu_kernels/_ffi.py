"""Loads the package's library, registers its XLA FFI handlers, and calls them.

Nothing is compiled here: setup.py built the library at install. oneDNN's library is loaded
first, globally, from the onednn-cpu-gomp wheel, so that the package's library (linked against it
by name, with no run path) finds it.
"""

import ctypes
import functools
import importlib.metadata
import os
from pathlib import Path

import jax
import numpy as np

# GNU OpenMP, loaded with oneDNN below, reads this once. Its idle workers then sleep at once
# instead of spinning on the cores that XLA's own work needs between two convolutions.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The forms a call may take besides oneDNN's direct passes (bits of the handlers' `forms`
# attribute; see csrc/onednn_conv.cc). The package always passes ALL_FORMS; its tests pass fewer,
# to compare with the direct passes.
WINOGRAD = 1
PATCHES = 2
ALL_FORMS = WINOGRAD | PATCHES

_TARGETS = {
  "GanConvForward": "gan_cpu_kernels_conv_forward",
  "GanConvBackwardData": "gan_cpu_kernels_conv_backward_data",
  "GanConvBackwardWeights": "gan_cpu_kernels_conv_backward_weights",
}


def _libdnnl() -> Path:
  for file in importlib.metadata.files("onednn-cpu-gomp") or ():
    if file.name == "libdnnl.so.3":
      return Path(file.locate()).resolve()
  raise FileNotFoundError("the onednn-cpu-gomp wheel lists no libdnnl.so.3")


def _load() -> ctypes.CDLL:
  try:
    ctypes.CDLL(str(_libdnnl()), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(Path(__file__).with_name("libgan_cpu_kernels.so")))
  except (OSError, importlib.metadata.PackageNotFoundError) as error:
    raise ImportError(f"gan_cpu_kernels cannot load its libraries: {error}") from error


_library = _load()
for _symbol, _name in _TARGETS.items():
  jax.ffi.register_ffi_target(_name, jax.ffi.pycapsule(getattr(_library, _symbol)), platform="cpu")


@functools.cache
def bf16_supported() -> bool:
  """Whether this CPU's oneDNN has bfloat16 convolutions (oneDNN 3.2: with AVX-512 only)."""
  return bool(_library.GanSupportsBf16())


def _call(symbol: str, result: jax.ShapeDtypeStruct, *args: jax.Array, forms: int) -> jax.Array:
  return jax.ffi.ffi_call(_TARGETS[symbol], result)(*args, forms=np.int32(forms))


def forward(x: jax.Array, kernel: jax.Array, forms: int = ALL_FORMS) -> jax.Array:
  """The strided convolution (2H x 2W -> H x W) of x by an HWIO kernel, in x's dtype."""
  batch, height, width, _ = x.shape
  shape = jax.ShapeDtypeStruct((batch, height // 2, width // 2, kernel.shape[3]), x.dtype)
  return _call("GanConvForward", shape, x, kernel, forms=forms)


def backward_data(cotangent: jax.Array, kernel: jax.Array, forms: int = ALL_FORMS) -> jax.Array:
  """The strided convolution's transpose (H x W -> 2H x 2W) applied to `cotangent`."""
  batch, height, width, _ = cotangent.shape
  shape = jax.ShapeDtypeStruct((batch, 2 * height, 2 * width, kernel.shape[2]), cotangent.dtype)
  return _call("GanConvBackwardData", shape, cotangent, kernel, forms=forms)


def backward_kernel(x: jax.Array, cotangent: jax.Array, dtype, forms: int = ALL_FORMS) -> jax.Array:
  """d<forward(x, kernel), cotangent>/dkernel, accumulated in float32, returned in `dtype`."""
  shape = jax.ShapeDtypeStruct((4, 4, x.shape[3], cotangent.shape[3]), dtype)
  return _call("GanConvBackwardWeights", shape, x, cotangent, forms=forms)
