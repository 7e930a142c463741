"""Reading .pth state dicts without PyTorch: both of torch.save's layouts, views, refusals."""

import pickle
import pickletools
import zipfile

import numpy as np
import pytest
from torch_files import pth_bytes, state_dict_pickle, write_pth

from gan.errors import UserError
from gan.metrics import pth


def _arrays() -> dict[str, np.ndarray]:
  """One array of every kind a state dict holds, and a few edge cases."""
  rng = np.random.default_rng(0)
  return {
    "conv.weight": rng.normal(size=(4, 3, 3, 2)).astype(np.float32),
    "bn.running_var": rng.uniform(0.5, 1.5, 4).astype(np.float64),
    "half": rng.normal(size=(2, 5)).astype(np.float16),
    "bn.num_batches_tracked": np.array(7, np.int64),
    "ints": np.arange(-3, 3, dtype=np.int32),
    "bytes": np.array([0, 255, 17], np.uint8),
    "mask": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.float32),
  }


def _assert_same(read: dict, expected: dict) -> None:
  assert list(read) == list(expected)  # and in the saved order
  for name, array in expected.items():
    assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
    np.testing.assert_array_equal(read[name], array, err_msg=name)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_state_dict_reads_back_exactly(tmp_path, legacy):
  path = tmp_path / "w.pth"
  write_pth(path, _arrays(), legacy=legacy)
  _assert_same(pth.read_state_dict(str(path)), _arrays())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_that_view_one_storage_read_as_their_own_elements(tmp_path, legacy):
  flat = np.arange(24, dtype=np.float32)
  rows = [
    ("whole", "0", flat, 0, (4, 6), (6, 1)),
    ("transposed", "0", flat, 0, (6, 4), (1, 6)),
    ("tail", "0", flat, 10, (2, 3), (3, 1)),
    ("strided", "0", flat, 1, (3,), (8,)),
  ]
  path = tmp_path / "views.pth"
  path.write_bytes(pth_bytes({}, legacy=legacy, tensors=rows))
  read = pth.read_state_dict(str(path))
  grid = flat.reshape(4, 6)
  _assert_same(
    read,
    {"whole": grid, "transposed": grid.T, "tail": flat[10:16].reshape(2, 3), "strided": flat[1::8]},
  )
  read["transposed"][0, 0] = -1  # each array owns its elements
  assert read["whole"][0, 0] == 0


def _zip_with_pickle(path, data: bytes) -> None:
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data)


def test_a_pickle_that_names_another_callable_is_refused_without_calling_it(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("still here")
  # What a malicious file would hold: os.remove(victim) as the object to rebuild.
  payload = (
    pickle.PROTO
    + b"\x02"
    + pickle.GLOBAL
    + b"os\nremove\n"
    + pickle.MARK
    + pickle.BINUNICODE
    + len(str(victim)).to_bytes(4, "little")
    + str(victim).encode()
    + pickle.TUPLE
    + pickle.REDUCE
    + pickle.STOP
  )
  path = tmp_path / "evil.pth"
  _zip_with_pickle(path, payload)
  with pytest.raises(UserError, match=r"os\.remove") as error:
    pth.read_state_dict(str(path))
  assert "\n" not in str(error.value) and str(path) in str(error.value)
  assert victim.read_text() == "still here"


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
  flat = np.arange(6, dtype=np.float32)
  path = tmp_path / "w.pth"
  path.write_bytes(pth_bytes({}, tensors=[("x", "0", flat, 4, (2, 2), (2, 1))]))
  with pytest.raises(UserError, match="reaches element 7 of a storage of 6"):
    pth.read_state_dict(str(path))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_file_is_refused_in_one_line(tmp_path, legacy):
  data = pth_bytes(_arrays(), legacy=legacy)
  path = tmp_path / "cut.pth"
  path.write_bytes(data[: len(data) - 20])
  with pytest.raises(UserError) as error:
    pth.read_state_dict(str(path))
  assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_an_object_other_than_a_dict_of_tensors_is_refused(tmp_path):
  path = tmp_path / "list.pth"
  _zip_with_pickle(path, pickle.dumps([1, 2, 3], protocol=2))
  with pytest.raises(UserError, match="not a flat dict of names to tensors"):
    pth.read_state_dict(str(path))


def test_the_writer_pickles_what_the_reader_expects_of_a_state_dict():
  # The opcodes name exactly the globals torch.save's pickles name, and nothing else.
  flat = np.zeros(3, np.float32)
  data = state_dict_pickle([("w", "0", flat, 0, (3,), (1,))], legacy=False)
  names = [arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]
  assert sorted(set(names)) == [
    "collections OrderedDict",
    "torch FloatStorage",
    "torch._utils _rebuild_tensor_v2",
  ]


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_files_agree_with_pytorch_both_ways(tmp_path, legacy):
  torch = pytest.importorskip("torch")
  arrays = _arrays()
  tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
  tensors["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
  arrays["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T
  theirs = tmp_path / "torch.pth"
  torch.save(tensors, theirs, _use_new_zipfile_serialization=not legacy)
  _assert_same(pth.read_state_dict(str(theirs)), arrays)

  ours = tmp_path / "ours.pth"
  write_pth(ours, _arrays(), legacy=legacy)
  loaded = torch.load(ours, map_location="cpu", weights_only=True)
  _assert_same({k: v.numpy() for k, v in loaded.items()}, _arrays())
