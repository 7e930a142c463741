"""Dense GAN: multilayer perceptrons for G and D, the faster-per-step family of the study.

    python scripts/train.py --config=configs/dense.py --workdir=runs/dense \
        --config.data.path=/path/to/animefacedataset

trains the dense recipe on the Kaggle anime faces at 64 px. The arguments after a colon:
  smoke      a run of under a minute on a 2-core CPU on synthetic_faces at 32 px that still
             saves checkpoints, writes sample grids and logs to TensorBoard;
  synthetic  the full-length run on the built-in synthetic_faces;
  cpu        the real faces (data.path) at 64 px, batch 64, in about the hour of dcgan.py:cpu.
README.md says what to expect from each; docs/performance.md how long each takes.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.model = model = ml_collections.ConfigDict()
  model.name = "dense"
  model.latent_dim = 100  # size of the noise vector z
  model.g_widths = (256, 512, 1024)  # G's hidden layer widths, from z outwards
  model.d_widths = (1024, 512, 256)  # D's hidden layer widths, from the image inwards
  model.activation = "relu"  # G's activation: relu | leaky_relu | gelu | silu (D: leaky_relu)
  model.g_norm = "batch"  # normalisation after G's hidden layers: none | batch | layer
  model.d_norm = "none"  # normalisation after D's hidden layers: none | layer
  model.d_dropout = 0.3  # dropout after each of D's hidden layers, against memorising
  model.conv_impl = "auto"  # xla | onednn (CPU kernels, kernels/) | auto: onednn where it runs
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  default.discriminator_options(model)

  # Dense networks need more updates than convolutional ones for the same faces.
  config.train.num_steps = 40_000
  if arg == "synthetic":
    config.data.resolution = 32
    config.train.batch_size = 64
    config.train.num_steps = 10_000
    config.checkpoint.every = 1000
    config.eval.every = 1000
  if arg == "smoke":
    model.g_widths = (128, 256)
    model.d_widths = (256, 128)
    config.train.num_steps = 60
  if arg == "cpu":  # dense steps are about 5x faster than DCGAN's: the same hour, more steps
    config.train.num_steps = 15_000
    config.checkpoint.every = 2500
    config.eval.every = 2500
    config.collapse.warmup_steps = 5000
  return config
