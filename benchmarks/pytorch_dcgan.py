"""gan/models/dcgan.py in PyTorch: the same DCGAN, parameter for parameter, and its train step.

G: z -> Linear (no bias) to 4x4x(base_width * R/8) -> BN -> ReLU, then ConvTranspose2d(k4, s2,
p1, no bias) -> BN -> ReLU halving the width up to R/2, then ConvTranspose2d to 3 channels (with
bias) and tanh. D: Conv2d(k4, s2, p1) 3 -> base_width, LeakyReLU(0.2); Conv2d(k4, s2, p1, no
bias) -> BN -> LeakyReLU(0.2) doubling the width down to 4x4; a 4x4 valid Conv2d to one logit.
BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5), DCGAN init: weights N(0, 0.02), BN
scales N(1, 0.02), biases 0. Images are NCHW, PyTorch's default layout.
"""

from collections.abc import Callable, Mapping

from torch import nn

from benchmarks import pytorch_common


def _init(module: nn.Module) -> None:
  if isinstance(module, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
    nn.init.normal_(module.weight, 0.0, 0.02)
  elif isinstance(module, nn.BatchNorm2d):
    nn.init.normal_(module.weight, 1.0, 0.02)
  else:
    return
  if module.bias is not None:
    nn.init.zeros_(module.bias)


def _num_doublings(resolution: int) -> int:
  return resolution.bit_length() - 3


class Generator(nn.Module):
  def __init__(self, latent_dim: int, resolution: int, base_width: int):
    super().__init__()
    width = base_width * resolution // 8
    self.start_width = width
    self.project = nn.Linear(latent_dim, 4 * 4 * width, bias=False)
    self.project_norm = nn.BatchNorm2d(width)
    blocks = []
    for _ in range(_num_doublings(resolution) - 1):
      blocks += [
        nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(width // 2),
        nn.ReLU(),
      ]
      width //= 2
    self.ups = nn.Sequential(*blocks, nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Tanh())
    self.apply(_init)

  def forward(self, z):
    x = self.project(z).view(z.shape[0], self.start_width, 4, 4)
    return self.ups(nn.functional.relu(self.project_norm(x)))


class Discriminator(nn.Module):
  def __init__(self, resolution: int, base_width: int):
    super().__init__()
    width = base_width
    layers = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
    for _ in range(_num_doublings(resolution) - 1):
      layers += [
        nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.LeakyReLU(0.2),
      ]
      width *= 2
    self.layers = nn.Sequential(*layers, nn.Conv2d(width, 1, 4))
    self.apply(_init)

  def forward(self, x):
    return self.layers(x).view(x.shape[0])


def build(config: Mapping) -> tuple[Generator, Discriminator]:
  """(generator, discriminator) for a configs/dcgan.py config (a nested mapping)."""
  model, resolution = config["model"], config["data"]["resolution"]
  return (
    Generator(model["latent_dim"], resolution, model["base_width"]),
    Discriminator(resolution, model["base_width"]),
  )


def benchmark(config: Mapping, *, repeats: int, steps: int) -> dict:
  """Images per second of the train step in float32 and bfloat16 autocast; see pytorch_common."""
  return pytorch_common.benchmark(build, config, repeats=repeats, steps=steps)


def step_block(config: Mapping, *, steps: int, autocast_dtype=None) -> Callable[[], None]:
  """A block of `steps` train steps that waits for its results; see pytorch_common."""
  return pytorch_common.step_block(build, config, steps=steps, autocast_dtype=autocast_dtype)
