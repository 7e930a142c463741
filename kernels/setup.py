"""Builds csrc/onednn_conv.cc at install into gan_cpu_kernels/libgan_cpu_kernels.so.

A plain shared library, not a Python module: gan_cpu_kernels loads it with ctypes and registers
its XLA FFI handlers with jax. It is linked against the oneDNN wheel's libdnnl.so.3 by name, with
no run path; the package loads that library first (ctypes, RTLD_GLOBAL), from wherever the wheel
is installed. The metadata is in pyproject.toml.
"""

import importlib.metadata
from pathlib import Path

import jax
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def installed_file(distribution: str, relative: str) -> Path:
  """Where `distribution`'s file ending in `relative` is installed."""
  for file in importlib.metadata.files(distribution) or ():
    if file.as_posix().endswith(relative):
      return Path(file.locate()).resolve()
  raise FileNotFoundError(f"{distribution} has no {relative}; install it before building")


class BuildSharedLibrary(build_ext):
  """build_ext with oneDNN's and XLA FFI's headers, and a plain library name (no ABI tag)."""

  def build_extension(self, ext):
    dnnl_hpp = installed_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    libdnnl = installed_file("onednn-cpu-gomp", "/libdnnl.so.3")
    # -isystem: the headers' own warnings are not ours.
    for include in (dnnl_hpp.parents[2], jax.ffi.include_dir()):
      ext.extra_compile_args += ["-isystem", str(include)]
    ext.extra_objects = [str(libdnnl)]
    super().build_extension(ext)

  def get_ext_filename(self, fullname):
    return str(Path(*fullname.split("."))) + ".so"


setup(
  ext_modules=[
    Extension(
      "gan_cpu_kernels.libgan_cpu_kernels",
      sources=["csrc/onednn_conv.cc"],
      language="c++",
      extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
      extra_link_args=["-fopenmp"],
    )
  ],
  cmdclass={"build_ext": BuildSharedLibrary},
)
