"""The trainer: set-up, restore, and a loop that only dispatches periodic actions.

    train_and_evaluate(config, workdir)
      set-up      validate the config; build networks, state, jitted step, data, writers
      restore     the newest readable checkpoint of the workdir, if any (an exact resume)
      loop        one train step, then, when due: log scalars, draw the sample grid, score
                  quality, judge health (and roll back a collapse), save a checkpoint

Restarting with the same workdir resumes from the latest checkpoint, with the data order and
random numbers an uninterrupted run would have had.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from gan import checkpointing, inference, monitoring, parallel, rollback, sampling, workdir_lock
from gan import config as config_lib
from gan import state as state_lib
from gan import step as step_lib
from gan.data import pipeline
from gan.errors import UserError
from gan.health import signals, verdict
from gan.metrics import quality
from gan.state import Networks, TrainState

# Adam settings a resumed run takes from a changed config: they live in the optimiser states,
# which a checkpoint restores (with whatever a rollback's remedy made of them).
_RESUMABLE = ("g_lr", "d_lr", "b1", "b2")


class _StopRequest:
  """Turns SIGTERM and SIGINT into a request to stop after the current step, with a save; the
  previous handlers come back when the block ends, after the last save is on disk."""

  def __init__(self):
    self.name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals only reach it
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.name = signal.Signals(signum).name

  def agreed(self, logged: bool) -> bool:
    """Whether to stop now; with several processes, all stop at a step where they log."""
    if jax.process_count() == 1:
      return self.name is not None
    return logged and parallel.agree(self.name is not None)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class _Run:
  """What the loop carries from step to step, and the parts its actions use."""

  config: ml_collections.ConfigDict
  workdir: str
  nets: Networks
  step_fn: Callable
  make_initial: Callable[[], TrainState]
  abstract: TrainState
  ckpt: checkpointing.Checkpointer
  writer: metric_writers.MetricWriter
  timings: monitoring.Timings
  batch_sharding: jax.sharding.NamedSharding
  source: pipeline.Source
  state: TrainState
  step: int
  batches: Iterator = None
  progress: periodic_actions.ReportProgress = None
  probe: signals.HealthProbe = None
  evaluator: quality.Evaluator | None = None
  sample_fn: Callable = None
  grid_noise: np.ndarray = None
  eval_noise: np.ndarray = None
  pending: list = dataclasses.field(default_factory=list)  # metrics still on the device
  scalars: dict = dataclasses.field(default_factory=dict)  # the last of each, for checkpoints
  health: dict = dataclasses.field(default_factory=dict)
  scores: dict = dataclasses.field(default_factory=dict)
  streak: int = 0
  rollbacks: int = 0

  def advance(self) -> None:
    """One train step on the next batch."""
    batch = parallel.global_batch(next(self.batches), self.batch_sharding)
    key = jax.random.fold_in(self.state.rng, self.step)
    self.state, metrics = self.step_fn(self.state, batch, key)
    self.step += 1
    self.pending.append(metrics)
    self.progress(self.step)

  def restart_at(self, step: int, state: TrainState) -> None:
    """Carries on from `step` with `state`: the data, the progress report and the streak too."""
    self.step, self.state, self.streak, self.pending = step, state, 0, []
    self.batches = _batches(self.source, self.config, step)
    self.progress = _report_progress(self.config, step)
    self.timings.start(step)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, timings: monitoring.Timings | None = None
) -> TrainState:
  """Trains per `config`, writing checkpoints, TensorBoard events and samples to `workdir`.

  Every `eval.every` steps the generator's health is judged (gan/health); on a collapse the run
  goes back to its last healthy checkpoint by itself (gan/rollback.py) and carries on with new
  random numbers. Where the time went is logged at the end and, given `timings`, filled in there.

  Returns:
    The final TrainState.

  Raises:
    UserError: for a bad config or data; CollapseError (one) when the run collapses with
      rollback off or more often than collapse.max_rollbacks.
  """
  started = time.perf_counter()
  config = config_lib.validate(config)
  num_steps = config.train.num_steps
  with _StopRequest() as stop, contextlib.ExitStack() as cleanup:
    run = _set_up(config, workdir, timings or monitoring.Timings(), cleanup)
    cleanup.enter_context(_closing_on_error(run))
    if stop.agreed(logged=True):  # during start-up: nothing was trained, nothing needs saving
      logging.warning("Stopped by %s during start-up, before step %d", stop.name, run.step + 1)
      num_steps = run.step
    else:
      logging.info("Training from step %d to %d in %s", run.step, num_steps, workdir)
    while run.step < num_steps:
      run.advance()
      _note_first_step(run, started)
      step, last = run.step, run.step == num_steps
      logged = step % config.train.log_every == 0 or last
      nonfinite = _log_scalars(run) if logged else False
      if step % config.eval.every == 0 or last or nonfinite:
        judgement = _timed(run, "evaluation", _evaluate, run, nonfinite)
        if judgement.verdict == verdict.COLLAPSED:
          _roll_back(run, judgement)
          continue
      stopping = stop.agreed(logged)
      if step % config.checkpoint.every == 0 or last or stopping:
        _timed(run, "checkpoint", _save, run)
      if stopping:
        logging.warning("Stopped by %s after step %d, saved; run again to resume", stop.name, step)
        break
    _finish(run, started)
  return run.state


@contextlib.contextmanager
def _closing_on_error(run: _Run):
  """On any error, lets saves in flight finish (or fail) now, not in threads cut off at
  interpreter exit; the error that brought us here is the one to report."""
  try:
    yield
  except BaseException:
    with contextlib.suppress(Exception):
      run.ckpt.close()
    with contextlib.suppress(Exception):
      run.writer.close()
    raise


def _timed(run: _Run, part: str, action: Callable, *args):
  """Runs an action as a named part of the loop's time (the progress report's and `timings`')."""
  with run.progress.timed(part, wait_jax_async_dispatch=False), run.timings.part(part):
    return action(*args)


def _note_first_step(run: _Run, started: float) -> None:
  if run.timings.first_step:
    run.timings.steps += 1
    return
  jax.block_until_ready(run.pending[-1])  # one wait, once: when the first step is done
  run.timings.first_step = time.perf_counter() - started
  logging.info("First step done %.1f s after the start (compile included)", run.timings.first_step)


def _log_scalars(run: _Run) -> bool:
  """Fetches the metrics of the steps since the last log, writes their means; returns whether
  any is non-finite."""
  fetched = parallel.to_host(run.pending)
  run.pending = []
  scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  nonfinite = not all(np.isfinite(v) for v in scalars.values())
  scalars["images_per_second"] = run.timings.images_per_second(
    run.step, run.config.train.batch_size
  )
  run.writer.write_scalars(run.step, {f"{monitoring.TRAIN}/{k}": v for k, v in scalars.items()})
  monitoring.log_losses(run.step, run.config.train.num_steps, scalars)
  run.scalars = scalars
  return nonfinite


def _evaluate(run: _Run, nonfinite: bool) -> verdict.Judgement:
  """The sample grid, the quality scores and the health verdict of the current generator."""
  state = run.state
  images = run.sample_fn(state.ema, state.g.batch_stats, run.grid_noise)
  grid = sampling.make_grid(parallel.to_host(images))
  run.writer.write_images(run.step, {"samples": grid[None]})
  if parallel.is_main_process():
    sampling.save_png(sampling.grid_path(run.workdir, run.step), grid)
  if run.evaluator is not None and not nonfinite:
    run.scores = {}
    for prefix, params in _generators(run):
      fake = inference.generate_many(run.sample_fn, params, state.g.batch_stats, run.eval_noise)
      run.scores.update({f"{prefix}/{k}": v for k, v in run.evaluator(fake).items()})
    run.writer.write_scalars(run.step, run.scores)
  measured = {**run.probe(state.g.params, state.g.batch_stats), "nonfinite": float(nonfinite)}
  judgement = verdict.judge(measured, run.config.collapse, run.streak, run.step)
  run.streak = judgement.streak
  run.health = {f"health/{k}": v for k, v in measured.items()}
  run.health.update(
    {verdict.VERDICT_METRIC: verdict.VERDICTS.index(judgement.verdict), "health/streak": run.streak}
  )
  run.writer.write_scalars(run.step, run.health)
  if judgement.verdict in (verdict.SUSPECT, verdict.COLLAPSED):
    logging.warning("Step %d: %s: %s", run.step, judgement.verdict, "; ".join(judgement.reasons))
  return judgement


def _generators(run: _Run) -> list[tuple[str, dict]]:
  """The generators the quality metrics score, by tag prefix: the EMA (what samples show) and,
  where there is an EMA, the raw weights beside it."""
  state = run.state
  ema = (checkpointing.EVAL_PREFIX["ema"], state.ema)
  if run.config.train.ema_kimg == 0:
    return [ema]
  return [ema, (checkpointing.EVAL_PREFIX["raw"], state.g.params)]


def _roll_back(run: _Run, judgement: verdict.Judgement) -> None:
  """Goes back to the last healthy checkpoint, or stops with a CollapseError where the config
  allows no (more) rollbacks."""
  collapse = run.config.collapse
  if not collapse.rollback or run.rollbacks >= collapse.max_rollbacks:
    why = (
      "rollback is off (collapse.rollback)"
      if not collapse.rollback
      else f"after {run.rollbacks} rollbacks (collapse.max_rollbacks)"
    )
    raise verdict.CollapseError(
      f"training collapsed at step {run.step} ({'; '.join(judgement.reasons)}) {why}; "
      f"{rollback.hint(run.ckpt, run.step)}",
      step=run.step,
      signals={k.removeprefix("health/"): v for k, v in run.health.items()},
      state=run.state,
    )
  state, event = rollback.roll_back(
    run.ckpt,
    run.config,
    run.state,
    run.abstract,
    run.make_initial,
    run.rollbacks,
    judgement.reasons,
    run.health,
  )
  run.rollbacks += 1
  if parallel.is_main_process():
    rollback.record(run.workdir, event)
    rollback.set_grids_aside(run.workdir, event["to_step"], run.rollbacks)
  run.writer.write_scalars(run.step, {"collapse/rollbacks": run.rollbacks})
  run.writer = (
    monitoring.next_attempt(  # the abandoned steps stay in a TensorBoard run of their own
      run.writer,
      run.workdir,
      (run.step, event["to_step"]),
      run.config.to_dict(),
      monitoring.rollback_markdown(event),
    )
  )
  logging.warning(
    "Rolled back from step %d to step %d (rollback %d of at most %d): %s",
    event["from_step"],
    event["to_step"],
    run.rollbacks,
    collapse.max_rollbacks,
    event["reason"],
  )
  run.restart_at(event["to_step"], state)


def _save(run: _Run) -> None:
  run.ckpt.save(run.step, run.state, {**run.scalars, **run.health, **run.scores})


def _finish(run: _Run, started: float) -> None:
  """Waits for the last save, closes the writers and logs where the time went."""
  run.timings.close(time.perf_counter() - started)
  run.writer.flush()
  run.ckpt.wait()
  run.ckpt.close()
  run.writer.close()
  logging.info(
    "Done: step %d of %d; checkpoints in %s",
    run.step,
    run.config.train.num_steps,
    run.ckpt.directory,
  )
  logging.info("Time: %s", run.timings.summary())


# Set-up.


def _set_up(
  config, workdir: str, timings: monitoring.Timings, cleanup: contextlib.ExitStack
) -> _Run:
  """Everything the loop needs, from the validated config and the workdir's checkpoints;
  `cleanup` ends what must end with the run (the log file)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a folder: choose another --workdir")
  mesh = parallel.create_mesh(config.mesh.data_axis_size)
  parallel.check_batch_size(config.train.batch_size, mesh)
  # The data source is opened before anything is written, so a bad path leaves no debris.
  source = pipeline.Source(config.data)
  nets, initial = state_lib.create_train_state(config, mesh)
  step_fn = jit_train_step(nets, config, initial, mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  compiling = _compile_ahead(step_fn, initial, config, batch_sharding)
  changed = _changed_settings(workdir, config)
  parallel.sync("config read")  # by every process, before the main one writes the new one
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    # Before anything in the workdir is touched: Orbax clears unfinished saves when it opens.
    cleanup.enter_context(workdir_lock.hold(workdir, "a trainer"))
  parallel.sync("workdir")
  cleanup.enter_context(monitoring.log_file(os.path.join(workdir, "train.log")))
  ckpt = checkpointing.Checkpointer(
    os.path.join(workdir, "checkpoints"), config.checkpoint, keep_last_where=verdict.is_healthy
  )
  if ckpt.all_steps():
    _check_resumable(workdir, config)
  abstract = state_lib.abstract(initial)
  state = _restore(ckpt, initial, config.restore_step)
  step = int(parallel.to_host(state.step))
  if step:
    state = _apply_changed_settings(state, changed)
  changes = []
  if parallel.is_main_process():
    changes = _write_config(workdir, config, step)  # only now: the checkpoint fits this config
    _write_skip_list(workdir, source.skipped_files)
  run = _Run(
    config=config,
    workdir=workdir,
    nets=nets,
    step_fn=step_fn,
    make_initial=lambda: state_lib.create_train_state(config, mesh)[1],
    abstract=abstract,
    ckpt=ckpt,
    writer=monitoring.create_writer(workdir, step, config.to_dict(), changes),
    timings=timings,
    batch_sharding=batch_sharding,
    source=source,
    state=state,
    step=step,
    streak=int((ckpt.metrics(step) or {}).get("health/streak", 0)) if step else 0,
    rollbacks=rollback.count(workdir),
  )
  _set_up_evaluation(run)
  compiling.result()
  timings.start(step)
  return run


def _set_up_evaluation(run: _Run) -> None:
  """The data, the fixed noise batches, the health probe and the quality evaluator."""
  config = run.config
  root = state_lib.root_key(config)
  latent_dim = run.nets.latent_dim
  run.grid_noise = inference.noise(
    jax.random.fold_in(root, state_lib.FIXED_NOISE_KEY), config.eval.grid_size, latent_dim
  )
  if parallel.is_main_process():
    np.save(os.path.join(run.workdir, "fixed_noise.npy"), run.grid_noise)
  run.sample_fn = inference.sampler(run.nets)
  num_real = max(config.collapse.num_samples, config.eval.num_samples if config.eval.metrics else 0)
  real_images, run.batches = _peek_images(_batches(run.source, config, run.step), num_real)
  run.progress = _report_progress(config, run.step)
  health_key = jax.random.fold_in(root, state_lib.HEALTH_KEY)
  run.probe = signals.HealthProbe(
    config,
    real_images[: config.collapse.num_samples],
    inference.noise(health_key, config.collapse.num_samples, latent_dim),
    functools.partial(step_lib.generate, run.nets),
    health_key,
  )
  if config.eval.metrics:
    eval_key = jax.random.fold_in(root, state_lib.EVAL_KEY)
    run.eval_noise = inference.noise(eval_key, config.eval.num_samples, latent_dim)
    run.evaluator = quality.Evaluator(
      config.eval.metrics,
      real_images[: config.eval.num_samples],
      key=eval_key,
      reference=quality.reference_key(config.data, config.eval.num_samples),
      inception_weights=config.eval.inception_weights,
    )


def _report_progress(config, step: int) -> periodic_actions.ReportProgress:
  """clu's progress report (steps/s, ETA, the share of evaluations and saves), every log."""
  report = periodic_actions.ReportProgress(
    num_train_steps=config.train.num_steps, every_steps=config.train.log_every, every_secs=None
  )
  report(step)  # its first call only notes where it starts
  return report


def _batches(source: pipeline.Source, config: ml_collections.ConfigDict, start_step: int):
  """This process's rows of each global batch from `start_step` on, as numpy."""
  return source.batches(
    batch_size=config.train.batch_size,
    seed=config.train.seed,
    start_step=start_step,
    rows=parallel.process_rows(config.train.batch_size),
  )


def _peek_images(batches, count: int):
  """The first `count` images of the global batches (the same on every process), and an
  iterator that still yields every batch of `batches`."""
  head = []
  while sum(len(b["image"]) for b in head) * jax.process_count() < count:
    head.append(next(batches))
  images = np.concatenate([parallel.gather_rows(b["image"]) for b in head])[:count]
  return images, itertools.chain(head, batches)


def jit_train_step(nets: Networks, config, state: TrainState, mesh: jax.sharding.Mesh):
  """The jitted train step as the trainer runs it: the state donated and kept where `state` is
  placed, the metrics replicated over `mesh`."""
  return jax.jit(
    functools.partial(step_lib.train_step, nets, config.train),
    donate_argnums=0,
    out_shardings=(jax.tree.map(lambda x: x.sharding, state), parallel.replicated(mesh)),
  )


def _compile_ahead(step_fn, state: TrainState, config, batch_sharding) -> concurrent.futures.Future:
  """Compiles `step_fn` for the state, batches and keys the loop will give it, in a thread, so
  that the compile runs while the input pipeline fills its first batches; jit keeps the result
  and the first step reuses it (were a spec to differ, that step would just compile again)."""
  size, resolution = config.train.batch_size, config.data.resolution
  batch = {
    "image": jax.ShapeDtypeStruct(
      (size, resolution, resolution, 3), jnp.float32, sharding=batch_sharding
    ),
    "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=batch_sharding),
  }
  key = jax.random.fold_in(state.rng, 0)  # made as the loop makes each step's key
  specs = (
    state_lib.abstract(state),
    jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=key.sharding),
  )
  logging.info("Compiling the train step while the data loads (the first start takes longest)")
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
  future = pool.submit(lambda: step_fn.lower(specs[0], batch, specs[1]).compile())
  pool.shutdown(wait=False)  # the compile runs on; the thread ends with it
  return future


def _restore(ckpt: checkpointing.Checkpointer, state: TrainState, restore_step: int | None):
  """Returns the state to start from: a chosen step, else the newest checkpoint that reads back
  whole (damaged newer ones are skipped with a warning and moved aside), else `state`."""
  if restore_step is not None:
    ckpt.require(restore_step)
    steps = [restore_step]
  else:
    steps = ckpt.all_steps()[::-1]
  if not steps and not ckpt.damaged():
    return state
  step, restored = ckpt.restore_first(steps, state)
  if step is None:
    tried = sorted({*steps, *ckpt.damaged()})
    raise UserError(
      f"no checkpoint in {ckpt.directory} can be read (steps {', '.join(map(str, tried))}); "
      "move the directory away to start afresh"
    )
  logging.info("Restored the checkpoint of step %d from %s", step, ckpt.directory)
  return restored


# What a checkpoint's arrays are shaped by: a resume that changes any of these cannot load it.
_SHAPING = ("model", "data.resolution")
_NOT_SHAPING = ("model.conv_impl", "model.dtype")  # the same parameters, computed another way


def _check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a resume whose networks differ from the ones the checkpoints hold, naming the
  fields; nothing has been written yet."""
  saved, new = (
    monitoring.flatten_config(json.loads(c.to_json_best_effort()))
    for c in (inference.read_config(workdir), config)
  )
  differing = [
    f"{name} {saved.get(name)!r} -> {new.get(name)!r}"
    for name in sorted(set(saved) | set(new))
    if name.startswith(_SHAPING) and name not in _NOT_SHAPING and saved.get(name) != new.get(name)
  ]
  if differing:
    raise UserError(
      f"{workdir} holds checkpoints of other networks than this config's "
      f"({'; '.join(differing)}): resume with the run's own settings, or use a new --workdir"
    )


def _write_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> list[str]:
  """Writes WORKDIR/config.json. A resume from `step` with other settings first keeps the
  previous file as config.<step>.json (config.<step>-2.json, ... when that is taken), so the
  settings that trained each checkpoint stay on record. Returns the changed fields, each as
  'name old -> new' (none for a new run)."""
  path = os.path.join(workdir, "config.json")
  text = json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True) + "\n"
  changes = []
  if step and os.path.exists(path):
    with open(path) as f:
      previous = f.read()
    if previous != text:
      _keep_previous_config(workdir, step, previous)
      old, new = (monitoring.flatten_config(json.loads(t)) for t in (previous, text))
      changes = [
        f"{name} {old.get(name)!r} -> {new.get(name)!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
      ]
  with open(f"{path}.tmp", "w") as f:  # then renamed: a crash never leaves half a config.json
    f.write(text)
  os.replace(f"{path}.tmp", path)
  return changes


def _keep_previous_config(workdir: str, step: int, text: str) -> None:
  """Writes `text` to the first free name of config.<step>.json, config.<step>-2.json, ...,
  unless one of them holds it already."""
  for n in itertools.count(1):
    path = os.path.join(workdir, f"config.{step}{f'-{n}' if n > 1 else ''}.json")
    if os.path.exists(path):
      with open(path) as f:
        if f.read() == text:
          return  # kept already
      continue
    with open(path, "w") as f:
      f.write(text)
    logging.info("The settings changed since step %d: the previous ones are kept in %s", step, path)
    return


SKIPPED_FILES = "skipped_files.tsv"


def _write_skip_list(workdir: str, skipped: tuple[tuple[str, str], ...]) -> None:
  """Names the data files the source skipped, one `reason<TAB>path` line each, in
  WORKDIR/skipped_files.tsv (the log has the summary by reason)."""
  path = os.path.join(workdir, SKIPPED_FILES)
  if not skipped:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)  # from an earlier run over other data
    return
  with open(path, "w") as f:
    f.writelines(f"{reason}\t{file}\n" for file, reason in skipped)
  logging.info("The %d skipped data files are listed in %s", len(skipped), path)


def _changed_settings(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """The `_RESUMABLE` train settings that `config` changes from the run's config.json:
  name -> (saved, new). Empty for a new run or an unchanged config."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return {}
  saved = inference.read_config(workdir).train
  changed = {}
  for name in _RESUMABLE:
    old, new = saved.get(name), float(config.train[name])
    if isinstance(old, int | float) and float(old) != new:
      changed[name] = (float(old), new)
  return changed


def _apply_changed_settings(state: TrainState, changed: dict[str, tuple]) -> TrainState:
  """A restored state with the settings a changed config asks for: each learning rate scaled by
  new / saved (so a rollback's reduction stays), b1 and b2 set."""
  if not changed:
    return state
  ratio = {name: new / old for name, (old, new) in changed.items()}
  rates = tuple(
    float(rate) * ratio.get(name, 1.0)
    for rate, name in zip(
      parallel.to_host(state_lib.learning_rates(state)), ("g_lr", "d_lr"), strict=True
    )
  )
  betas = {name: (changed[name][1],) * 2 for name in ("b1", "b2") if name in changed}
  described = ", ".join(f"train.{k} {old:g} -> {new:g}" for k, (old, new) in changed.items())
  logging.info(
    "The config changes %s since the last run: resuming with learning rates %.3g / %.3g",
    described,
    *rates,
  )
  return state_lib.with_hyperparams(state, learning_rate=rates, **betas)
