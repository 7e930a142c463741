"""Trains one config over several seeds, with and without rollback, and tabulates collapses.

    python scripts/collapse_study.py --config=configs/collapse_demo.py --seeds=0,1,2,3,4 \
        --workdir=runs/collapse_study

For each seed and each setting of collapse.rollback it trains in WORKDIR/<rollback|no_rollback>/
seed_<N>/ and reports whether the run collapsed (and at which step), how many rollbacks it made,
the modes covered and the KL from uniform at the end (or at the collapse), and the wall time.
Prints a Markdown table and writes the rows to WORKDIR/results.json.
"""

import json
import os
import time

from absl import flags, logging
from ml_collections import config_flags

from gan import checkpointing, cli, rollback, trainer
from gan.health import verdict

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config to study.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "train.seed values.")
_ROLLBACK = flags.DEFINE_enum("rollback", "both", ["both", "on", "off"], "Which settings to run.")
flags.mark_flags_as_required(["config"])


def _run(config, workdir: str) -> dict:
  start = time.perf_counter()
  try:
    state = trainer.train_and_evaluate(config, workdir)
    step, collapsed_at = int(state.step), None
    metrics = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).metrics(step) or {}
    signals = {k.removeprefix("health/"): v for k, v in metrics.items()}
  except verdict.CollapseError as e:
    step, collapsed_at, signals = e.step, e.step, e.signals
  return {
    "step": step,
    "collapsed_at": collapsed_at,
    "rollbacks": rollback.count(workdir),
    "modes_covered": signals.get("modes_covered"),
    "kl_uniform": signals.get("kl_uniform"),
    "seconds": round(time.perf_counter() - start, 1),
  }


def _cell(value, fmt="{}"):
  return "-" if value is None else fmt.format(value)


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
  print("| rollback | seed | collapsed at | rollbacks | final step | modes covered | KL | wall |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {'on' if r['rollback'] else 'off'} | {r['seed']} | {_cell(r['collapsed_at'])} | "
      f"{r['rollbacks']} | {r['step']} | {_cell(r['modes_covered'], '{:.0f}')} | "
      f"{_cell(r['kl_uniform'], '{:.2f}')} | {r['seconds']:.0f} s |"
    )


if __name__ == "__main__":
  cli.run(main)
