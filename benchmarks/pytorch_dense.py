"""gan/models/dense.py in PyTorch: the same multilayer perceptrons, parameter for parameter.

G: z -> [Linear -> norm -> activation] per g_width -> Linear to R*R*3 -> tanh -> reshape.
D: flatten -> [Linear -> norm -> LeakyReLU(0.2) -> Dropout] per d_width -> Linear to one logit.
A Linear followed by BatchNorm has no bias. Norms as ours: BatchNorm with PyTorch's defaults
(momentum 0.1, eps 1e-5), LayerNorm with flax's eps 1e-6; GELU is the tanh approximation, as
jax.nn.gelu. Init as flax's default: LeCun normal (truncated) weights, zero biases.
"""

import math
from collections.abc import Callable, Mapping

from torch import nn

from benchmarks import pytorch_common

ACTIVATIONS = {
  "relu": nn.ReLU,
  "leaky_relu": lambda: nn.LeakyReLU(0.2),
  "gelu": lambda: nn.GELU(approximate="tanh"),
  "silu": nn.SiLU,
}
# flax's truncated normal draws within two standard deviations and rescales to unit variance.
_TRUNCATED_STD = 0.87962566103423978


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
  linear = nn.Linear(in_features, out_features, bias=bias)
  std = math.sqrt(1.0 / in_features) / _TRUNCATED_STD
  nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
  if bias:
    nn.init.zeros_(linear.bias)
  return linear


def _norm(kind: str, features: int) -> list[nn.Module]:
  if kind == "batch":
    return [nn.BatchNorm1d(features)]
  if kind == "layer":
    return [nn.LayerNorm(features, eps=1e-6)]
  return []


class Generator(nn.Module):
  def __init__(self, latent_dim, resolution, widths, activation, norm):
    super().__init__()
    self.resolution = resolution
    layers, in_features = [], latent_dim
    for width in widths:
      layers += [
        _linear(in_features, width, bias=norm != "batch"),
        *_norm(norm, width),
        ACTIVATIONS[activation](),
      ]
      in_features = width
    self.layers = nn.Sequential(*layers, _linear(in_features, resolution**2 * 3), nn.Tanh())

  def forward(self, z):
    return self.layers(z).view(z.shape[0], 3, self.resolution, self.resolution)


class Discriminator(nn.Module):
  def __init__(self, resolution, widths, norm, dropout):
    super().__init__()
    layers, in_features = [nn.Flatten()], resolution**2 * 3
    for width in widths:
      layers += [_linear(in_features, width), *_norm(norm, width), nn.LeakyReLU(0.2)]
      layers.append(nn.Dropout(dropout))
      in_features = width
    self.layers = nn.Sequential(*layers, _linear(in_features, 1))

  def forward(self, x):
    return self.layers(x).view(x.shape[0])


def build(config: Mapping) -> tuple[Generator, Discriminator]:
  """(generator, discriminator) for a configs/dense.py config (a nested mapping)."""
  model, resolution = config["model"], config["data"]["resolution"]
  return (
    Generator(
      model["latent_dim"], resolution, model["g_widths"], model["activation"], model["g_norm"]
    ),
    Discriminator(resolution, model["d_widths"], model["d_norm"], model["d_dropout"]),
  )


def benchmark(config: Mapping, *, repeats: int, steps: int) -> dict:
  """Images per second of the train step in float32 and bfloat16 autocast; see pytorch_common."""
  return pytorch_common.benchmark(build, config, repeats=repeats, steps=steps)


def step_block(config: Mapping, *, steps: int, autocast_dtype=None) -> Callable[[], None]:
  """A block of `steps` train steps that waits for its results; see pytorch_common."""
  return pytorch_common.step_block(build, config, steps=steps, autocast_dtype=autocast_dtype)
