"""scripts/benchmark.py on a tiny config, its one-line error without PyTorch, the comparison run
once per OpenMP wait policy, and the PyTorch twins in benchmarks/ (those tests need torch, which
CI does not install)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, run_script, tiny_config

from benchmarks import speed, wait_policy
from configs import dcgan, dense
from gan import models, parallel
from gan import state as state_lib
from gan.errors import UserError

pytestmark = pytest.mark.xdist_group("test_benchmark")  # its tests share runs: one worker

# tiny_config("dcgan") as flags, with as few timed steps as give a median; the input pipeline
# is timed in-process (test_the_input_pipeline_is_timed_decoding_and_from_its_cache).
TINY_DCGAN = [
  "--config=configs/dcgan.py:smoke",
  "--config.train.batch_size=8",
  "--config.model.base_width=8",
  "--config.data.num_examples=128",
  "--repeats=2",
  "--steps=2",
  "--input_batches=0",
]
LOOP_STEPS = 4  # the shared report also runs the trainer for these steps
MEASUREMENTS = (
  "compile_seconds",
  "step_seconds_median",
  "step_images_per_second",
  "flops_per_step",
  "achieved_flops_per_second",
  "matmul_ceiling_flops_per_second",
  "fraction_of_ceiling",
)


@pytest.fixture(scope="session")  # once per worker, however the tests interleave
def report():
  result = run_script("benchmark.py", *TINY_DCGAN, f"--loop_steps={LOOP_STEPS}")
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)  # stdout holds the JSON object and nothing else


@pytest.mark.slow
def test_benchmark_prints_every_measurement_as_a_positive_finite_number(report):
  for name in MEASUREMENTS:
    value = report[name]
    assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
  assert report["fraction_of_ceiling"] == pytest.approx(
    report["achieved_flops_per_second"] / report["matmul_ceiling_flops_per_second"]
  )


@pytest.mark.slow
def test_the_report_records_the_openmp_wait_policy(report):
  # gan_cpu_kernels sets PASSIVE, when the variable is unset, before it loads OpenMP.
  default = "PASSIVE" if report["conv_impl"] == "onednn" else "unset"
  assert report["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", default)


@pytest.mark.slow
def test_the_ceiling_is_of_the_configs_compute_dtype(report):
  assert report["dtype"] == report["matmul_ceiling_dtype"] == "float32"
  bf16 = speed.matmul_ceiling(1, sizes=(64,), dtype=jnp.bfloat16)
  assert math.isfinite(bf16) and bf16 > 0


@pytest.mark.slow
def test_benchmark_describes_the_device_and_the_config(report):
  assert report["device"]["platform"] == "cpu" and report["device"]["count"] >= 1
  assert report["device"]["kind"]
  assert report["config"] == "configs/dcgan.py:smoke"
  assert report["conv_impl"] == models.resolve_conv_impl("auto", "float32")
  assert (report["model"], report["resolution"], report["batch_size"]) == ("dcgan", 32, 8)
  counts = speed.parameter_counts(tiny_config("dcgan"))
  assert (report["generator_params"], report["discriminator_params"]) == counts


def _tiny_dcgan_flops(dtype: str, conv_impl: str = "auto") -> float:
  config = tiny_config("dcgan", model__dtype=dtype, model__conv_impl=conv_impl)
  nets, state = state_lib.create_train_state(config, parallel.create_mesh(0))
  size, resolution = config.train.batch_size, config.data.resolution
  batch = {"image": jnp.zeros((size, resolution, resolution, 3)), "label": jnp.zeros(size, int)}
  return speed.count_flops(nets, config, (state, batch, jax.random.PRNGKey(0)))


@pytest.mark.slow
def test_the_flop_count_includes_the_convolutions_that_onednn_runs():
  if models.resolve_conv_impl("auto", "float32") != "onednn":
    pytest.skip("the CPU kernels do not run the layers here")
  config = tiny_config("dcgan", model__conv_impl="onednn")
  # D's k4-s2 convolutions on one batch, forward only: 3 -> w, then doubling down to 4 x 4.
  size, width, d_forward, side = config.train.batch_size, config.model.base_width, 0, 32
  for c_in, c_out in zip((3, width, 2 * width), (width, 2 * width, 4 * width), strict=True):
    side //= 2
    d_forward += 2 * size * side * side * 16 * c_in * c_out
  # A step runs them forward three times (real, fake, fake for G) and backward at least twice.
  assert _tiny_dcgan_flops("float32", "onednn") > 5 * d_forward


@pytest.mark.slow
def test_bf16_counts_the_flops_of_the_same_function_as_fp32():
  # Not the dot forms' (which compute a border of zeros too): only converts may add.
  assert _tiny_dcgan_flops("bfloat16") == pytest.approx(_tiny_dcgan_flops("float32"), rel=0.03)


def test_without_the_cache_the_pipeline_has_one_rate():
  config = tiny_config("dcgan", data__cache=False)
  rates = speed.time_input_pipeline(config, batches=2)
  assert rates["input_pipeline_images_per_second"] > 0
  assert rates["input_pipeline_cached_images_per_second"] is None


@pytest.mark.slow
def test_a_versus_block_alternates_with_ours_and_the_speedup_is_the_median_pair(monkeypatch):
  config = tiny_config("dcgan")
  versus_calls = []

  def versus():
    versus_calls.append(1)

  # Block seconds as a drifting machine might give them (2 steps per block): the pairs' ratios
  # are 2, 1 and 3, whose median (2) is not the ratio of the medians (0.4 / 0.3).
  fake_seconds = {"ours": iter([0.2, 0.4, 0.3]), "versus": iter([0.4, 0.4, 0.9])}
  order, median_seconds = [], speed.median_seconds

  def timed(block, repeats):
    side = "versus" if block is versus else "ours"
    order.append(side)
    median_seconds(block, repeats)  # the block still runs
    return next(fake_seconds[side])

  monkeypatch.setattr(speed, "median_seconds", timed)
  result = speed.time_train_step(config, repeats=3, steps=2, versus=versus)
  assert order == ["ours", "versus"] * 3
  assert len(versus_calls) == 6  # each timed block follows an untimed one
  assert result["step_seconds_median"] == pytest.approx(0.15)
  interleaved = result["interleaved"]
  assert interleaved["versus_step_seconds_median"] == pytest.approx(0.2)
  assert interleaved["versus_images_per_second"] == pytest.approx(config.train.batch_size / 0.2)
  assert interleaved["speedup_median"] == pytest.approx(2.0)
  monkeypatch.undo()
  assert "interleaved" not in speed.time_train_step(config, repeats=1, steps=1)


@pytest.mark.slow
def test_loop_steps_run_the_trainer_and_zero_input_batches_skip_the_pipeline(report):
  assert report["input_pipeline_images_per_second"] is None
  assert "--input_batches=0" in report["input_pipeline_error"]
  loop = report["loop"]
  assert loop["steps"] == LOOP_STEPS
  for name in ("first_step_seconds", "step_seconds", "evaluation_seconds", "checkpoint_seconds"):
    assert 0 < loop[name] < 600, (name, loop[name])
  # The overheads are projected onto the config's own intervals, not the loop's shorter ones.
  smoke = dcgan.get_config("smoke")
  step = report["step_seconds_median"]
  assert loop["host_overhead_fraction"] == pytest.approx(
    (loop["step_seconds"] + loop["checkpoint_seconds"] / smoke.checkpoint.every) / step - 1
  )
  assert loop["evaluation_overhead_fraction"] == pytest.approx(
    loop["evaluation_seconds"] / smoke.eval.every / step
  )


def test_the_input_pipeline_is_timed_decoding_and_from_its_cache():
  config = tiny_config("dcgan")
  config.data.cache = True
  rates = speed.time_input_pipeline(config, batches=2)
  for name in ("input_pipeline_images_per_second", "input_pipeline_cached_images_per_second"):
    assert math.isfinite(rates[name]) and rates[name] > 0, name


@pytest.mark.slow
@pytest.mark.parametrize("counts", [(0, 1, 1, 0), (1, 0, 1, 0), (1, 1, -1, 0), (1, 1, 1, -1)])
def test_counts_below_their_least_are_user_errors(counts):
  repeats, steps, input_batches, loop_steps = counts
  with pytest.raises(UserError, match="must be at least"):
    speed.run(
      tiny_config("dcgan"),
      repeats=repeats,
      steps=steps,
      input_batches=input_batches,
      loop_steps=loop_steps,
    )


@pytest.mark.parametrize(
  "analysis, flops",
  [
    ({"flops": 12.0, "bytes accessed": 3.0}, 12.0),
    ([{"flops": 12.0}], 12.0),
    ({"bytes accessed": 3.0}, None),
    ({"flops": -1.0}, None),
    ([], None),
    (None, None),
  ],
)
def test_flops_come_from_either_form_of_cost_analysis_or_are_none(analysis, flops):
  assert speed.flops_from_cost_analysis(analysis) == flops


@pytest.mark.slow
def test_vs_pytorch_without_torch_is_a_one_line_error():
  # The script as a user without PyTorch runs it: None in sys.modules makes `import torch` fail.
  argv = [os.path.join(ROOT, "scripts", "benchmark.py"), *TINY_DCGAN, "--vs-pytorch"]
  code = (
    "import runpy, sys; sys.modules['torch'] = None; "
    f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "pip install torch==2.13.0" in errors[0]
  assert result.stdout == ""


def test_each_child_gets_its_wait_policy_in_its_environment():
  parent = {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE"}
  passive = wait_policy.child_environment(parent, "PASSIVE")
  unset = wait_policy.child_environment(parent, "unset")
  assert passive["OMP_WAIT_POLICY"] == "PASSIVE" and "OMP_WAIT_POLICY" not in unset
  assert passive[wait_policy.CHILD_VARIABLE] == "PASSIVE"
  assert unset[wait_policy.CHILD_VARIABLE] == "unset"
  assert passive["PATH"] == unset["PATH"] == "/bin"
  assert parent == {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE"}
  with pytest.raises(ValueError, match="unknown OpenMP wait policy"):
    wait_policy.child_environment(parent, "ACTIVE")


@pytest.mark.slow
def test_the_children_run_one_after_the_other_one_per_policy(monkeypatch):
  calls = []

  def fake_run(command, **kwargs):
    calls.append((command, kwargs["env"]))
    policy = kwargs["env"][wait_policy.CHILD_VARIABLE]
    return subprocess.CompletedProcess(command, 0, stdout=f'{{"policy": "{policy}"}}')

  monkeypatch.setattr(wait_policy.subprocess, "run", fake_run)
  outputs = wait_policy.run_children(["python", "benchmark.py", "--vs-pytorch"])
  assert outputs == {policy: f'{{"policy": "{policy}"}}' for policy in wait_policy.POLICIES}
  assert [command for command, _ in calls] == [["python", "benchmark.py", "--vs-pytorch"]] * 2
  assert [env.get("OMP_WAIT_POLICY", "unset") for _, env in calls] == ["PASSIVE", "unset"]


def _child_report(jax_images, interleaved, fp32, bf16, policy) -> dict:
  """A child's report, reduced to what the merge reads, with these speed-ups over PyTorch."""
  return {
    "omp_wait_policy": policy,
    "step_images_per_second": jax_images,
    "pytorch": {
      "images_per_second_fp32": jax_images / fp32,
      "jax_speedup_over_fp32": fp32,
      "jax_speedup_over_bf16": bf16,
      "interleaved": {"speedup_median": interleaved},
    },
  }


@pytest.mark.slow
def test_against_pytorch_at_its_best_each_comparison_takes_the_lower_speedup():
  # PyTorch is faster unset side by side and in fp32, faster with PASSIVE in bf16.
  reports = {
    "PASSIVE": _child_report(90.0, 1.40, 1.50, 0.90, "PASSIVE"),
    "unset": _child_report(88.0, 1.25, 1.30, 1.10, "unset"),
  }
  merged = wait_policy.merge(reports)
  pytorch = merged["pytorch"]
  assert pytorch["speedup_vs_pytorch_best"] == {
    "interleaved": 1.25,
    "sequential_fp32": 1.30,
    "sequential_bf16": 0.90,
  }
  assert pytorch["pytorch_best_omp_wait_policy"] == {
    "interleaved": "unset",
    "sequential_fp32": "unset",
    "sequential_bf16": "PASSIVE",
  }
  # The top is the child in which PyTorch did best side by side.
  assert merged["omp_wait_policy"] == "unset" and merged["step_images_per_second"] == 88.0
  both = pytorch["by_omp_wait_policy"]
  assert set(both) == {"PASSIVE", "unset"}
  assert both["PASSIVE"]["jax_step_images_per_second"] == 90.0
  assert both["PASSIVE"]["interleaved"]["speedup_median"] == 1.40
  assert both["unset"]["images_per_second_fp32"] == pytest.approx(88.0 / 1.30)
  assert "by_omp_wait_policy" not in reports["unset"]["pytorch"]  # the children's are untouched


def test_a_child_cannot_choose_the_policy_once_openmp_may_be_loaded(monkeypatch):
  monkeypatch.setitem(sys.modules, "gan_cpu_kernels", object())
  with pytest.raises(RuntimeError, match="already be loaded"):
    wait_policy.load_openmp("PASSIVE")
  for module in ("gan_cpu_kernels", "torch"):
    monkeypatch.delitem(sys.modules, module, raising=False)
  monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
  with pytest.raises(RuntimeError, match="not the child's unset"):
    wait_policy.load_openmp("unset")


_RECIPES = {"dcgan": dcgan, "dense": dense}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "dense"])
@pytest.mark.parametrize("arg", ["smoke", None])
def test_pytorch_twin_has_the_parameter_counts_of_ours(family, arg):
  pytest.importorskip("torch")
  from benchmarks import pytorch_common, pytorch_dcgan, pytorch_dense

  twin = {"dcgan": pytorch_dcgan, "dense": pytorch_dense}[family]
  config = _RECIPES[family].get_config(arg)
  generator, discriminator = twin.build(config.to_dict())
  counts = (pytorch_common.count_params(generator), pytorch_common.count_params(discriminator))
  assert counts == speed.parameter_counts(config)


@pytest.mark.slow
def test_vs_pytorch_also_alternates_its_blocks_with_ours_in_the_configs_precision():
  pytest.importorskip("torch")
  result = run_script(
    "benchmark.py",
    *TINY_DCGAN,
    "--input_batches=0",
    "--config.model.dtype=bfloat16",
    "--vs-pytorch",
    # GNU OpenMP prints its settings when it loads: one OpenMP per child.
    env={"OMP_DISPLAY_ENV": "VERBOSE"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  pytorch = json.loads(result.stdout)["pytorch"]
  for report in (pytorch, *pytorch["by_omp_wait_policy"].values()):
    interleaved = report["interleaved"]
    assert interleaved["dtype"] == "bfloat16"
    for name in ("versus_step_seconds_median", "versus_images_per_second", "speedup_median"):
      assert 0 < interleaved[name] < math.inf, name
    assert report["images_per_second_bf16"] > 0
  assert set(pytorch["by_omp_wait_policy"]) == set(wait_policy.POLICIES)
  for speedup in pytorch["speedup_vs_pytorch_best"].values():
    assert 0 < speedup < math.inf
  # PASSIVE waits without spinning; unset spins a while: neither is the other's.
  spin_counts = [
    line.split("=")[1].strip() for line in result.stderr.splitlines() if "GOMP_SPINCOUNT" in line
  ]
  assert spin_counts[0] == "'0'" and spin_counts[1] != "'0'" and len(spin_counts) == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "dense"])
def test_pytorch_twin_times_its_train_step_in_both_precisions(family):
  pytest.importorskip("torch")
  from benchmarks import pytorch_dcgan, pytorch_dense

  twin = {"dcgan": pytorch_dcgan, "dense": pytorch_dense}[family]
  config = tiny_config(family, train__d_steps=2, train__loss="hinge")
  result = twin.benchmark(config.to_dict(), repeats=1, steps=1)
  for precision in ("fp32", "bf16"):
    assert result[f"images_per_second_{precision}"] > 0
  assert result["generator_params"] > 0 and result["threads"] >= 1
  assert result["device"] == "cpu"  # CI and these machines have no GPU
