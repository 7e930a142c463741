"""Settings shared by every recipe; configs/dcgan.py and configs/dense.py build on these.

Not a recipe by itself: it has no model section. Use configs/dcgan.py or configs/dense.py.
"""

import ml_collections

# The arguments every recipe accepts after the colon, e.g. `--config=configs/dcgan.py:smoke`.
ARGS = ("smoke", "synthetic", "cpu")


def discriminator_options(model: ml_collections.ConfigDict) -> None:
  """Adds D's options against collapse, which both families share, to a `model` section: all
  off, as in the plain recipes (docs/collapse.md, "Preventing collapse")."""
  model.d_spectral_norm = False  # spectral norm on each D layer (Miyato et al. 2018)
  model.d_minibatch_std = False  # ProGAN's minibatch-std feature before D's last layer
  model.d_pack = 1  # PacGAN: D judges this many images as one input; 1 is off


def get_config(arg=None):
  """Returns the shared defaults: the anime-faces data, the DCGAN optimiser, the intervals."""
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  data.source = "anime_faces"  # synthetic_faces | anime_faces | image_folder
  data.path = ""  # image_folder: the folder; anime_faces: where archive.zip or images/ lies
  data.resolution = 64  # side of the square training images, in pixels
  data.num_examples = 20_000  # synthetic_faces only: how many images it draws
  data.seed = 0  # synthetic_faces only: the seed that draws the dataset (not the training seed)
  data.random_flip = True  # mirror images left-right at random: faces are near symmetric
  data.cache = True  # keep decoded, resized images in memory: each is decoded once per process
  data.tfds_data_dir = ""  # where TFDS keeps the prepared anime_faces; '' is TFDS's default
  data.min_image_size = 16  # images smaller than this on either side are skipped and counted

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128  # images per step, the DCGAN paper's batch
  train.num_steps = 20_000  # total generator updates (about 40 epochs of the 63k Kaggle set)
  train.seed = 0  # root of every random number in the run: init, noise, dropout
  # The PRNG behind every key: 'rbg' compiles several times faster than JAX's default
  # 'threefry2x32' on XLA:CPU and is as deterministic on one backend; another gives other numbers.
  train.prng_impl = "rbg"
  train.loss = "non_saturating"  # non_saturating | hinge | least_squares | wgan_gp
  train.gp_gamma = 10.0  # wgan_gp only: the weight of its gradient penalty (the paper's 10)
  # Against collapse (docs/collapse.md, "Preventing collapse"); 0 and '' are off.
  train.r1_gamma = 0.0  # R1 penalty gamma / 2 * E||grad D(real)||^2 (Mescheder et al. 2018)
  train.r1_every = 16  # R1 on every this-many D updates, scaled by this (StyleGAN2's lazy R1)
  train.diffaugment = ""  # DiffAugment before D, e.g. 'color,translation,cutout' (Zhao et al.)
  train.g_lr = 2e-4  # generator Adam learning rate (DCGAN paper)
  train.d_lr = 2e-4  # discriminator Adam learning rate (DCGAN paper)
  train.b1 = 0.5  # Adam beta1: 0.5 rather than 0.9 steadies GAN training (DCGAN paper)
  train.b2 = 0.999  # Adam beta2
  train.d_steps = 1  # discriminator updates per generator update, each with fresh noise
  # The EMA of G's weights, which samples and evaluation use, as StyleGAN2-ADA sets it: its
  # half-life in thousands of images (so the same in images whatever the batch; 0 turns it
  # off), ramped up as a fraction of the images trained on so far so that a young generator's
  # EMA is not a blur of its first weights (0: no ramp).
  train.ema_kimg = 20.0
  train.ema_rampup = 0.05
  train.log_every = 50  # steps between scalar logs (the only regular device->host fetch)

  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.every = 1000  # steps between checkpoints; the last step is always saved
  checkpoint.keep_latest = 3  # the newest checkpoints kept
  checkpoint.keep_every = 5000  # also keep every checkpoint whose step is a multiple of this
  checkpoint.asynchronous = True  # save in the background while training goes on
  checkpoint.best_metric = "swd_mean"  # also keep the checkpoint best by this eval metric; '' none
  checkpoint.best_mode = "min"  # min | max: which end of best_metric is best
  checkpoint.best_generator = "ema"  # ema | raw: whose best_metric ranks (raw needs ema_kimg > 0)

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.every = 1000  # steps between sample grids (TensorBoard and samples/*.png)
  evaluation.grid_size = 64  # samples in the grid, drawn from one fixed noise batch
  # Quality metrics every eval.every steps: swd, precision_recall_rvgg, density_coverage_rvgg
  # (a VGG-16 with fixed random weights) and, on synthetic_faces, modes (no weights needed), and
  # fid, kid, precision_recall, density_coverage (Inception-v3 at 299 px on every image, with
  # pytorch-fid's weights, downloaded on first use; see README.md). () turns them off.
  evaluation.metrics = ("swd",)
  evaluation.num_samples = 1000  # generated (and real) images the quality metrics compare
  # pytorch-fid's Inception .pth; '' is $GAN_INCEPTION_WEIGHTS, else ~/.cache/gan (downloaded).
  evaluation.inception_weights = ""

  config.collapse = collapse = ml_collections.ConfigDict()
  collapse.rollback = True  # on a collapsed verdict, go back to the last healthy checkpoint
  collapse.num_samples = 256  # generated (and real) images the health signals are measured on
  collapse.num_pairs = 512  # random pairs behind each mean MS-SSIM
  collapse.duplicate_distance = 0.1  # RMS pixel distance ([-1, 1] units) of a near duplicate
  collapse.warmup_steps = 2000  # before this step only non-finite values are judged: "unjudged"
  # Out of bounds (a "suspect" evaluation) when any of these is crossed:
  # Samples' mean MS-SSIM above the real images' by more than this. A young DCGAN's real faces
  # are alike by MS-SSIM without having collapsed (healthy runs 0.19-0.44 above the real images'
  # to step 3,000, docs/collapse.md), so on real faces it only catches the extreme; NDB and the
  # near-duplicate rate catch the rest. synthetic_faces runs stay within 0.02: 0.2 there.
  collapse.max_ms_ssim_gap = 0.5
  collapse.max_duplicate_rate = 0.25  # more than this fraction of samples are near duplicates
  collapse.min_mode_coverage = 0.5  # synthetic_faces: fewer modes than this x the real images'
  # NDB (any dataset): more than this share of the real images' layout bins hold significantly
  # more or fewer samples than real images (see docs/collapse.md for how it was set)
  collapse.max_ndb_fraction = 0.5
  collapse.ndb_bins = 16  # k-means bins of the real images' 8x8 layouts behind NDB
  collapse.patience = 2  # suspect evaluations in a row that make a collapse
  collapse.max_rollbacks = 5  # stop with an error after this many rollbacks in one run
  # Multiply both learning rates by this at each rollback (the lower of the restored and the
  # fallen state's, so repeated rollbacks keep lowering them); 1.0 would retry the settings that
  # collapsed, with only new random numbers.
  collapse.lr_factor = 0.5
  # Set both optimisers' Adam beta1 to this at each rollback (None keeps it): less momentum is
  # the DCGAN paper's cure for unstable training.
  collapse.rollback_b1 = ml_collections.config_dict.placeholder(float)

  config.mesh = mesh = ml_collections.ConfigDict()
  # Devices the global batch (train.batch_size) is split over; 0 is every device of every
  # process. The batch must be a multiple of it.
  mesh.data_axis_size = 0

  # Start from this saved step instead of the latest one; later checkpoints are moved aside.
  config.restore_step = ml_collections.config_dict.placeholder(int)

  if arg not in (None, *ARGS):
    raise ValueError(f"unknown config argument {arg!r}; expected one of {', '.join(ARGS)}")
  if arg in ("smoke", "synthetic"):
    data.source = "synthetic_faces"
    evaluation.num_samples = 500  # at 32 px SWD on 1,000 would take a tenth of the training time
    collapse.max_ms_ssim_gap = 0.2
  if arg == "smoke":
    data.resolution = 32
    data.num_examples = 1024
    train.batch_size = 32
    train.log_every = 10
    checkpoint.every = 20
    checkpoint.keep_every = 0
    evaluation.every = 20
    evaluation.grid_size = 16
    evaluation.num_samples = 64
    collapse.num_samples = 64
    collapse.warmup_steps = 1000  # past the end: a smoke run is too short to judge diversity
    collapse.num_pairs = 128
  if arg == "cpu":  # the real faces in about an hour on 2 CPU cores (data.path: the download)
    train.batch_size = 64  # 64 px, ~1 step/s for DCGAN with the CPU kernels
    train.num_steps = 3000  # 192k images, 3 epochs of the 63k Kaggle set
    checkpoint.every = 500
    checkpoint.keep_every = 0
    evaluation.every = 500
    collapse.warmup_steps = 1000
  return config
