"""Every recipe and each of its variants is a config the trainer accepts."""

import pytest

from configs import collapse_demo, dcgan, default, dense
from gan import config as config_lib
from gan.health import verdict

# Health signals measured on the 64-px anime subset (docs/collapse.md, "Real faces"): the most
# alike a healthy young DCGAN's samples were, and the collapse demo's first suspect evaluation.
_HEALTHY_REAL = {
  "ms_ssim": 0.675,
  "ms_ssim_real": 0.237,
  "duplicate_rate": 0.0,
  "ndb_fraction": 0.44,
}
_SUSPECT_REAL = {
  "ms_ssim": 0.455,
  "ms_ssim_real": 0.288,
  "duplicate_rate": 0.23,
  "ndb_fraction": 0.75,
}


@pytest.mark.parametrize("arg", [None, *default.ARGS])
@pytest.mark.parametrize("recipe", [dcgan, dense], ids=["dcgan", "dense"])
def test_each_variant_of_each_recipe_validates(recipe, arg):
  config = config_lib.validate(recipe.get_config(arg))
  assert config.model.conv_impl in ("xla", "onednn")  # `auto` resolved, as config.json records


@pytest.mark.parametrize("arg", [None, "smoke", "anime"])
def test_the_collapse_demo_validates(arg):
  config = config_lib.validate(collapse_demo.get_config(arg))
  assert config.train.b1 == 0.9 and config.collapse.rollback_b1 == 0.5
  assert config.data.source == ("image_folder" if arg == "anime" else "synthetic_faces")


def test_the_cpu_variants_train_on_the_real_faces():
  for recipe in (dcgan, dense):
    config = recipe.get_config("cpu")
    assert config.data.source == "anime_faces" and config.data.resolution == 64
    assert config.collapse.warmup_steps < config.train.num_steps  # the run's end is judged


@pytest.mark.parametrize("arg", [None, "cpu"])
@pytest.mark.parametrize("recipe", [dcgan, dense], ids=["dcgan", "dense"])
def test_the_real_faces_recipes_pass_a_healthy_young_dcgan_and_not_a_collapse(recipe, arg):
  config = recipe.get_config(arg).collapse
  step = config.warmup_steps  # the first judged step
  assert verdict.judge(_HEALTHY_REAL, config, streak=0, step=step).verdict == verdict.HEALTHY
  assert verdict.judge(_SUSPECT_REAL, config, streak=0, step=step).verdict == verdict.SUSPECT


def test_an_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="smoke, synthetic, cpu"):
    dcgan.get_config("gpu")
