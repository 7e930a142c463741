"""A DCGAN on synthetic_faces that mode-collapses within minutes, to exercise the detector.
`:anime` is the same recipe on any folder of real anime faces (image_folder, 32 px):

    python scripts/train.py --config=configs/collapse_demo.py:anime --workdir=runs/demo_anime \
        --config.data.path=DIR [--config.collapse.rollback=False]

    python scripts/train.py --config=configs/collapse_demo.py --workdir=runs/collapse_demo \
        --config.collapse.rollback=False

stops with "error: training collapsed at step 400" (seeds 0-4 alike; 1-2.5 minutes on a 2-core
CPU): Adam's beta1 of 0.9 with 5x the DCGAN learning rates leaves the samples on 37-60 of the
modes that as many real images cover (about 225). With rollback on (the default) the run goes
back to the start (its earlier checkpoints are unjudged warm-up ones), takes the remedy below
and finishes its 2,000 steps healthy, covering about 200 modes. docs/collapse.md has the table.
On half of the 64-px anime subset (seed 0) the anime variant collapsed at step 400 (the grid one
face; MS-SSIM and NDB out of bounds); with rollback on, on the other half, it went back to the
start once and finished healthy.
"""

from configs import dcgan


def get_config(arg=None):
  if arg not in (None, "smoke", "anime"):
    raise ValueError(f"configs/collapse_demo.py takes 'smoke' or 'anime', got {arg!r}")
  # DCGAN, 32 px, batch 64 on synthetic_faces; `smoke` is the DCGAN smoke run with this optimiser.
  config = dcgan.get_config(arg if arg == "smoke" else "synthetic")
  if arg == "anime":  # the same on real faces: any folder of them, --config.data.path=DIR
    config.data.source = "image_folder"
  config.train.b1 = 0.9  # Adam's default momentum, which the DCGAN paper found unstable
  config.train.g_lr = 1e-3  # 5x the DCGAN rate: G's large, momentum-driven steps chase D
  config.train.d_lr = 1e-3  # 5x too: a fast D the generator keeps fleeing to a few modes
  # The remedy at each rollback: the DCGAN paper's beta1 of 0.5, and the default
  # collapse.lr_factor, half the learning rates.
  config.collapse.rollback_b1 = 0.5
  if arg == "smoke":
    return config
  config.train.num_steps = 2000  # long enough to collapse and, with rollback, to recover
  config.eval.every = 100  # judge health often, so a collapse is caught within minutes
  config.checkpoint.every = 100  # a checkpoint per evaluation: rollback loses little
  config.checkpoint.keep_latest = 5  # enough history to hold a healthy step before a collapse
  config.collapse.warmup_steps = 300  # past the all-alike samples of the first ~100 steps
  return config
