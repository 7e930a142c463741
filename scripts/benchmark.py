"""Measures training speed on this machine and prints it as one JSON object.

    python scripts/benchmark.py --config=configs/dcgan.py [--config.train.batch_size=64] \
        [--repeats=3] [--steps=5] [--loop_steps=100] [--vs-pytorch]

Times the compile and the steps of the trainer's jitted train step on one fixed batch, the
FLOP/s it reaches against the best of a float32 matmul here, and the input pipeline on its own;
--loop_steps also runs the trainer and reports its time to the first step and what the loop adds.
--vs-pytorch also times the same networks and train step in PyTorch (benchmarks/pytorch_*.py),
in float32 and with bfloat16 autocast, each after ours; and, in the config's precision, its
blocks of steps alternating with ours (`pytorch.interleaved`), which a shared machine's drifting
speed affects alike. It does so twice, each time in a fresh process of this script, under
OMP_WAIT_POLICY=PASSIVE and with the variable unset (OpenMP's default), and compares ours with
PyTorch at its best (`pytorch.speedup_vs_pytorch_best`; benchmarks/wait_policy.py says why).
It needs `pip install torch==2.13.0` (the CPU build). `omp_wait_policy` records the policy.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys

from absl import flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is not part of the installed package

from benchmarks import speed, wait_policy  # noqa: E402
from gan import cli, models  # noqa: E402
from gan.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file, e.g. configs/dcgan.py or configs/dense.py:smoke.",
  lock_config=True,
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed blocks of steps; the median one counts.")
_STEPS = flags.DEFINE_integer("steps", 5, "Train steps in each timed block.")
_INPUT_BATCHES = flags.DEFINE_integer(
  "input_batches", 20, "Batches the input pipeline is timed over, after its first; 0 skips it."
)
_LOOP_STEPS = flags.DEFINE_integer(
  "loop_steps",
  0,
  "Also run the trainer this many steps on the config's data (checkpoints and evaluations "
  "halfway and at the end) and report what the loop adds to the step; 0 skips it.",
)
_VS_PYTORCH = flags.DEFINE_bool(
  "vs-pytorch", False, "Also time the same networks and train step in PyTorch."
)
flags.mark_flags_as_required(["config"])


def _check_pytorch(family: str) -> None:
  if family not in models.MODEL_NAMES:
    raise UserError(
      f"Unknown model.name {family!r}; choose one of {', '.join(models.MODEL_NAMES)}."
    )
  if importlib.util.find_spec("torch") is None:
    raise UserError(
      "--vs-pytorch needs PyTorch, which is not installed: pip install torch==2.13.0 "
      "(the CPU build)"
    )


def _pytorch_twin(config):
  """benchmarks/pytorch_<config.model.name>.py."""
  return importlib.import_module(f"benchmarks.pytorch_{config.model.name}")


def _pytorch_block(config):
  """The PyTorch twin's block of --steps train steps in the config's precision (bf16 autocast
  for model.dtype=bfloat16), to alternate with ours."""
  twin = _pytorch_twin(config)
  torch = importlib.import_module("torch")
  twin.pytorch_common.set_threads()
  torch.manual_seed(config.train.seed)
  autocast = torch.bfloat16 if config.model.dtype == "bfloat16" else None
  return twin.step_block(config.to_dict(), steps=_STEPS.value, autocast_dtype=autocast)


def _time_pytorch(config, jax_images_per_second: float) -> dict:
  """The PyTorch twin's report for config.model.name, with our speed-up over it."""
  twin = _pytorch_twin(config)
  logging.info("Timing the PyTorch twin of %s", config.model.name)
  report = twin.benchmark(config.to_dict(), repeats=_REPEATS.value, steps=_STEPS.value)
  for precision in ("fp32", "bf16"):
    report[f"jax_speedup_over_{precision}"] = (
      jax_images_per_second / report[f"images_per_second_{precision}"]
    )
  return report


def _measure(config, policy: str | None) -> dict:
  """This process's report. With --vs-pytorch (in a child, under OpenMP wait policy `policy`),
  PyTorch's beside ours."""
  versus = None
  if _VS_PYTORCH.value:
    wait_policy.load_openmp(policy)  # before our side can load OpenMP
    versus = _pytorch_block(config)
  report = {
    "config": config_flags.get_config_filename(flags.FLAGS["config"]),
    "overrides": config_flags.get_override_values(flags.FLAGS["config"]),
  }
  # stdout is for the JSON alone; TFDS prints as it prepares a dataset.
  with contextlib.redirect_stdout(sys.stderr):
    report.update(
      speed.run(
        config,
        repeats=_REPEATS.value,
        steps=_STEPS.value,
        input_batches=_INPUT_BATCHES.value,
        loop_steps=_LOOP_STEPS.value,
        versus=versus,
      )
    )
    if _VS_PYTORCH.value:
      interleaved = report.pop("interleaved")
      report["pytorch"] = _time_pytorch(config, report["step_images_per_second"])
      report["pytorch"]["interleaved"] = {"dtype": config.model.dtype, **interleaved}
  # Without --vs-pytorch, gan_cpu_kernels (when it ran) set the variable before loading OpenMP.
  report["omp_wait_policy"] = policy or wait_policy.current_policy()
  return report


def _compare_both_ways() -> dict:
  """--vs-pytorch: this script with the same flags in a child per OpenMP wait policy, merged."""
  command = [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
  try:
    outputs = wait_policy.run_children(command)
  except subprocess.CalledProcessError as e:
    sys.exit(e.returncode)  # the child has said why on stderr
  return wait_policy.merge({policy: json.loads(out) for policy, out in outputs.items()})


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  child_policy = os.environ.get(wait_policy.CHILD_VARIABLE)
  if _VS_PYTORCH.value:
    _check_pytorch(config.model.name)  # before a whole JAX benchmark, not after it
    if child_policy is None:
      print(json.dumps(_compare_both_ways(), indent=2))
      return
  print(json.dumps(_measure(config, child_policy if _VS_PYTORCH.value else None), indent=2))


if __name__ == "__main__":
  cli.run(main)
