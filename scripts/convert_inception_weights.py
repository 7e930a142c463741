"""Converts pytorch-fid's Inception weights (.pth) to the .npz that `gan.metrics.inception` reads.

    pip install torch==2.13.0  # CPU is enough; only this script needs it
    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python scripts/convert_inception_weights.py --pth=pt_inception-2015-12-05-6726825d.pth \
        --out=~/.cache/gan/pt_inception-2015-12-05-6726825d.npz

Keys stay the state-dict keys and arrays keep PyTorch's layout; the loader transposes them. The
written file is loaded back into the network before the script reports success.
"""

import os

from absl import flags

from gan import cli
from gan.errors import UserError
from gan.metrics import inception

_PTH = flags.DEFINE_string("pth", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
_OUT = flags.DEFINE_string("out", None, "Where to write the .npz (default: the loader's path).")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _PTH.value:
    raise UserError(f"--pth is required; download it from {inception.WEIGHTS_URL}")
  pth = os.path.expanduser(_PTH.value)
  if not os.path.exists(pth):
    raise UserError(f"no such file: {pth}; download it from {inception.WEIGHTS_URL}")
  try:
    import torch  # here: only this script needs PyTorch
  except ImportError:
    raise UserError(
      "the converter needs PyTorch: pip install torch==2.13.0 (CPU is enough)"
    ) from None
  state_dict = torch.load(pth, map_location="cpu", weights_only=True)
  out = os.path.expanduser(_OUT.value or inception.default_weights_path())
  inception.write_weights({name: t.detach().numpy() for name, t in state_dict.items()}, out)
  inception.load_inception_model(out)
  print(f"wrote {len(state_dict)} arrays to {out}")


if __name__ == "__main__":
  cli.run(main)
