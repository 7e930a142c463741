"""Trains a GAN.

    python scripts/train.py --config=configs/dcgan.py:smoke --workdir=runs/smoke

Override any config field with --config.a.b=value (a misspelt field is an error). Running again
with the same --workdir resumes from its latest checkpoint.

On several hosts, run the same command on each with --coordinator_address=HOST0:PORT
--num_processes=N --process_id=I (I = 0 on HOST0), and a --workdir every host can reach.
"""

from absl import flags, logging
from ml_collections import config_flags

from gan import cli
from gan.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file, e.g. configs/dcgan.py or configs/dense.py:smoke.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, to train as one of several processes."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes train together.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to N-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here, not above: --help and flag errors answer before JAX and TensorFlow load.
  import jax

  from gan import trainer

  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() > 0:
      logging.set_verbosity(logging.WARNING)  # process 0 reports progress for all
  logging.info(
    "JAX %s, process %d of %d, devices: %s",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
  )
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
