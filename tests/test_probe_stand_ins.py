"""scripts/probe_stand_ins.py: the health probe's verdicts on stand-ins made from a folder of faces."""

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from gan.data import synthetic_faces


def _folder(path, num: int, seed: int) -> str:
  path.mkdir()
  images, _ = synthetic_faces.render(num, 32, seed)
  for i, pixels in enumerate(images):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path / f"{i:03d}.png")
  return str(path)


def _table(stdout: str) -> dict[str, list[str]]:
  rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
  return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


_SMALL = [
  "--config=configs/dcgan.py:synthetic",
  "--config.data.source=image_folder",
  "--config.collapse.num_samples=64",
  "--config.collapse.num_pairs=64",
  "--config.collapse.ndb_bins=8",
]


@pytest.mark.slow
def test_varied_faces_pass_and_one_face_repeated_is_suspect(tmp_path):
  real, faces = _folder(tmp_path / "real", 96, seed=0), _folder(tmp_path / "faces", 96, seed=1)
  result = run_script(
    "probe_stand_ins.py",
    *_SMALL,
    f"--config.data.path={real}",
    f"--faces_path={faces}",
    "--draws=2",
    "--layouts=1,32",
  )
  assert result.returncode == 0, result.stderr
  table = _table(result.stdout)
  assert list(table) == [
    "distinct faces",
    "blurred (sigma 1 px)",
    "recoloured",
    "1 face x 64",
    "1 face x 64, recoloured",
    "32 faces x 2",
    "32 faces x 2, recoloured",
  ]
  assert table["distinct faces"][-1] == "2 healthy"
  _, duplicates, _, verdicts = table["1 face x 64"]
  assert (duplicates, verdicts) == ("100%", "2 suspect")
  assert table["32 faces x 2"][1] == "100%"  # each face twice: all near duplicates


@pytest.mark.slow
def test_more_layouts_than_samples_is_one_line(tmp_path):
  result = run_script("probe_stand_ins.py", *_SMALL, "--layouts=64")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
    "error: --layouts must lie in 1..63 (collapse.num_samples is 64)"
  )
