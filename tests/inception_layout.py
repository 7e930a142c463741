"""pytorch-fid's Inception state-dict layout, written out for the tests, with random weights."""

import functools

import numpy as np


def basic_convs() -> list[tuple[str, int, int, int, int]]:
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
def random_state_dict(seed: int = 0, scale: int = 1) -> dict[str, np.ndarray]:
  """A state dict with pytorch-fid's keys and shapes, filled with small random values.

  He-scaled kernels and unit-ish BatchNorm statistics keep activations O(1) through the network.
  `scale` > 1 divides every channel count by it (rounding up): the key layout, small shapes.
  """
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, cin, cout, kh, kw in basic_convs():
    cin, cout = -(-cin // scale), -(-cout // scale)
    fan_in = cin * kh * kw
    arrays[f"{name}.conv.weight"] = (
      rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2 / fan_in)
    ).astype(np.float32)
    arrays[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    arrays[f"{name}.bn.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    arrays[f"{name}.bn.running_mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
    arrays[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    arrays[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
  arrays["fc.weight"] = rng.normal(0, 0.01, (-(-1008 // scale), -(-2048 // scale)))
  arrays["fc.weight"] = arrays["fc.weight"].astype(np.float32)
  arrays["fc.bias"] = np.zeros(-(-1008 // scale), np.float32)
  return arrays
