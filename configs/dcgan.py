"""DCGAN (Radford et al., 2015): strided convolutions in D, k4-s2 upsampling in G, BatchNorm.

    python scripts/train.py --config=configs/dcgan.py --workdir=runs/dcgan \
        --config.data.path=/path/to/animefacedataset

trains the real recipe on the Kaggle anime faces at 64 px. The arguments after a colon:
  smoke      a run of under a minute on a 2-core CPU on synthetic_faces at 32 px that still
             saves checkpoints, writes sample grids and logs to TensorBoard;
  synthetic  the full-length run on the built-in synthetic_faces (what `make train` runs);
  cpu        the real faces (data.path) at 64 px, batch 64, 3,000 steps: about an hour on 2 cores.
README.md says what to expect from each; docs/performance.md how long each takes.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.model = model = ml_collections.ConfigDict()
  model.name = "dcgan"
  model.latent_dim = 100  # size of the noise vector z
  model.base_width = 64  # channels of G's last hidden layer and D's first; doubling inwards
  model.conv_impl = "auto"  # xla | onednn (CPU kernels, kernels/) | auto: onednn where it runs
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  model.d_norm = "batch"  # D's normalisation: batch | layer | none (wgan_gp: layer or none)
  default.discriminator_options(model)

  if arg == "synthetic":
    config.data.resolution = 32
    model.base_width = 32
    config.train.batch_size = 64
    config.train.num_steps = 5000
    config.checkpoint.every = 500
    config.eval.every = 500
  if arg == "smoke":
    model.base_width = 16
    config.train.num_steps = 40
  return config
