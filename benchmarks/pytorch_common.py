"""The train step of `gan.step.train_step` in PyTorch, and its timing, for the PyTorch twins.

One step is what ours does: `train.d_steps` discriminator updates on the real batch, each against
a fresh generated batch (G in train mode, its BatchNorm statistics updated, no gradient to G);
one generator update through D with fresh noise (no gradient to D's weights); Adam with the
config's learning rates and betas (eps 1e-8, as optax); the EMA of G's weights with the same
warm-up; and the same scalar metrics (losses, D's mean outputs, gradient and parameter norms).
One difference, which costs nothing measurable: D's BatchNorm running statistics also move in
the generator's pass, where ours discards them.

`config` is a nested mapping like `ConfigDict.to_dict()` of a configs/*.py config.
"""

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def _non_saturating(real, fake):
  return (F.softplus(-real) + F.softplus(fake)).mean(), F.softplus(-fake).mean()


def _hinge(real, fake):
  return (F.relu(1 - real) + F.relu(1 + fake)).mean(), -fake.mean()


def _least_squares(real, fake):
  return 0.5 * ((real - 1) ** 2 + fake**2).mean(), 0.5 * ((fake - 1) ** 2).mean()


# (D's loss, G's loss) from (real logits, fake logits), as gan/losses.py.
LOSSES = {"non_saturating": _non_saturating, "hinge": _hinge, "least_squares": _least_squares}


def count_params(module: nn.Module) -> int:
  """Trainable parameters; BatchNorm's running statistics are buffers, as ours are BatchStat."""
  return sum(p.numel() for p in module.parameters())


def _global_norm(tensors) -> torch.Tensor:
  return torch.nn.utils.get_total_norm(list(tensors))


class TrainStep:
  """Calls as `step(real)` -> metrics, updating the networks, optimisers and EMA in place."""

  def __init__(
    self,
    generator: nn.Module,
    discriminator: nn.Module,
    config: Mapping,
    autocast_dtype: torch.dtype | None = None,
  ):
    train = config["train"]
    self.device = next(generator.parameters()).device
    self.generator, self.discriminator = generator.train(), discriminator.train()
    self.latent_dim = config["model"]["latent_dim"]
    self.d_steps = train["d_steps"]
    self.batch_size = train["batch_size"]
    self.ema_kimg, self.ema_rampup = train["ema_kimg"], train["ema_rampup"]
    self.loss = LOSSES[train["loss"]]
    betas = (train["b1"], train["b2"])
    self.g_optimizer = torch.optim.Adam(generator.parameters(), lr=train["g_lr"], betas=betas)
    self.d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=train["d_lr"], betas=betas)
    self.g_params = list(generator.parameters())
    self.d_params = list(discriminator.parameters())
    self.ema_params = [p.detach().clone() for p in self.g_params]
    self.step = 0
    self.autocast_dtype = autocast_dtype

  def _autocast(self):
    if self.autocast_dtype is None:
      return contextlib.nullcontext()
    return torch.autocast(self.device.type, dtype=self.autocast_dtype)

  def _d_step(self, real: torch.Tensor) -> dict:
    z = torch.randn(real.shape[0], self.latent_dim, device=self.device)
    with torch.no_grad(), self._autocast():
      fake = self.generator(z)
    with self._autocast():
      real_logits = self.discriminator(real).float()
      fake_logits = self.discriminator(fake).float()
    d_loss = self.loss(real_logits, fake_logits)[0]
    self.d_optimizer.zero_grad()
    d_loss.backward()
    self.d_optimizer.step()
    return {
      "d_loss": d_loss.detach(),
      "d_real": torch.sigmoid(real_logits.detach()).mean(),
      "d_fake": torch.sigmoid(fake_logits.detach()).mean(),
      "d_grad_norm": _global_norm(p.grad for p in self.d_params),
    }

  def _g_step(self, batch_size: int) -> dict:
    z = torch.randn(batch_size, self.latent_dim, device=self.device)
    self.discriminator.requires_grad_(False)
    with self._autocast():
      logits = self.discriminator(self.generator(z)).float()
    g_loss = self.loss(torch.zeros_like(logits), logits)[1]
    self.g_optimizer.zero_grad()
    g_loss.backward()
    self.g_optimizer.step()
    self.discriminator.requires_grad_(True)
    return {"g_loss": g_loss.detach(), "g_grad_norm": _global_norm(p.grad for p in self.g_params)}

  def _ema_decay(self) -> float:
    """gan.step.ema_decay: a half-life of ema_kimg thousand images, ramped up."""
    if self.ema_kimg == 0:
      return 0.0
    half_life = self.ema_kimg * 1000
    if self.ema_rampup:
      half_life = min(half_life, self.step * self.batch_size * self.ema_rampup)
    return 0.5 ** (self.batch_size / max(half_life, 1e-8))

  def __call__(self, real: torch.Tensor) -> dict:
    for _ in range(self.d_steps):
      d_metrics = self._d_step(real)
    g_metrics = self._g_step(real.shape[0])
    self.step += 1
    decay = self._ema_decay()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema_params, self.g_params, 1.0 - decay)
      param_norms = {
        "g_param_norm": _global_norm(self.g_params),
        "d_param_norm": _global_norm(self.d_params),
      }
    return {**d_metrics, **g_metrics, **param_norms}


def set_threads() -> int:
  """Lets PyTorch use every core this process may run on, or OMP_NUM_THREADS when that is set;
  returns how many."""
  threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
  torch.set_num_threads(threads)
  return threads


def _device_report(device: torch.device) -> dict:
  if device.type != "cuda":
    return {"device": "cpu"}
  return {
    "device": torch.cuda.get_device_name(device),
    # PyTorch's defaults: float32 convolutions may use TF32 on the GPU's matrix units, float32
    # matmuls may not.
    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    "cudnn_benchmark": torch.backends.cudnn.benchmark,
  }


def _device() -> torch.device:
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  return device


def _synchronize(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def step_block(
  build: Callable[[Mapping], tuple[nn.Module, nn.Module]],
  config: Mapping,
  *,
  steps: int,
  autocast_dtype: torch.dtype | None,
) -> Callable[[], None]:
  """A block of `steps` train steps on one fixed batch, from freshly built networks after two
  warm-up steps, that waits for its results: for timing side by side with ours."""
  device = _device()
  batch_size, resolution = config["train"]["batch_size"], config["data"]["resolution"]
  real = (torch.rand(batch_size, 3, resolution, resolution) * 2 - 1).to(device)
  step = TrainStep(*(net.to(device) for net in build(config)), config, autocast_dtype)
  for _ in range(2):  # warm-up: first-call allocations and kernel choices
    step(real)

  def block() -> None:
    for _ in range(steps):
      step(real)
    _synchronize(device)

  return block


def benchmark(
  build: Callable[[Mapping], tuple[nn.Module, nn.Module]],
  config: Mapping,
  *,
  repeats: int,
  steps: int,
) -> dict:
  """Times `steps` train steps `repeats` times (after two warm-up steps) on one fixed batch, in
  float32 and with bfloat16 autocast, each from freshly built networks, on the GPU when there
  is one (with cuDNN's autotuner on, as for any fixed-shape training) and on the CPU otherwise.

  Returns:
    The device, parameter counts, threads, and per precision (fp32, bf16) the median seconds per
    step and images per second.
  """
  threads = set_threads()
  device = _device()
  torch.manual_seed(config["train"]["seed"])
  generator, discriminator = build(config)
  report = {
    "torch_version": torch.__version__,
    "threads": threads,
    **_device_report(device),
    "generator_params": count_params(generator),
    "discriminator_params": count_params(discriminator),
  }
  for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
    block = step_block(build, config, steps=steps, autocast_dtype=dtype)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      block()
      times.append((time.perf_counter() - start) / steps)
    seconds = statistics.median(times)
    report[f"step_seconds_median_{precision}"] = seconds
    report[f"images_per_second_{precision}"] = config["train"]["batch_size"] / seconds
  return report
