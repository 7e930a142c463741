"""Collapse detection and rollback: the verdicts, the policy that keeps the last healthy
checkpoint, and a run that diverges, is rolled back and recovers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import judge_only_non_finite, poison, run_script, tiny_config
from PIL import Image

from configs import collapse_demo, dcgan, dense
from gan import checkpointing, rollback, sampling, trainer
from gan import config as config_lib
from gan import state as state_lib
from gan.data import synthetic_faces
from gan.errors import UserError
from gan.health import signals, verdict


def _signals(**overrides):
  signals = {
    "ms_ssim": 0.11,
    "ms_ssim_real": 0.10,
    "duplicate_rate": 0.0,
    "modes_covered": 200.0,
    "modes_covered_real": 228.0,
    "kl_uniform": 1.7,
    "nonfinite": 0.0,
  }
  return {**signals, **overrides}


def _config(**overrides):
  config = tiny_config("dcgan").collapse
  config.warmup_steps = 0
  for key, value in overrides.items():
    config[key] = value
  return config


def test_diverse_samples_are_healthy():
  assert verdict.judge(_signals(), _config(), streak=0, step=10).verdict == verdict.HEALTHY


@pytest.mark.parametrize(
  "bad",
  [{"ms_ssim": 0.6}, {"duplicate_rate": 0.9}, {"modes_covered": 20.0}],
  ids=["ms_ssim", "duplicates", "modes"],
)
def test_one_signal_out_of_bounds_is_suspect_then_collapsed_after_patience(bad):
  config = _config(patience=2)
  first = verdict.judge(_signals(**bad), config, streak=0, step=10)
  assert first.verdict == verdict.SUSPECT and first.reasons
  second = verdict.judge(_signals(**bad), config, streak=first.streak, step=20)
  assert second.verdict == verdict.COLLAPSED


def test_a_healthy_evaluation_resets_the_streak():
  judgement = verdict.judge(_signals(), _config(), streak=1, step=10)
  assert judgement.streak == 0


@pytest.mark.parametrize("bad", [{"nonfinite": 1.0}, {"ms_ssim": float("nan")}])
def test_non_finite_values_are_a_collapse_at_once_even_in_warm_up(bad):
  judgement = verdict.judge(_signals(**bad), _config(warmup_steps=1000), streak=0, step=1)
  assert judgement.verdict == verdict.COLLAPSED
  assert "non-finite" in judgement.reasons[0]


def test_warm_up_leaves_a_young_generator_that_draws_one_face_unjudged():
  judgement = verdict.judge(_signals(ms_ssim=0.9), _config(warmup_steps=100), streak=0, step=50)
  assert judgement.verdict == verdict.UNJUDGED
  later = verdict.judge(_signals(ms_ssim=0.9), _config(warmup_steps=100), streak=0, step=100)
  assert later.verdict == verdict.SUSPECT


@pytest.mark.slow
def test_probe_sees_a_generator_that_draws_one_face_as_collapsed():
  config = tiny_config("dcgan")
  config.collapse.warmup_steps = 0
  n = config.collapse.num_samples
  real, _ = synthetic_faces.render(n, config.data.resolution, seed=3)
  real = real.astype(np.float32) / 127.5 - 1
  noise = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)

  def one_face(params, batch_stats, z):
    return (
      jnp.broadcast_to(params["face"], (z.shape[0], *params["face"].shape))
      + 0.01 * z[:, :1, None, None]
    )

  probe = signals.HealthProbe(config, real, noise, one_face, jax.random.PRNGKey(0))
  measured = probe({"face": jnp.asarray(real[0])}, None)
  assert measured["modes_covered"] <= 2 < measured["modes_covered_real"]
  assert measured["duplicate_rate"] == 1.0
  judgement = verdict.judge(measured, config.collapse, streak=config.collapse.patience - 1, step=1)
  assert judgement.verdict == verdict.COLLAPSED


def test_policy_never_drops_the_last_healthy_checkpoint(tmp_path):
  config = tiny_config("dense").checkpoint
  config.keep_latest = 2
  _, state = state_lib.create_train_state(tiny_config("dense"))
  ckpt = checkpointing.Checkpointer(
    str(tmp_path / "checkpoints"), config, keep_last_where=verdict.is_healthy
  )
  for step in range(2, 14, 2):
    index = 0 if step <= 4 else 1
    ckpt.save(step, state, {verdict.VERDICT_METRIC: index})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 10, 12]
  assert ckpt.steps_where(verdict.is_healthy, before=12) == [4]


def _refuse(constant):
  raise ValueError(f"{constant} is not JSON")


def _rollbacks(workdir):
  """The rollbacks a run recorded, read as strict JSON (no NaN or Infinity)."""
  with open(os.path.join(workdir, rollback.ROLLBACKS_FILE)) as f:
    return [json.loads(line, parse_constant=_refuse) for line in f]


def _flip_bytes(workdir, step):
  """Overwrites 8 bytes in the middle of the largest data file of a checkpoint, as a failing
  disk would; Orbax alone would read the changed values back without complaint."""
  data = os.path.join(workdir, "checkpoints", str(step), "default", "ocdbt.process_0", "d")
  path = max((os.path.join(data, name) for name in os.listdir(data)), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xa5" * 8)


@pytest.mark.slow
def test_a_diverging_run_rolls_back_to_its_last_healthy_checkpoint_and_recovers(workdir):
  trainer.train_and_evaluate(
    judge_only_non_finite(tiny_config("dense", train__num_steps=4)), workdir
  )
  config = judge_only_non_finite(tiny_config("dense", train__num_steps=8))
  config.collapse.lr_factor = 0.5
  config.collapse.rollback_b1 = 0.3
  poison(workdir, config, 4)

  final = trainer.train_and_evaluate(config, workdir)

  (event,) = _rollbacks(workdir)
  assert (event["from_step"], event["to_step"]) == (6, 4)
  assert "non-finite" in event["reason"]
  # Half the lower of the healthy and the fallen rates, not half the poisoned one.
  assert event["g_lr"] == pytest.approx(0.5 * config.train.g_lr)
  assert float(state_lib.learning_rates(final)[1]) == pytest.approx(0.5 * config.train.d_lr)
  assert event["b1"] == 0.3
  assert event["signals"]["nonfinite"] == 1.0
  assert float(final.g.opt_state.hyperparams["b1"]) == pytest.approx(0.3)
  assert float(final.d.opt_state.hyperparams["b1"]) == pytest.approx(0.3)
  assert int(final.step) == 8
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final.g.params))
  done = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert verdict.is_healthy(done.metrics(8))
  aside = os.path.join(workdir, checkpointing.ASIDE_DIR)
  assert any("5" in os.listdir(os.path.join(aside, d)) for d in os.listdir(aside))
  # The abandoned attempt's grid of step 6 is kept apart from the grid the new attempt drew.
  samples = os.path.join(workdir, sampling.SAMPLES_DIR)
  assert os.listdir(os.path.join(samples, "rollback_1")) == ["step_0000006.png"]
  assert sorted(n for n in os.listdir(samples) if n.endswith(".png")) == [
    f"step_{s:07d}.png" for s in (2, 4, 6, 8)
  ]
  collapsed = Image.open(os.path.join(samples, "rollback_1", "step_0000006.png"))
  recovered = Image.open(sampling.grid_path(workdir, 6))
  assert np.asarray(collapsed).tobytes() != np.asarray(recovered).tobytes()


@pytest.mark.slow
def test_a_rollback_skips_a_healthy_checkpoint_whose_bytes_changed(workdir, caplog):
  trainer.train_and_evaluate(
    judge_only_non_finite(tiny_config("dense", train__num_steps=4)), workdir
  )
  config = judge_only_non_finite(tiny_config("dense", train__num_steps=8))
  poison(workdir, config, 4)
  _flip_bytes(workdir, 4)

  final = trainer.train_and_evaluate(config, workdir)

  (event,) = _rollbacks(workdir)
  assert (event["from_step"], event["to_step"]) == (6, 2)
  assert "Skipping the checkpoint of step 4: it is damaged: its state does not match" in (
    caplog.text
  )
  assert int(final.step) == 8


def test_rollbacks_jsonl_is_strict_json_with_non_finite_values_as_null(tmp_path):
  nan, inf = float("nan"), float("inf")
  rollback.record(
    str(tmp_path),
    {"from_step": 6, "reason": "non-finite ms_ssim", "g_lr": inf, "signals": {"ms_ssim": nan}},
  )
  (event,) = _rollbacks(str(tmp_path))
  assert (event["from_step"], event["g_lr"], event["signals"]) == (6, None, {"ms_ssim": None})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_learning_rate_is_refused_before_it_can_cause_rollbacks(value):
  with pytest.raises(UserError, match="train.g_lr must be a finite number"):
    config_lib.validate(tiny_config("dense", train__g_lr=float(value)))


@pytest.mark.parametrize("recipe", [dcgan, dense, collapse_demo])
def test_every_recipe_s_rollback_lowers_the_learning_rates_that_collapsed(recipe):
  assert 0 < recipe.get_config().collapse.lr_factor < 1


@pytest.mark.slow
def test_with_only_warm_up_checkpoints_a_rollback_starts_afresh(workdir):
  # The smoke configs' warm-up outlasts these runs: their checkpoints are never judged.
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=4), workdir)
  config = tiny_config("dense", train__num_steps=6)
  poison(workdir, config, 4)

  final = trainer.train_and_evaluate(config, workdir)

  (event,) = _rollbacks(workdir)
  assert (event["from_step"], event["to_step"]) == (6, 0)
  assert int(final.step) == 6
  done = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert verdict.verdict_of(done.metrics(6)) == verdict.UNJUDGED
  (aside,) = os.listdir(os.path.join(workdir, checkpointing.ASIDE_DIR))
  moved = os.listdir(os.path.join(workdir, checkpointing.ASIDE_DIR, aside))
  assert sorted(moved, key=int) == ["2", "4", "5"]


_DAMAGE_WARNINGS = {
  "truncated": "it cannot be read",
  "missing": "it cannot be read",
  "flipped": "it is damaged: its state does not match the checksum",
  "metrics": "it is damaged, its metrics cannot be read",
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(_DAMAGE_WARNINGS))
def test_a_damaged_checkpoint_is_skipped_with_a_warning_for_the_one_before(damage, workdir, caplog):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=4), workdir)
  data = os.path.join(workdir, "checkpoints", "4", "default", "ocdbt.process_0", "d")
  if damage == "flipped":
    _flip_bytes(workdir, 4)
  elif damage == "metrics":
    open(os.path.join(workdir, "checkpoints", "4", "metrics", "metrics"), "w").close()
  for name in os.listdir(data) if damage in ("truncated", "missing") else ():
    if damage == "missing":
      os.remove(os.path.join(data, name))
    else:
      os.truncate(os.path.join(data, name), os.path.getsize(os.path.join(data, name)) // 2)

  final = trainer.train_and_evaluate(tiny_config("dense", train__num_steps=6), workdir)

  assert f"Skipping the checkpoint of step 4: {_DAMAGE_WARNINGS[damage]}" in caplog.text
  assert int(final.step) == 6
  (aside,) = os.listdir(os.path.join(workdir, checkpointing.ASIDE_DIR))
  assert os.listdir(os.path.join(workdir, checkpointing.ASIDE_DIR, aside)) == ["4"]
  resumed = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert resumed.all_steps() == [2, 4, 6]


@pytest.mark.slow
def test_with_rollback_off_a_collapse_stops_the_run_with_one_line(workdir):
  config = tiny_config("dense", train__g_lr=1e30, train__d_lr=1e30)
  config.collapse.rollback = False
  with pytest.raises(verdict.CollapseError, match="training collapsed at step 2 .*non-finite"):
    trainer.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_checkpoints_script_lists_steps_and_rolls_back_by_hand(workdir):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=6), workdir)
  listed = run_script("checkpoints.py", "list", f"--workdir={workdir}")
  assert listed.returncode == 0, listed.stderr[-2000:]
  rows = [line.split() for line in listed.stdout.splitlines()]
  health = ["modes", "kl", "ms_ssim", "dup", "ndb"]  # synthetic_faces: the modes too
  assert rows[0] == ["step", "verdict", "d_loss", "g_loss", *health, "swd"]
  assert all(len(row) == len(rows[0]) and "-" not in row for row in rows)
  assert [(row[0], row[1]) for row in rows[1:]] == [
    ("2", "unjudged"),
    ("4", "unjudged"),
    ("6", "unjudged"),
  ]

  missing = run_script("checkpoints.py", "rollback", f"--workdir={workdir}", "--step=3")
  assert missing.returncode == 2
  assert "saved steps: 2, 4, 6" in missing.stderr and "Traceback" not in missing.stderr

  moved = run_script("checkpoints.py", "rollback", f"--workdir={workdir}", "--step=2")
  assert moved.returncode == 0, moved.stderr[-2000:]
  assert run_script("checkpoints.py", "list", f"--workdir={workdir}").stdout.count("unjudged") == 1
  resumed = trainer.train_and_evaluate(tiny_config("dense", train__num_steps=4), workdir)
  assert int(resumed.step) == 4


@pytest.mark.slow
def test_checkpoints_script_leaves_out_the_columns_no_checkpoint_has(workdir):
  config = tiny_config("dense", train__num_steps=2)
  config.eval.metrics = ()
  trainer.train_and_evaluate(config, workdir)
  listed = run_script("checkpoints.py", "list", f"--workdir={workdir}")
  assert listed.returncode == 0, listed.stderr[-2000:]
  header = listed.stdout.splitlines()[0].split()
  assert "ndb" in header and "swd" not in header


@pytest.mark.slow
def test_a_checkpoint_with_damaged_metrics_is_listed_as_such_and_training_goes_on(workdir):
  trainer.train_and_evaluate(tiny_config("dense", train__num_steps=6), workdir)
  open(os.path.join(workdir, "checkpoints", "2", "metrics", "metrics"), "w").close()

  listed = run_script("checkpoints.py", "list", f"--workdir={workdir}")
  assert listed.returncode == 0, listed.stderr[-2000:]
  assert "Traceback" not in listed.stderr
  rows = [line.split()[:2] for line in listed.stdout.splitlines()[1:]]
  assert rows == [["2", "damaged"], ["4", "unjudged"], ["6", "unjudged"]]
  resumed = trainer.train_and_evaluate(tiny_config("dense", train__num_steps=8), workdir)
  assert int(resumed.step) == 8
  (aside,) = os.listdir(os.path.join(workdir, checkpointing.ASIDE_DIR))
  assert os.listdir(os.path.join(workdir, checkpointing.ASIDE_DIR, aside)) == ["2"]


@pytest.mark.slow
@pytest.mark.parametrize("diverging", [False, True])
def test_collapse_study_tabulates_each_seed_and_counts_the_modes_it_ends_with(tmp_path, diverging):
  # Learning rates of 1e30 make the first step non-finite: a collapse at once, warm-up or not.
  lrs = ["--config.train.g_lr=1e30", "--config.train.d_lr=1e30"] if diverging else []
  result = run_script(
    "collapse_study.py",
    "--config=configs/dense.py:smoke",
    f"--workdir={tmp_path}",
    "--seeds=0",
    "--rollback=off",
    "--config.train.num_steps=4",
    "--config.train.batch_size=8",
    "--config.collapse.num_samples=16",
    "--modes_samples=64",
    *lrs,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / "results.json") as f:
    (row,) = json.load(f)
  assert row["modes"]["num_samples"] == 64
  if diverging:  # counted on the generator that collapsed: all its samples fall in one mode
    assert row["collapsed_at"] == row["step"] == 4  # found at the first log (the last step)
    assert row["modes"]["ema"]["modes_covered"] == row["modes"]["raw"]["modes_covered"] == 1
    assert row["modes"]["raw"]["kl_uniform"] == pytest.approx(np.log(1000), rel=1e-5)
    assert "rollback off: 1 of 1 collapsed (at steps 4)" in result.stdout
    return
  assert (row["seed"], row["rollback"], row["step"], row["collapsed_at"]) == (0, False, 4, None)
  assert 0 < row["modes_covered"] <= 16
  for generator in ("ema", "raw"):
    assert 0 < row["modes"][generator]["modes_covered"] <= 64
  assert "| off | 0 | - | 0 | 4 |" in result.stdout
  assert "rollback off: 0 of 1 collapsed; ema: " in result.stdout
