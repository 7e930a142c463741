"""Trains one config over several seeds, with and without rollback, and tabulates collapses.

    python scripts/collapse_study.py --config=configs/collapse_demo.py --seeds=0,1,2,3,4 \
        --workdir=runs/collapse_study

For each seed and each setting of collapse.rollback it trains in WORKDIR/<rollback|no_rollback>/
seed_<N>/ and reports whether the run collapsed (and at which step), how many rollbacks it made,
the health probe's modes covered and KL from uniform at the end (or at the collapse), and the
wall time of the training. On synthetic_faces it then counts the modes of the generator it ended
with (or collapsed with) as PacGAN counts Stacked-MNIST's: `--modes_samples` samples (26,000) of
its EMA and of its raw weights, read by the mode classifier. Prints a Markdown table, one line
of totals, and writes the rows to WORKDIR/results.json.
"""

import json
import os
import statistics
import time

from absl import flags, logging
from ml_collections import config_flags

from gan import checkpointing, cli, rollback, trainer
from gan.health import verdict

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config to study.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "train.seed values.")
_ROLLBACK = flags.DEFINE_enum("rollback", "both", ["both", "on", "off"], "Which settings to run.")
_MODES_SAMPLES = flags.DEFINE_integer(
  "modes_samples",
  26_000,
  "Samples whose modes are counted at the end of each synthetic_faces run; 0: none.",
  lower_bound=0,
)
flags.mark_flags_as_required(["config"])


def _run(config, workdir: str) -> dict:
  start = time.perf_counter()
  try:
    state = trainer.train_and_evaluate(config, workdir)
    step, collapsed_at = int(state.step), None
    metrics = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).metrics(step) or {}
    signals = {k.removeprefix("health/"): v for k, v in metrics.items()}
  except verdict.CollapseError as e:
    state, step, collapsed_at, signals = e.state, e.step, e.step, e.signals
  row = {
    "step": step,
    "collapsed_at": collapsed_at,
    "rollbacks": rollback.count(workdir),
    "modes_covered": signals.get("modes_covered"),
    "kl_uniform": signals.get("kl_uniform"),
    "seconds": round(time.perf_counter() - start, 1),
  }
  if _MODES_SAMPLES.value and config.data.source == "synthetic_faces":
    row["modes"] = _count_modes(config, state, _MODES_SAMPLES.value)
  return row


def _count_modes(config, state, num: int) -> dict:
  """modes_covered and kl_uniform of `num` samples of the EMA and of the raw generator."""
  # Imported here: a study of other data never loads the classifier.
  import jax

  from gan import config as config_lib
  from gan import inference
  from gan.metrics import mode_classifier, quality
  from gan.state import create_train_state

  nets, _ = create_train_state(config_lib.validate(config))
  sample = inference.sampler(nets)
  key = jax.random.key(config.train.seed, impl=config.train.prng_impl)
  noise = inference.noise(key, num, nets.latent_dim)
  classifier = mode_classifier.load_classifier()
  counts = {"num_samples": num}
  for name, params in (("ema", state.ema), ("raw", state.g.params)):
    fake = inference.generate_many(sample, params, state.g.batch_stats, noise)
    counts[name] = quality.mode_counts(classifier, fake)
  return counts


def _cell(value, fmt="{}"):
  return "-" if value is None else fmt.format(value)


def _counted(row: dict, name: str) -> str:
  if "modes" not in row:
    return "-"
  counts = row["modes"][name]
  return f"{counts['modes_covered']:.0f} / {counts['kl_uniform']:.2f}"


def _totals(rows: list[dict]) -> str:
  """One line per setting: collapses, when, and the mean counted modes and KL."""
  collapsed = [r["collapsed_at"] for r in rows if r["collapsed_at"] is not None]
  line = f"{len(collapsed)} of {len(rows)} collapsed"
  if collapsed:
    line += f" (at steps {', '.join(map(str, collapsed))})"
  if all("modes" in r for r in rows):
    for name in ("ema", "raw"):
      modes = [r["modes"][name]["modes_covered"] for r in rows]
      kl = [r["modes"][name]["kl_uniform"] for r in rows]
      line += f"; {name}: {statistics.mean(modes):.0f} modes, KL {statistics.mean(kl):.2f}"
  return line + f"; {statistics.mean(r['seconds'] for r in rows):.0f} s a run"


def main(argv):
  del argv
  settings = {"both": (False, True), "on": (True,), "off": (False,)}[_ROLLBACK.value]
  rows = []
  for rollback_on in settings:
    for seed in map(int, _SEEDS.value):
      config = _CONFIG.value.copy_and_resolve_references()
      config.train.seed = seed
      config.collapse.rollback = rollback_on
      name = "rollback" if rollback_on else "no_rollback"
      workdir = os.path.join(_WORKDIR.value, name, f"seed_{seed}")
      row = {"rollback": rollback_on, "seed": seed, **_run(config, workdir)}
      logging.info("%s", row)
      rows.append(row)
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(
    "| rollback | seed | collapsed at | rollbacks | final step | probe modes | probe KL "
    "| modes / KL (EMA) | modes / KL (raw) | wall |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {'on' if r['rollback'] else 'off'} | {r['seed']} | {_cell(r['collapsed_at'])} | "
      f"{r['rollbacks']} | {r['step']} | {_cell(r['modes_covered'], '{:.0f}')} | "
      f"{_cell(r['kl_uniform'], '{:.2f}')} | {_counted(r, 'ema')} | {_counted(r, 'raw')} | "
      f"{r['seconds']:.0f} s |"
    )
  for rollback_on in settings:
    chosen = [r for r in rows if r["rollback"] == rollback_on]
    print(f"rollback {'on' if rollback_on else 'off'}: {_totals(chosen)}")


if __name__ == "__main__":
  cli.run(main)
