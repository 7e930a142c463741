"""Trains a GAN.

    python scripts/train.py --config=configs/dcgan.py:smoke --workdir=runs/smoke

Override any config field with --config.a.b=value (a misspelt field is an error). Running again
with the same --workdir resumes from its latest checkpoint.
"""

import jax
from absl import flags, logging
from ml_collections import config_flags

from gan import cli, train
from gan.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file, e.g. configs/dcgan.py or configs/dense.py:smoke.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
