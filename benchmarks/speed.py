"""How fast training runs here: the train step, the input pipeline, the whole training loop and
the machine's ceiling.

`scripts/benchmark.py` prints `run(config, ...)` as JSON. The step timed is the trainer's own
(`gan.step.train_step`, jitted with the state donated) on one fixed batch already on the device,
so the input pipeline, timed separately, does not count; a square float32 matmul gives the
FLOP/s the machine reaches at best, against which the step's FLOP/s are judged (`count_flops`
says how they are counted). Optionally the trainer itself
(`trainer.train_and_evaluate`) runs a few steps, so that what the loop adds to the step shows.
"""

import copy
import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from gan import config as config_lib
from gan import models, monitoring, parallel, trainer
from gan import state as state_lib
from gan import step as step_lib
from gan.data import pipeline
from gan.errors import UserError

# Square matmul sizes tried for the ceiling; accelerators need bigger ones to reach their peak.
_CPU_MATMUL_SIZES = (512, 1024, 2048)
_ACCELERATOR_MATMUL_SIZES = (1024, 2048, 4096, 8192)


def median_seconds(block: Callable[[], None], repeats: int) -> float:
  """The median wall time of `block()` over `repeats` calls; `block` must wait for its results."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_info() -> dict:
  device = jax.devices()[0]
  return {
    "kind": device.device_kind,
    "platform": device.platform,
    "count": jax.device_count(),
    "jax_version": jax.__version__,
  }


def flops_from_cost_analysis(analysis) -> float | None:
  """The 'flops' of a compiled program's cost_analysis(), which jax versions return as a dict or
  as a list with one dict per program; None when XLA did not count them."""
  if isinstance(analysis, Sequence):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  if flops is None or not math.isfinite(flops) or flops <= 0:
    return None
  return float(flops)


def matmul_ceiling(repeats: int, sizes: Sequence[int] | None = None, dtype=jnp.float32) -> float:
  """The best FLOP/s of a jitted square matmul over `sizes` (median of `repeats` each), with
  operands in `dtype` and a float32 result (the fast form of a low-precision dot on XLA:CPU, as
  the models use it)."""
  if sizes is None:
    on_cpu = jax.devices()[0].platform == "cpu"
    sizes = _CPU_MATMUL_SIZES if on_cpu else _ACCELERATOR_MATMUL_SIZES
  matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  best = 0.0
  for n in sizes:
    # numpy draws the operands: no random-number program to compile per size.
    a, b = jnp.asarray(np.random.default_rng(n).standard_normal((2, n, n), np.float32), dtype)
    # A block does at least an eighth of the largest size's work, so dispatch does not count.
    calls = max(1, (sizes[-1] // n) ** 3 // 8)
    jax.block_until_ready(matmul(a, b))  # compiles

    def block(a=a, b=b, calls=calls):
      jax.block_until_ready([matmul(a, b) for _ in range(calls)])

    best = max(best, 2 * n**3 * calls / median_seconds(block, repeats))
  return best


def count_flops(nets: state_lib.Networks, config: ml_collections.ConfigDict, args) -> float | None:
  """XLA's FLOP count of one train step on `args` (state, batch, key), or None.

  Counted on the step lowered for the CPU, before any backend's optimisation: XLA:GPU counts
  nothing before compiling and, after, leaves out the convolutions and dots it hands to cuDNN
  and cuBLAS. The count is of the whole global batch, whatever the mesh. The step is traced
  with XLA's own convolutions (model.conv_impl=xla): XLA cannot count the CPU kernels' custom
  calls, and the function, so its FLOPs, is the same.
  """
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  if config.model.conv_impl != "xla":
    config = config.copy_and_resolve_references()
    config.model.conv_impl = "xla"
    nets = state_lib.create_train_state(config)[0]
  step = jax.jit(functools.partial(step_lib.train_step, nets, config.train))
  try:
    with jax.default_device(jax.devices("cpu")[0]):
      return flops_from_cost_analysis(step.lower(*specs).cost_analysis())
  except (NotImplementedError, RuntimeError) as e:
    logging.warning("XLA gave no cost analysis of the train step: %s", e)
    return None


def time_train_step(
  config: ml_collections.ConfigDict,
  *,
  repeats: int,
  steps: int,
  versus: Callable[[], None] | None = None,
) -> dict:
  """Compiles the trainer's step and times `repeats` blocks of `steps` steps after a warm-up.

  With `versus` (another implementation's block of `steps` steps of the same batch size), our
  blocks and its blocks alternate, so that both see the machine alike: a shared machine's speed
  drifts over minutes, and timing one side after the other measures the drift. Each timed block
  follows an untimed one of the same side: the first steps after a switch ran slower (PyTorch's
  5%, ours 2.7% over blocks of five steps), which would count the switch, not the step.

  Returns:
    compile_seconds, step_seconds_median, step_images_per_second, flops_per_step (None when XLA
    does not count them) and achieved_flops_per_second; with `versus`, also `interleaved`: its
    median step seconds and images/s, and the median over the pairs of blocks of our speed-up.
  """
  mesh = parallel.create_mesh(config.mesh.data_axis_size)  # the trainer's placement
  parallel.check_batch_size(config.train.batch_size, mesh)
  nets, state = state_lib.create_train_state(config, mesh)
  batch_size, resolution = config.train.batch_size, config.data.resolution
  # Pixel values do not change the work; one batch on the device keeps the input out of it.
  batch = {
    "image": np.random.default_rng(0)
    .uniform(-1.0, 1.0, (batch_size, resolution, resolution, 3))
    .astype(np.float32),
    "label": jnp.zeros((batch_size,), jnp.int32),
  }
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))
  # The trainer's keys, made up front: step i uses fold_in(state.rng, i).
  keys = list(jax.vmap(functools.partial(jax.random.fold_in, state.rng))(jnp.arange(steps + 1)))
  step_fn = trainer.jit_train_step(nets, config, state, mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, keys[0]).compile()
  compile_seconds = time.perf_counter() - start
  flops = count_flops(nets, config, (state, batch, keys[0]))

  state, metrics = compiled(state, batch, keys[0])  # warm-up: first-run allocations
  jax.block_until_ready((state, metrics))

  def block():
    nonlocal state
    for key in keys[1:]:
      state, metrics = compiled(state, batch, key)
    jax.block_until_ready((state, metrics))

  report = {"mesh_devices": mesh.size, "compile_seconds": compile_seconds, "flops_per_step": flops}
  if versus is None:
    step_seconds = median_seconds(block, repeats) / steps
  else:
    ours, theirs = [], []
    for _ in range(repeats):
      block()
      ours.append(median_seconds(block, 1) / steps)
      versus()
      theirs.append(median_seconds(versus, 1) / steps)
    step_seconds, versus_seconds = statistics.median(ours), statistics.median(theirs)
    report["interleaved"] = {
      "versus_step_seconds_median": versus_seconds,
      "versus_images_per_second": batch_size / versus_seconds,
      "speedup_median": statistics.median(t / o for o, t in zip(ours, theirs, strict=True)),
    }
  return {
    **report,
    "step_seconds_median": step_seconds,
    "step_images_per_second": batch_size / step_seconds,
    "achieved_flops_per_second": flops and flops / step_seconds,
  }


def time_training_loop(config: ml_collections.ConfigDict, *, steps: int) -> dict:
  """Runs the trainer for `steps` steps in a temporary workdir, evaluating and saving a
  checkpoint halfway and at the end, with the config's data and logging interval.

  Returns:
    steps, first_step_seconds (from the trainer's start: state, data source and compile), the
    mean step_seconds after the first (input, copies, fetches and logging included), and the
    last evaluation's and checkpoint save's seconds (the first evaluation also compiles).
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.train.num_steps = steps
    config.eval.every = config.checkpoint.every = max(1, steps // 2)
  timings = monitoring.Timings()
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir, timings)
  return {
    "steps": steps,
    "first_step_seconds": timings.first_step,
    "step_seconds": timings.step_seconds / max(timings.steps, 1),
    "evaluation_seconds": timings.evaluations[-1],
    "checkpoint_seconds": timings.checkpoints[-1],
  }


def loop_overheads(loop: dict, step_seconds: float, config: ml_collections.ConfigDict) -> dict:
  """What the loop adds to the bare step at the config's intervals, as fractions of step time.

  host: input, copies, metric fetches, logging and checkpoint saves; evaluation: sample grids,
  the health probe and quality metrics.
  """
  per_step = loop["step_seconds"] + loop["checkpoint_seconds"] / config.checkpoint.every
  return {
    "host_overhead_fraction": per_step / step_seconds - 1,
    "evaluation_overhead_fraction": loop["evaluation_seconds"] / config.eval.every / step_seconds,
  }


def time_input_pipeline(config: ml_collections.ConfigDict, *, batches: int) -> dict:
  """Images per second the input pipeline yields over `batches` batches: first while it decodes
  (after the first batch, which pays for building the pipeline), then, with data.cache, once a
  whole epoch is decoded and the images come from the cache (None without the cache). The
  source is opened for this alone, so a trainer timed next starts as a fresh run would."""
  batch_size = config.train.batch_size
  source = pipeline.Source(config.data)
  iterator = source.batches(batch_size=batch_size, seed=config.train.seed)

  def rate():
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    return batch_size * batches / (time.perf_counter() - start)

  try:
    next(iterator)
    decoding = rate()
    cached = None
    if config.data.cache:
      epoch = -(-source.size // batch_size)
      for _ in range(epoch - batches - 1):
        next(iterator)
      cached = rate()
    return {
      "input_pipeline_images_per_second": decoding,
      "input_pipeline_cached_images_per_second": cached,
    }
  finally:
    # Stops tf.data's background threads, which would take cores from whatever runs next.
    iterator.close()


def parameter_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The generator's and discriminator's parameter counts, from shapes alone."""
  generator, discriminator = nnx.eval_shape(
    lambda: models.create_models(config.model, config.data.resolution, rngs=nnx.Rngs(0))
  )
  return models.count_params(generator), models.count_params(discriminator)


def run(
  config: ml_collections.ConfigDict,
  *,
  repeats: int,
  steps: int,
  input_batches: int,
  loop_steps: int = 0,
  versus: Callable[[], None] | None = None,
) -> dict:
  """Everything scripts/benchmark.py reports, as a JSON-ready dict; `versus` as for
  `time_train_step`.

  The input pipeline is timed last, so its threads take no cores from the rest; a data source
  that cannot be read, or input_batches=0, leaves input_pipeline_images_per_second None and says
  why in input_pipeline_error. loop_steps > 0 then also runs the trainer (`loop`, with the
  overheads at the config's own intervals).

  Raises:
    UserError: for a bad config, repeats or steps below one, or negative input_batches or
      loop_steps.
  """
  counts = (
    ("repeats", repeats, 1),
    ("steps", steps, 1),
    ("input_batches", input_batches, 0),
    ("loop_steps", loop_steps, 0),
  )
  for name, value, least in counts:
    if value < least:
      raise UserError(f"--{name} must be at least {least}, not {value}")
  config = config_lib.validate(config)
  g_params, d_params = parameter_counts(config)
  report = {
    "device": device_info(),
    "model": config.model.name,
    "dtype": config.model.dtype,
    "resolution": config.data.resolution,
    "batch_size": config.train.batch_size,
    "d_steps": config.train.d_steps,
    "generator_params": g_params,
    "discriminator_params": d_params,
    "repeats": repeats,
    "steps": steps,
    "conv_impl": config.model.conv_impl,
  }
  # The ceiling of the config's compute dtype: a bf16 step against bf16 matmuls.
  ceiling = matmul_ceiling(repeats, dtype=jnp.dtype(config.model.dtype))
  report.update(time_train_step(config, repeats=repeats, steps=steps, versus=versus))
  achieved = report["achieved_flops_per_second"]
  report["matmul_ceiling_flops_per_second"] = ceiling
  report["matmul_ceiling_dtype"] = jnp.dtype(config.model.dtype).name
  report["fraction_of_ceiling"] = achieved and achieved / ceiling
  report["input_pipeline_images_per_second"] = None
  report["input_pipeline_cached_images_per_second"] = None
  if input_batches == 0:
    report["input_pipeline_error"] = "not timed: --input_batches=0"
  else:
    try:
      report.update(time_input_pipeline(config, batches=input_batches))
    except UserError as e:
      logging.warning("Input pipeline not timed: %s", e)
      report["input_pipeline_error"] = str(e)
  if loop_steps:
    report["loop"] = time_training_loop(config, steps=loop_steps)
    report["loop"].update(loop_overheads(report["loop"], report["step_seconds_median"], config))
  return report
