"""Writes .pth files as torch.save does, byte for byte in structure, without PyTorch.

The pickle is emitted opcode by opcode, because the standard pickler can only name globals it
can import (torch._utils._rebuild_tensor_v2, torch.FloatStorage), and tests must not need
PyTorch. tests/test_pth.py checks these files against torch.load where PyTorch is installed.
"""

import io
import pickle
import struct
import zipfile

import numpy as np

# numpy dtype -> the torch storage class torch.save names for it.
_STORAGES = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float64): "DoubleStorage",
  np.dtype(np.float16): "HalfStorage",
  np.dtype(np.int64): "LongStorage",
  np.dtype(np.int32): "IntStorage",
  np.dtype(np.uint8): "ByteStorage",
  np.dtype(np.bool_): "BoolStorage",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
  data = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
  return pickle.BININT + struct.pack("<i", value)


def _ints(values) -> bytes:
  if not values:
    return pickle.EMPTY_TUPLE
  return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE


def _ordered_dict(items: bytes = b"") -> bytes:
  body = pickle.MARK + items + pickle.SETITEMS if items else b""
  return _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE + body


def _tensor(storage: str, key: str, numel: int, offset, size, stride, legacy: bool) -> bytes:
  pid = pickle.MARK + _str("storage") + _global("torch", storage) + _str(key) + _str("cpu")
  pid += _int(numel) + (pickle.NONE if legacy else b"") + pickle.TUPLE + pickle.BINPERSID
  args = pid + _int(offset) + _ints(size) + _ints(stride) + pickle.NEWFALSE + _ordered_dict()
  rebuild = _global("torch._utils", "_rebuild_tensor_v2")
  return rebuild + pickle.MARK + args + pickle.TUPLE + pickle.REDUCE


def state_dict_pickle(tensors, legacy: bool, metadata: bool = True) -> bytes:
  """The pickle of an OrderedDict of tensors.

  Args:
    tensors: (name, storage key, storage numpy array, offset, size, stride) per tensor; a key
      may serve several tensors (views into one storage).
    legacy: persistent ids of the legacy layout (with a view slot).
    metadata: add the `_metadata` attribute that nn.Module.state_dict() sets.
  """
  items = b""
  for name, key, flat, offset, size, stride in tensors:
    storage = _STORAGES[flat.dtype]
    items += _str(name) + _tensor(storage, key, flat.size, offset, size, stride, legacy)
  out = pickle.PROTO + b"\x02" + _ordered_dict(items)
  if metadata:  # state_dict()._metadata = OrderedDict({'': {'version': 1}}), set by BUILD
    version = pickle.EMPTY_DICT + _str("version") + _int(1) + pickle.SETITEM
    out += pickle.EMPTY_DICT + _str("_metadata") + _ordered_dict(_str("") + version)
    out += pickle.SETITEM + pickle.BUILD
  return out + pickle.STOP


def _plain(state_dict: dict[str, np.ndarray]):
  """One contiguous storage per array, as nn.Module.state_dict() gives."""
  rows = []
  for i, (name, array) in enumerate(state_dict.items()):
    array = np.array(array, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    strides = tuple(s // array.itemsize for s in array.strides)
    rows.append((name, str(i), array.reshape(-1), 0, array.shape, strides))
  return rows


def pth_bytes(state_dict, *, legacy: bool = False, tensors=None) -> bytes:
  """A .pth file of `state_dict` (name -> numpy array) in the zip or the legacy layout.

  `tensors`, rows as `state_dict_pickle` takes them, replaces `state_dict` to write views.
  """
  rows = tensors if tensors is not None else _plain(state_dict)
  storages = {key: flat for _, key, flat, *_ in rows}
  data = state_dict_pickle(rows, legacy)
  if legacy:
    out = io.BytesIO()
    for header in (
      LEGACY_MAGIC,
      1001,
      {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2}},
    ):
      pickle.dump(header, out, protocol=2)
    out.write(data)
    keys = sorted(storages)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
      flat = storages[key].astype(storages[key].dtype.newbyteorder("<"))
      out.write(struct.pack("<q", flat.size) + flat.tobytes())
    return out.getvalue()
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", data)
    archive.writestr("archive/byteorder", "little")
    for key, flat in storages.items():
      archive.writestr(f"archive/data/{key}", flat.astype(flat.dtype.newbyteorder("<")).tobytes())
    archive.writestr("archive/version", "3\n")
  return out.getvalue()


def write_pth(path, state_dict, **kwargs) -> None:
  with open(path, "wb") as f:
    f.write(pth_bytes(state_dict, **kwargs))
