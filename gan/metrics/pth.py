"""PyTorch state dicts (.pth files) read with the standard library and numpy alone.

`torch.save` writes one of two layouts, and published weights come in both:
  - zip (PyTorch >= 1.6): `<root>/data.pkl` pickles the dict, each storage's bytes are the
    entry `<root>/data/<key>`, and `<root>/byteorder` (when present) names their byte order;
  - legacy (before 1.6): one stream of pickles (a magic number, the protocol version 1001, a
    system-info dict, the dict itself, the list of storage keys), then each storage in that
    order as an int64 element count and its little-endian bytes.
In both, the dict's pickle names tensors as `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)` and storages as persistent ids `('storage', torch.<Type>Storage, key,
location, numel[, view])`.

Unpickling runs whatever callables a file names, so the unpickler here resolves only those few
names, to numpy builders, and refuses every other one: reading a file runs no code from it.

    arrays = read_state_dict("pt_inception-2015-12-05-6726825d.pth")  # name -> np.ndarray
"""

import collections
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

from gan.errors import UserError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch.<name> storage classes -> numpy type codes (without byte order).
STORAGE_TYPES = {
  "FloatStorage": "f4",
  "DoubleStorage": "f8",
  "HalfStorage": "f2",
  "LongStorage": "i8",
  "IntStorage": "i4",
  "ShortStorage": "i2",
  "CharStorage": "i1",
  "ByteStorage": "u1",
  "BoolStorage": "b1",
}


# What a damaged or foreign file makes unpickling or unpacking raise.
_MALFORMED = (
  pickle.UnpicklingError,
  zipfile.BadZipFile,
  EOFError,
  ValueError,
  TypeError,
  KeyError,
  IndexError,
  AttributeError,
  struct.error,
)


class _Refused(Exception):
  """What this reader will not read; becomes one UserError line naming the file."""


class _StorageType:
  """Stands for a torch.<name>Storage class inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.code = STORAGE_TYPES[name]


class _Storage:
  """One storage: its element type and count, and its elements once read."""

  def __init__(self, key: str, code: str, numel: int):
    self.key, self.code, self.numel = key, code, numel
    self.array: np.ndarray | None = None

  def fill(self, data: bytes, byteorder: str) -> None:
    dtype = np.dtype(self.code).newbyteorder("<" if byteorder == "little" else ">")
    if len(data) != self.numel * dtype.itemsize:
      raise _Refused(
        f"storage {self.key} holds {len(data)} bytes, not {self.numel} x {dtype.itemsize}"
      )
    self.array = np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))


class _Tensor:
  """A tensor as the pickle describes it; `array()` builds it once its storage is read."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise _Refused("a tensor whose storage is not a persistent storage")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)):
      raise _Refused(f"a tensor with offset {offset}, size {size}, stride {stride}")
    if len(size) != len(stride):
      raise _Refused(f"a tensor with size {size} but stride {stride}")
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def array(self) -> np.ndarray:
    flat = self.storage.array
    if math.prod(self.size) == 0:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
    if last >= flat.size:
      raise _Refused(f"a tensor reaches element {last} of a storage of {flat.size}")
    strides = [s * flat.itemsize for s in self.stride]
    view = np.lib.stride_tricks.as_strided(flat[self.offset :], self.size, strides, writeable=False)
    return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, *metadata):
  del requires_grad, hooks, metadata  # autograd and subclass details: nothing numpy keeps
  return _Tensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
  """Resolves the names a state dict's pickle uses, and only those."""

  _NAMES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  }

  def __init__(self, file, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str):
    if module == "torch" and name in STORAGE_TYPES:
      return _StorageType(name)
    if (module, name) not in self._NAMES:
      raise _Refused(f"it names {module}.{name}, which a plain state dict does not")
    return self._NAMES[module, name]

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _text(pid[0]) != "storage":
      raise _Refused(f"an unknown persistent id {pid!r:.80}")
    storage_type, key, _, numel, *view = pid[1:]
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
      raise _Refused(f"a storage of type {storage_type!r:.80}")
    if view and view[0] is not None:
      raise _Refused("a storage view (PyTorch before 0.4)")
    key = _text(key)
    storage = self._storages.setdefault(key, _Storage(key, storage_type.code, numel))
    if (storage.code, storage.numel) != (storage_type.code, numel):
      raise _Refused(f"storage {key} is named with two types or sizes")
    return storage


def _text(value) -> str:
  # Files pickled by Python 2 hold some keys as bytes.
  return value.decode("ascii") if isinstance(value, bytes) else value


def _read_zip(file, storages: dict[str, _Storage]):
  with zipfile.ZipFile(file) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise _Refused("a zip without one <root>/data.pkl")
    root = pickles[0][: -len("data.pkl")]
    state = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    byteorder = "little"
    if f"{root}byteorder" in names:
      byteorder = archive.read(f"{root}byteorder").decode("ascii")
      if byteorder not in ("little", "big"):
        raise _Refused(f"the byte order {byteorder!r:.20}")
    for storage in storages.values():
      name = f"{root}data/{storage.key}"
      if name not in names:
        raise _Refused(f"no entry {name}")
      storage.fill(archive.read(name), byteorder)
  return state


def _read_legacy(file, storages: dict[str, _Storage]):
  def load():
    return _Unpickler(file, storages).load()

  if load() != _LEGACY_MAGIC or load() != _LEGACY_PROTOCOL:
    raise _Refused("neither a zip nor a file of torch.save's legacy format")
  load()  # the saving machine's byte order and type sizes; the data is little-endian anyway
  state = load()
  keys = load()
  if not isinstance(keys, list) or sorted(map(_text, keys)) != sorted(storages):
    raise _Refused("the storage list does not match the storages the tensors use")
  for key in map(_text, keys):
    storage = storages[key]
    header = file.read(8)
    if len(header) != 8:
      raise _Refused(f"the file ends before storage {key}")
    (numel,) = struct.unpack("<q", header)
    if numel != storage.numel:
      raise _Refused(f"storage {key} has {numel} elements, not the {storage.numel} named")
    storage.fill(file.read(numel * np.dtype(storage.code).itemsize), "little")
  return state


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of the state dict saved at `path` (either layout), as numpy arrays.

  Raises:
    UserError: if the file is not a flat dict of tensors in a layout described above, or names
      anything beyond tensors and their storages.
  """
  storages: dict[str, _Storage] = {}
  try:
    with open(path, "rb") as file:
      if zipfile.is_zipfile(file):
        file.seek(0)
        state = _read_zip(file, storages)
      else:
        file.seek(0)
        state = _read_legacy(file, storages)
    if not isinstance(state, Mapping) or not all(
      isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()
    ):
      raise _Refused("its object is not a flat dict of names to tensors")
    return {name: tensor.array() for name, tensor in state.items()}
  except _Refused as e:
    raise UserError(f"{path} is not a PyTorch state dict this reader accepts: {e}") from None
  except _MALFORMED as e:
    raise UserError(f"{path} is not a readable PyTorch state dict: {e}") from None
