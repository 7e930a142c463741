"""Lists a run's checkpoints, or sends the next training run back to an earlier one.

    python scripts/checkpoints.py list --workdir=runs/dcgan
    python scripts/checkpoints.py rollback --workdir=runs/dcgan --step=12000

`list` shows each checkpoint's verdict, losses, health signals (modes covered and KL from
uniform on synthetic_faces, MS-SSIM, near duplicates, NDB) and the EMA generator's SWD, leaving
out the columns no checkpoint of the run has; a checkpoint whose metrics cannot be read is
"damaged", and training never uses it. `rollback` moves the checkpoints after --step to
WORKDIR/checkpoints_aside/<time>/ (nothing is deleted), so the next `scripts/train.py` run with
this workdir continues from --step.
"""

import os

from absl import flags

from gan import checkpointing, cli, workdir_lock
from gan.errors import UserError
from gan.health import verdict

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "rollback: the saved step to continue from.")

# The metrics shown beside each step: a column for each that some checkpoint of the run has.
_COLUMNS = (
  ("d_loss", "d_loss", "{:.3f}"),
  ("g_loss", "g_loss", "{:.3f}"),
  ("modes", "health/modes_covered", "{:.0f}"),
  ("kl", "health/kl_uniform", "{:.3f}"),
  ("ms_ssim", "health/ms_ssim", "{:.3f}"),
  ("dup", "health/duplicate_rate", "{:.2f}"),
  ("ndb", "health/ndb_fraction", "{:.2f}"),
  ("swd", "eval/swd_mean", "{:.1f}"),
)


def _open(workdir: str) -> checkpointing.Checkpointer:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoints in {workdir}: {directory} does not exist")
  return checkpointing.Checkpointer(directory)


def _list(ckpt: checkpointing.Checkpointer) -> None:
  steps, damaged = ckpt.all_steps(), ckpt.damaged()
  if not steps and not damaged:
    raise UserError(f"{ckpt.directory} holds no checkpoints")
  listed = {
    step: {} if step in damaged else ckpt.metrics(step) or {} for step in steps + [*damaged]
  }
  columns = [c for c in _COLUMNS if any(c[1] in metrics for metrics in listed.values())]
  rows = [["step", "verdict", *(name for name, _, _ in columns)]]
  for step, metrics in sorted(listed.items()):
    cells = [fmt.format(metrics[key]) if key in metrics else "-" for _, key, fmt in columns]
    rows.append([str(step), "damaged" if step in damaged else verdict.verdict_of(metrics), *cells])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  for row in rows:
    print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def _rollback(ckpt: checkpointing.Checkpointer, step: int | None) -> None:
  if step is None:
    raise UserError("rollback needs --step=N, one of the saved steps (see the list command)")
  ckpt.require(step)
  with workdir_lock.hold(os.path.dirname(ckpt.directory), "a rollback by hand"):
    moved = ckpt.set_aside_after(step)
  aside = os.path.join(os.path.dirname(ckpt.directory), checkpointing.ASIDE_DIR)
  print(
    f"the next training run continues from step {step}; "
    + (f"moved steps {', '.join(map(str, moved))} to {aside}" if moved else "nothing moved")
  )


def main(argv):
  commands = {"list": _list, "rollback": lambda ckpt: _rollback(ckpt, _STEP.value)}
  if len(argv) != 2 or argv[1] not in commands:
    raise UserError(f"usage: checkpoints.py {{{'|'.join(commands)}}} --workdir=DIR [--step=N]")
  ckpt = _open(_WORKDIR.value)
  try:
    commands[argv[1]](ckpt)
  finally:
    ckpt.close()


if __name__ == "__main__":
  cli.run(main)
