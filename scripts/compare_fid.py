"""Checks our FID and Inception features against pytorch-fid's, on the same two image folders.

    pip install torch torchvision pytorch-fid  # only this check needs them
    python scripts/compare_fid.py --real=DIR --fake=DIR [--num_feature_images=8] [--device=cpu]

Both sides use one weights file, found as evaluation finds it ($GAN_INCEPTION_WEIGHTS, else
~/.cache/gan, downloaded and checked on first use); pytorch-fid loads it with torch.load instead
of fetching its own copy of the same file. Each folder's images (the ones pytorch-fid would take:
its extensions, not recursive, all of one size) go through our network, and the folders through
pytorch-fid's own pipeline; the first few images go through both networks as arrays. Prints one
JSON object and exits 1 unless: our reader and torch.load read the same arrays from the weights,
the FIDs agree within --fid_rtol (0.1%), and the pool3 features of the first
--num_feature_images real images agree within --feature_atol (1e-4). docs/metrics.md says more.
"""

import importlib
import json
import os

from absl import flags

from gan import cli
from gan.errors import UserError

_REAL = flags.DEFINE_string("real", None, "A folder of images.", required=True)
_FAKE = flags.DEFINE_string("fake", None, "Another folder of images.", required=True)
_NUM_FEATURE_IMAGES = flags.DEFINE_integer(
  "num_feature_images", 8, "Images of --real whose features are compared one by one."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 50, "Images per forward pass, on both sides.")
_DEVICE = flags.DEFINE_string("device", "cpu", "PyTorch's device, e.g. cpu or cuda.")
_FID_RTOL = flags.DEFINE_float("fid_rtol", 1e-3, "Largest relative FID difference that passes.")
_FEATURE_ATOL = flags.DEFINE_float("feature_atol", 1e-4, "Largest feature difference that passes.")

# pytorch-fid's image extensions (fid_score.IMAGE_EXTENSIONS).
_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def _images(folder: str):
  """The folder's images as float32 [N, H, W, 3] in [0, 1], as pytorch-fid's loader reads them."""
  import numpy as np
  from PIL import Image

  folder = os.path.expanduser(folder)
  if not os.path.isdir(folder):
    raise UserError(f"no such folder: {folder}")
  names = sorted(n for n in os.listdir(folder) if n.rpartition(".")[2] in _EXTENSIONS)
  if len(names) < 2:
    raise UserError(f"{folder} holds {len(names)} images; FID needs at least 2")
  images = [np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names]
  if len({image.shape for image in images}) > 1:
    raise UserError(f"the images in {folder} differ in size; pytorch-fid batches need one size")
  return np.stack(images).astype(np.float32) / 255


def _import_pytorch_fid():
  """torch and pytorch-fid's fid_score and inception modules."""
  try:
    return [
      importlib.import_module(name)
      for name in ("torch", "pytorch_fid.fid_score", "pytorch_fid.inception")
    ]
  except ImportError as e:
    raise UserError(
      f"this check needs PyTorch and pytorch-fid ({e}): pip install torch torchvision pytorch-fid"
    ) from None


def _their_network(torch, fid_inception, weights: str):
  """pytorch-fid's network (pool3 output), with the weights at `weights`."""
  # pytorch-fid fetches FID_WEIGHTS_URL into torch.hub's cache; the same file is here already.
  fid_inception.load_state_dict_from_url = lambda url, **kwargs: torch.load(
    weights, map_location="cpu", weights_only=True
  )
  model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  return model.to(_DEVICE.value).eval()


def _their_features(torch, model, images):
  """pytorch-fid's pool3 features [N, 2048] of images [N, H, W, 3] in [0, 1]."""
  import numpy as np

  out = []
  for start in range(0, len(images), _BATCH_SIZE.value):
    batch = torch.from_numpy(images[start : start + _BATCH_SIZE.value].transpose(0, 3, 1, 2))
    with torch.no_grad():
      out.append(model(batch.to(_DEVICE.value))[0][:, :, 0, 0].cpu().numpy())
  return np.concatenate(out)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  import numpy as np

  from gan.metrics import fid, inception, pth

  torch, fid_score, fid_inception = _import_pytorch_fid()
  weights, sha256 = inception.resolve_weights()
  model = _their_network(torch, fid_inception, weights)
  ours_weights = pth.read_state_dict(weights)
  theirs_weights = torch.load(weights, map_location="cpu", weights_only=True)
  same_weights = list(ours_weights) == list(theirs_weights) and all(
    np.array_equal(ours_weights[k], theirs_weights[k].numpy()) for k in ours_weights
  )

  features = inception.load_inception(weights, batch_size=_BATCH_SIZE.value)
  real, fake = _images(_REAL.value), _images(_FAKE.value)
  ours = fid.frechet_distance(
    *fid.feature_statistics(features(2 * real - 1)),
    *fid.feature_statistics(features(2 * fake - 1)),
  )
  # pytorch-fid's own pipeline, from the file names on: its loader, network and statistics.
  stats = [
    fid_score.compute_statistics_of_path(
      os.path.expanduser(folder), model, _BATCH_SIZE.value, 2048, _DEVICE.value
    )
    for folder in (_REAL.value, _FAKE.value)
  ]
  theirs = float(fid_score.calculate_frechet_distance(*stats[0], *stats[1]))
  few = real[: _NUM_FEATURE_IMAGES.value]
  feature_diff = float(np.max(np.abs(features(2 * few - 1) - _their_features(torch, model, few))))
  relative = abs(ours - theirs) / max(abs(theirs), 1e-12)
  passed = same_weights and relative <= _FID_RTOL.value and feature_diff <= _FEATURE_ATOL.value
  report = {
    "weights": weights,
    "weights_sha256": sha256,
    "weights_read_identically": same_weights,
    "num_real": len(real),
    "num_fake": len(fake),
    "fid": ours,
    "fid_pytorch_fid": theirs,
    "fid_relative_difference": relative,
    "num_feature_images": len(few),
    "feature_max_abs_difference": feature_diff,
    "passed": passed,
  }
  print(json.dumps(report, indent=1))
  return 0 if passed else 1


if __name__ == "__main__":
  cli.run(main)
