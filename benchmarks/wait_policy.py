"""`scripts/benchmark.py --vs-pytorch` once per OpenMP wait policy, and the comparison with
PyTorch at its best.

GNU OpenMP reads OMP_WAIT_POLICY once per process, when the first library that uses it loads,
and PyTorch and gan_cpu_kernels then share that one library (the same soname), so the policy is
the process's, for both sides. PyTorch's speed depends on it: PASSIVE (idle threads sleep at once)
helps it on a loaded machine and slows it on a quiet one, where the default (unset: idle threads
spin a while, GOMP_SPINCOUNT, before they sleep) is faster. So the parent runs the whole
comparison in a fresh child process per policy (`POLICIES`) and compares our speed with the
faster PyTorch of the two: for each comparison, the lower of our speed-ups.
"""

import copy
import importlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from absl import logging

# "unset" is OpenMP's default: the variable absent from the child's environment.
POLICIES = ("PASSIVE", "unset")
# Set in a child's environment to the policy it runs under; the parent has none.
CHILD_VARIABLE = "GAN_BENCHMARK_OMP_WAIT_POLICY"


def current_policy() -> str:
  """OMP_WAIT_POLICY as this process's environment holds it now, or "unset"."""
  return os.environ.get("OMP_WAIT_POLICY", "unset")


def child_environment(environment: Mapping[str, str], policy: str) -> dict[str, str]:
  """`environment` for a child that runs under `policy`: OMP_WAIT_POLICY set to it, or removed
  for "unset", and CHILD_VARIABLE naming it."""
  if policy not in POLICIES:
    raise ValueError(f"unknown OpenMP wait policy {policy!r}; one of {POLICIES}")
  child = {k: v for k, v in environment.items() if k != "OMP_WAIT_POLICY"}
  if policy != "unset":
    child["OMP_WAIT_POLICY"] = policy
  child[CHILD_VARIABLE] = policy
  return child


def load_openmp(policy: str) -> None:
  """In a child: imports torch, which loads GNU OpenMP under `policy`, before gan_cpu_kernels
  can load it (that package sets PASSIVE when the variable is unset, for its own use).

  Raises:
    RuntimeError: when OpenMP may already be loaded, or the environment is not `policy`'s.
  """
  if "gan_cpu_kernels" in sys.modules or "torch" in sys.modules:
    raise RuntimeError("OpenMP may already be loaded: its wait policy can no longer be chosen")
  if current_policy() != policy:
    raise RuntimeError(f"OMP_WAIT_POLICY is {current_policy()}, not the child's {policy}")
  importlib.import_module("torch")


def run_children(command: Sequence[str]) -> dict[str, str]:
  """Runs `command` (the script with the parent's flags) once per policy, one after the other,
  each in a fresh process with child_environment(); their messages go to our stderr.

  Returns:
    Each policy's stdout (the child's JSON report).

  Raises:
    subprocess.CalledProcessError: when a child fails (it has said why on stderr).
  """
  outputs = {}
  for policy in POLICIES:
    logging.info("The comparison with OMP_WAIT_POLICY %s, in a fresh process", policy)
    result = subprocess.run(
      list(command),
      stdout=subprocess.PIPE,
      text=True,
      check=True,
      env=child_environment(os.environ, policy),
    )
    outputs[policy] = result.stdout
  return outputs


def speedups(report: Mapping) -> dict[str, float]:
  """Our speed-ups over PyTorch in one child's report: side by side (the median over the pairs
  of blocks) and sequential, against PyTorch's fp32 and bf16."""
  pytorch = report["pytorch"]
  return {
    "interleaved": pytorch["interleaved"]["speedup_median"],
    "sequential_fp32": pytorch["jax_speedup_over_fp32"],
    "sequential_bf16": pytorch["jax_speedup_over_bf16"],
  }


def merge(reports: Mapping[str, Mapping]) -> dict:
  """One report from the children's, by policy.

  Returns:
    The report of the child in which PyTorch did best side by side (its `omp_wait_policy` says
    which), with, under `pytorch`: `by_omp_wait_policy` (each child's PyTorch report and our
    step images/s beside it), `speedup_vs_pytorch_best` (for each comparison of `speedups`, the
    lower of our speed-ups over the policies: against PyTorch at its best) and
    `pytorch_best_omp_wait_policy` (the policy that gave it).
  """
  reports = copy.deepcopy(dict(reports))
  by_policy = {policy: speedups(report) for policy, report in reports.items()}
  best_policy = {
    comparison: min(by_policy, key=lambda policy, c=comparison: by_policy[policy][c])
    for comparison in by_policy[next(iter(by_policy))]
  }
  merged = copy.deepcopy(reports[best_policy["interleaved"]])
  merged["pytorch"]["by_omp_wait_policy"] = {
    policy: {"jax_step_images_per_second": report["step_images_per_second"], **report["pytorch"]}
    for policy, report in reports.items()
  }
  merged["pytorch"]["speedup_vs_pytorch_best"] = {
    comparison: by_policy[policy][comparison] for comparison, policy in best_policy.items()
  }
  merged["pytorch"]["pytorch_best_omp_wait_policy"] = best_policy
  return merged
