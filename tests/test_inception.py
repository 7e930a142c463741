"""The FID Inception network: pytorch-fid's weight layout loads, the forward pass, its pieces."""

import functools
import importlib.util
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from gan.errors import UserError
from gan.metrics import inception


def _basic_convs() -> list[tuple[str, int, int, int, int]]:
  """(module, in, out, kernel h, kernel w) of every BasicConv2d of pytorch-fid's FIDInceptionV3.

  Written out from the architecture (torchvision's Inception3 with pytorch-fid's FID blocks),
  independently of the module under test.
  """
  convs = [
    ("Conv2d_1a_3x3", 3, 32, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 32, 64, 3, 3),
    ("Conv2d_3b_1x1", 64, 80, 1, 1),
    ("Conv2d_4a_3x3", 80, 192, 3, 3),
  ]
  for block, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    convs += [
      (f"{block}.branch1x1", cin, 64, 1, 1),
      (f"{block}.branch5x5_1", cin, 48, 1, 1),
      (f"{block}.branch5x5_2", 48, 64, 5, 5),
      (f"{block}.branch3x3dbl_1", cin, 64, 1, 1),
      (f"{block}.branch3x3dbl_2", 64, 96, 3, 3),
      (f"{block}.branch3x3dbl_3", 96, 96, 3, 3),
      (f"{block}.branch_pool", cin, pool, 1, 1),
    ]
  convs += [
    ("Mixed_6a.branch3x3", 288, 384, 3, 3),
    ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
    ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
    ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
  ]
  for block, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    convs += [
      (f"{block}.branch1x1", 768, 192, 1, 1),
      (f"{block}.branch7x7_1", 768, c7, 1, 1),
      (f"{block}.branch7x7_2", c7, c7, 1, 7),
      (f"{block}.branch7x7_3", c7, 192, 7, 1),
      (f"{block}.branch7x7dbl_1", 768, c7, 1, 1),
      (f"{block}.branch7x7dbl_2", c7, c7, 7, 1),
      (f"{block}.branch7x7dbl_3", c7, c7, 1, 7),
      (f"{block}.branch7x7dbl_4", c7, c7, 7, 1),
      (f"{block}.branch7x7dbl_5", c7, 192, 1, 7),
      (f"{block}.branch_pool", 768, 192, 1, 1),
    ]
  convs += [
    ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
    ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
    ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
    ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
    ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
    ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
  ]
  for block, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    convs += [
      (f"{block}.branch1x1", cin, 320, 1, 1),
      (f"{block}.branch3x3_1", cin, 384, 1, 1),
      (f"{block}.branch3x3_2a", 384, 384, 1, 3),
      (f"{block}.branch3x3_2b", 384, 384, 3, 1),
      (f"{block}.branch3x3dbl_1", cin, 448, 1, 1),
      (f"{block}.branch3x3dbl_2", 448, 384, 3, 3),
      (f"{block}.branch3x3dbl_3a", 384, 384, 1, 3),
      (f"{block}.branch3x3dbl_3b", 384, 384, 3, 1),
      (f"{block}.branch_pool", cin, 192, 1, 1),
    ]
  return convs


@functools.cache
def _state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """A state dict with pytorch-fid's keys and shapes, filled with small random values.

  He-scaled kernels and unit-ish BatchNorm statistics keep activations O(1) through the network.
  """
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, cin, cout, kh, kw in _basic_convs():
    fan_in = cin * kh * kw
    arrays[f"{name}.conv.weight"] = (
      rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2 / fan_in)
    ).astype(np.float32)
    arrays[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    arrays[f"{name}.bn.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    arrays[f"{name}.bn.running_mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
    arrays[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    arrays[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
  arrays["fc.weight"] = rng.normal(0, 0.01, (1008, 2048)).astype(np.float32)
  arrays["fc.bias"] = np.zeros(1008, np.float32)
  return arrays


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "weights.npz")
  inception.write_weights(_state_dict(), path)
  return path


def test_the_state_dict_table_has_pytorch_fids_parameter_count():
  # torchvision's inception_v3 has 27,161,264 parameters; less AuxLogits (3,326,696) and with
  # the TF graph's 1008-way fc instead of 1000-way (+16,392) that is pytorch-fid's network.
  arrays = _state_dict()
  trainable = sum(
    a.size for k, a in arrays.items() if not k.endswith(("running_mean", "running_var", "tracked"))
  )
  assert len(_basic_convs()) == 94
  assert trainable == 27_161_264 - 3_326_696 + 16_392


@pytest.mark.slow
def test_features_of_small_images_are_finite_2048_vectors(weights_path):
  features = inception.load_inception(weights_path)
  rng = np.random.default_rng(1)
  for size in (32, 64):
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    out = features(images)
    assert out.shape == (2, 2048)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert (out >= 0).all()  # a mean of ReLU outputs
    assert not np.allclose(out[0], out[1])


@pytest.mark.slow
def test_loaded_kernels_are_pytorchs_transposed_to_hwio(weights_path):
  model = inception.load_inception_model(weights_path)
  weight = _state_dict()["Conv2d_1a_3x3.conv.weight"]  # OIHW
  x = np.random.default_rng(2).normal(size=(1, 7, 7, 3)).astype(np.float32)
  out = np.asarray(model.Conv2d_1a_3x3.conv(jnp.asarray(x)))  # 3x3, stride 2, no padding
  expected = np.einsum("hwi,oihw->o", x[0, 2:5, 4:7], weight)  # output pixel (1, 2)
  np.testing.assert_allclose(out[0, 1, 2], expected, rtol=1e-5, atol=1e-5)


def test_average_pool_does_not_count_padding():
  x = np.random.default_rng(3).normal(size=(1, 4, 5, 2)).astype(np.float32)
  out = np.asarray(inception.avg_pool_exclude_pad(jnp.asarray(x)))
  for i in range(4):
    for j in range(5):
      window = x[0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
      np.testing.assert_allclose(out[0, i, j], window.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)


def test_padded_max_pool_ignores_padding():
  x = -1 - np.random.default_rng(4).uniform(size=(1, 4, 4, 1)).astype(np.float32)
  out = np.asarray(inception.max_pool(jnp.asarray(x), 1, padding=1))
  np.testing.assert_allclose(out[0, 0, 0, 0], x[0, :2, :2].max())


def _torch_bilinear_1d(size_in: int, size_out: int) -> np.ndarray:
  """The [out, in] matrix of PyTorch's interpolate(mode='bilinear', align_corners=False)."""
  matrix = np.zeros((size_out, size_in))
  scale = size_in / size_out
  for i in range(size_out):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    low = min(int(np.floor(src)), size_in - 1)
    high = min(low + 1, size_in - 1)
    frac = src - low
    matrix[i, low] += 1 - frac
    matrix[i, high] += frac
  return matrix


@pytest.mark.parametrize("size", [32, 64, 512])
def test_resize_matches_pytorch_bilinear(size):
  x = np.random.default_rng(5).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  resize = _torch_bilinear_1d(size, 299)
  expected = np.einsum("ah,bw,hwc->abc", resize, resize, x[0], optimize=True)
  out = np.asarray(inception.resize_to_input(x))
  np.testing.assert_allclose(out[0], expected, atol=1e-4)  # float32 sums of up to 4 taps


def test_missing_weights_say_where_to_get_and_how_to_convert(tmp_path):
  path = str(tmp_path / "absent.npz")
  with pytest.raises(UserError) as error:
    inception.load_inception(path)
  message = str(error.value)
  assert inception.WEIGHTS_URL in message
  assert "scripts/convert_inception_weights.py" in message
  assert inception.FID_WEIGHTS_ENV in message
  assert path in message


def test_default_path_follows_the_environment(monkeypatch):
  monkeypatch.setenv(inception.FID_WEIGHTS_ENV, "/somewhere/w.npz")
  assert inception.default_weights_path() == "/somewhere/w.npz"
  monkeypatch.delenv(inception.FID_WEIGHTS_ENV)
  assert inception.default_weights_path() == os.path.expanduser(
    "~/.cache/gan/pt_inception-2015-12-05-6726825d.npz"
  )


@pytest.mark.slow
def test_a_missing_key_is_named(tmp_path):
  arrays = dict(_state_dict())
  del arrays["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  path = str(tmp_path / "w.npz")
  inception.write_weights(arrays, path)
  with pytest.raises(UserError, match=r"Mixed_6c\.branch7x7dbl_3\.bn\.running_var"):
    inception.load_inception_model(path)


@pytest.mark.slow
def test_a_misshaped_key_is_named(tmp_path):
  arrays = dict(_state_dict())
  arrays["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)
  path = str(tmp_path / "w.npz")
  inception.write_weights(arrays, path)
  with pytest.raises(UserError, match=r"Mixed_7b\.branch3x3_2a\.conv\.weight"):
    inception.load_inception_model(path)


class _FakeTensor:
  def __init__(self, array):
    self._array = array

  def detach(self):
    return self

  def numpy(self):
    return self._array


@pytest.mark.slow
def test_converter_writes_the_state_dict_as_a_loadable_npz(tmp_path, monkeypatch):
  pth, out = tmp_path / "w.pth", tmp_path / "out" / "w.npz"
  pth.write_bytes(b"")
  fake_torch = types.SimpleNamespace(
    load=lambda path, map_location, weights_only: {
      k: _FakeTensor(v) for k, v in _state_dict().items()
    }
  )
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  spec = importlib.util.spec_from_file_location(
    "convert_inception_weights", "scripts/convert_inception_weights.py"
  )
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  flags.FLAGS(["convert", f"--pth={pth}", f"--out={out}"])
  try:
    script.main(["convert"])
  finally:
    # Other tests may load scripts that define the same flag names.
    for name in ("pth", "out"):
      delattr(flags.FLAGS, name)
  with np.load(out, allow_pickle=False) as saved:
    assert set(saved.files) == set(_state_dict())
    np.testing.assert_array_equal(
      saved["Mixed_5b.branch1x1.conv.weight"], _state_dict()["Mixed_5b.branch1x1.conv.weight"]
    )
