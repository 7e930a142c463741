"""The FID Inception network: pytorch-fid's weights found, fetched and loaded; the forward pass."""

import hashlib
import http.server
import os
import socket
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from inception_layout import basic_convs, random_state_dict
from torch_files import pth_bytes, write_pth

from gan.errors import UserError
from gan.metrics import inception, pth

pytestmark = pytest.mark.xdist_group("test_inception")  # its tests share runs: one worker


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "weights.pth")
  write_pth(path, random_state_dict())
  return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pytorch_fids_key_layout_reads_back_exactly(tmp_path, legacy):
  # pytorch-fid's file is a flat OrderedDict of these 566 names; small shapes keep it quick.
  arrays = random_state_dict(scale=16)
  path = tmp_path / "small.pth"
  write_pth(path, arrays, legacy=legacy)
  read = pth.read_state_dict(str(path))
  assert list(read) == list(arrays) and len(read) == 94 * 6 + 2
  for name, array in arrays.items():
    assert read[name].dtype == array.dtype, name
    np.testing.assert_array_equal(read[name], array, err_msg=name)


def test_the_state_dict_table_has_pytorch_fids_parameter_count():
  # torchvision's inception_v3 has 27,161,264 parameters; less AuxLogits (3,326,696) and with
  # the TF graph's 1008-way fc instead of 1000-way (+16,392) that is pytorch-fid's network.
  arrays = random_state_dict()
  trainable = sum(
    a.size for k, a in arrays.items() if not k.endswith(("running_mean", "running_var", "tracked"))
  )
  assert len(basic_convs()) == 94
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
  weight = random_state_dict()["Conv2d_1a_3x3.conv.weight"]  # OIHW
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


def test_the_weights_hash_begins_with_the_digits_in_the_file_name():
  assert len(inception.WEIGHTS_SHA256) == 64 and int(inception.WEIGHTS_SHA256, 16) >= 0
  assert inception.WEIGHTS_SHA256.startswith("6726825d")
  assert inception.WEIGHTS_URL.endswith("/" + inception.WEIGHTS_FILE)


def _no_named_weights(monkeypatch, home) -> str:
  """Leaves the weights to the cache in `home`; returns where they are kept."""
  monkeypatch.delenv(inception.FID_WEIGHTS_ENV, raising=False)
  monkeypatch.setenv("HOME", str(home))
  return os.path.join(home, ".cache", "gan", inception.WEIGHTS_FILE)


@pytest.fixture
def server(tmp_path, monkeypatch):
  """A web server on 127.0.0.1 serving tmp_path/site; WEIGHTS_URL points into it."""
  site = tmp_path / "site"
  site.mkdir()
  requests = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(site), **kwargs)

    def do_GET(self):
      requests.append(self.path)
      super().do_GET()

    def log_message(self, *args):
      del args  # keep the test output clean

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv("no_proxy", "127.0.0.1")
  url = f"http://127.0.0.1:{httpd.server_address[1]}/{inception.WEIGHTS_FILE}"
  monkeypatch.setattr(inception, "WEIGHTS_URL", url)
  yield site, requests
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def _small_weights() -> bytes:
  return pth_bytes(random_state_dict(scale=16), legacy=True)


def test_first_use_downloads_checks_and_keeps_the_weights(tmp_path, monkeypatch, server):
  site, requests = server
  data = _small_weights()
  (site / inception.WEIGHTS_FILE).write_bytes(data)
  monkeypatch.setattr(inception, "WEIGHTS_SHA256", hashlib.sha256(data).hexdigest())
  cached = _no_named_weights(monkeypatch, tmp_path / "home")
  path, sha256 = inception.resolve_weights()
  assert (path, sha256) == (cached, inception.WEIGHTS_SHA256)
  with open(cached, "rb") as f:
    assert f.read() == data
  assert os.listdir(os.path.dirname(cached)) == [inception.WEIGHTS_FILE]  # no partial file
  assert inception.resolve_weights() == (cached, sha256)  # the second use finds them
  assert len(requests) == 1
  assert list(pth.read_state_dict(path)) == list(random_state_dict(scale=16))


def test_a_download_with_another_hash_is_refused_and_not_kept(tmp_path, monkeypatch, server):
  site, _ = server
  (site / inception.WEIGHTS_FILE).write_bytes(_small_weights())  # not pytorch-fid's bytes
  cached = _no_named_weights(monkeypatch, tmp_path / "home")
  with pytest.raises(UserError) as error:
    inception.resolve_weights()
  message = str(error.value)
  assert "\n" not in message
  assert inception.WEIGHTS_SHA256 in message and inception.WEIGHTS_URL in message
  assert cached in message and "nothing was kept" in message
  assert os.listdir(os.path.dirname(cached)) == []


def test_a_missing_file_on_the_server_says_what_to_fetch(tmp_path, monkeypatch, server):
  cached = _no_named_weights(monkeypatch, tmp_path / "home")
  with pytest.raises(UserError, match="404") as error:
    inception.resolve_weights()
  assert cached in str(error.value) and os.listdir(os.path.dirname(cached)) == []


def test_without_network_one_line_names_the_url_the_hash_and_the_place(tmp_path, monkeypatch):
  with socket.socket() as probe:  # a port nothing listens on
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  monkeypatch.setenv("no_proxy", "127.0.0.1")
  url = f"http://127.0.0.1:{port}/{inception.WEIGHTS_FILE}"
  monkeypatch.setattr(inception, "WEIGHTS_URL", url)
  cached = _no_named_weights(monkeypatch, tmp_path / "home")
  with pytest.raises(UserError) as error:
    inception.load_inception()
  message = str(error.value)
  assert "\n" not in message
  for part in (url, inception.WEIGHTS_SHA256, cached, inception.FID_WEIGHTS_ENV):
    assert part in message
  assert not os.path.exists(cached)


def test_cached_weights_with_another_hash_are_refused(tmp_path, monkeypatch):
  cached = _no_named_weights(monkeypatch, tmp_path / "home")
  os.makedirs(os.path.dirname(cached))
  with open(cached, "wb") as f:
    f.write(b"half a download")
  with pytest.raises(UserError, match="delete it to download them again") as error:
    inception.resolve_weights()
  assert "\n" not in str(error.value) and inception.WEIGHTS_SHA256 in str(error.value)


def test_named_weights_are_used_as_they_are_with_a_warning(tmp_path, monkeypatch, caplog):
  path = tmp_path / "mine.pth"
  path.write_bytes(_small_weights())
  monkeypatch.setenv(inception.FID_WEIGHTS_ENV, str(path))
  assert inception.resolve_weights() == (str(path), hashlib.sha256(path.read_bytes()).hexdigest())
  assert "not pytorch-fid's" in caplog.text
  other = tmp_path / "other.pth"
  other.write_bytes(_small_weights())
  assert inception.resolve_weights(str(other))[0] == str(other)  # the argument comes first


@pytest.mark.parametrize("name", ["absent.pth", "converted.npz"])
def test_named_weights_that_are_missing_or_an_npz_are_one_line(tmp_path, monkeypatch, name):
  path = tmp_path / name
  if name.endswith(".npz"):
    np.savez(path, x=np.zeros(1))
  monkeypatch.setenv(inception.FID_WEIGHTS_ENV, str(path))
  with pytest.raises(UserError) as error:
    inception.resolve_weights()
  message = str(error.value)
  assert "\n" not in message and str(path) in message and inception.WEIGHTS_URL in message


@pytest.mark.slow
def test_a_missing_key_is_named(tmp_path):
  arrays = dict(random_state_dict())
  del arrays["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  path = str(tmp_path / "w.pth")
  write_pth(path, arrays)
  with pytest.raises(UserError, match=r"Mixed_6c\.branch7x7dbl_3\.bn\.running_var"):
    inception.load_inception_model(path)


@pytest.mark.slow
def test_a_misshaped_key_is_named(tmp_path):
  arrays = dict(random_state_dict())
  arrays["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)
  path = str(tmp_path / "w.pth")
  write_pth(path, arrays)
  with pytest.raises(UserError, match=r"Mixed_7b\.branch3x3_2a\.conv\.weight"):
    inception.load_inception_model(path)
