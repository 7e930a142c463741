"""Shared test helpers: small real configs and running the scripts as a user would."""

import importlib
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import dcgan, dense
from gan import checkpointing
from gan import state as state_lib
from gan.health import verdict

_RECIPES = {"dcgan": dcgan, "dense": dense}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' scripts get Ctrl-C as from a terminal even when the suite runs as a background job,
# which a shell starts with SIGINT ignored, and which its children would inherit.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


def run_script(name: str, *args: str, env=None) -> subprocess.CompletedProcess:
  """Runs scripts/<name> in a fresh Python from the repository root; returns its result."""
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "scripts", name), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, **(env or {})},
  )


def start_script(name: str, *args: str, env=None) -> subprocess.Popen:
  """Starts scripts/<name> in a fresh Python from the repository root, its stderr piped."""
  return subprocess.Popen(
    [sys.executable, os.path.join(ROOT, "scripts", name), *args],
    cwd=ROOT,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, **(env or {})},
  )


# For a child that may be interrupted anywhere: JAX writes a cache entry and then, apart, its
# access time; an entry left without one by an interrupt breaks every later write to the cache
# the whole run shares (its size check reads them all), so such a child does not touch it.
NO_SHARED_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def read_until(process: subprocess.Popen, text: str) -> None:
  """Reads the process's stderr until a line holds `text` (or the stream ends)."""
  for line in process.stderr:
    if text in line:
      return


def tiny_config(family: str, **overrides):
  """The `smoke` config of a family, shrunk further so a run takes seconds."""
  config = _RECIPES[family].get_config("smoke")
  config.data.num_examples = 128
  config.train.batch_size = 8
  config.train.num_steps = 4
  config.train.log_every = 2
  config.checkpoint.every = 2
  config.checkpoint.asynchronous = False
  config.eval.every = 2
  config.eval.grid_size = 4
  if family == "dcgan":
    config.model.base_width = 8
  else:
    config.model.g_widths = (32,)
    config.model.d_widths = (32,)
  for dotted, value in overrides.items():
    section, _, field = dotted.rpartition("__")
    (config[section] if section else config)[field] = value
  return config


def judge_only_non_finite(config):
  """Thresholds so loose that only non-finite values are out of bounds, from step 0."""
  config.collapse.update(
    warmup_steps=0,
    max_ms_ssim_gap=1.0,
    max_duplicate_rate=1.0,
    min_mode_coverage=0.0,
    max_ndb_fraction=1.0,
  )
  return config


def poison(workdir, config, from_step):
  """Saves a checkpoint at from_step + 1 whose learning rates make the next step non-finite,
  judged suspect, as the detector would have left it."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  _, template = state_lib.create_train_state(config)
  state = ckpt.restore(from_step, template).replace(step=jnp.int32(from_step + 1))
  poisoned = state_lib.with_hyperparams(state, learning_rate=(1e30, 1e30))
  ckpt.save(from_step + 1, poisoned, {verdict.VERDICT_METRIC: verdict.VERDICTS.index("suspect")})
  ckpt.wait()
  ckpt.close()


def plain_leaves(tree) -> list:
  """The leaves of a pytree, PRNG keys as their raw data, so that numpy can compare them."""
  return [
    jax.random.key_data(x)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
    else x
    for x in jax.tree.leaves(tree)
  ]


def pytest_collection_modifyitems(items):
  """Slow tests first, in their order, then the rest: with several workers (make test), the
  long runs start early and the quick tests fill the end, so no worker waits alone on one."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def xdist_groups_kept(request):
  """Under `--dist loadgroup` a worker's grouped tests carry their group in their ids, which is
  how the scheduler keeps a group on one worker; a pytest and pytest-xdist that disagree on ids
  lose the groups silently, and every worker sets up a group's shared runs again."""
  if not getattr(request.config.option, "loadgroup", False):  # set in xdist workers only
    return
  session = request.node.session
  lost = [
    i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid
  ]
  if lost:
    pytest.fail(
      f"pytest-xdist's loadgroup left {lost[0]} (and {len(lost) - 1} more) ungrouped: "
      "use the pytest that setup.cfg pins"
    )


@pytest.fixture
def workdir(tmp_path):
  return str(tmp_path / "run")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """Shares compiled XLA programs between tests, between the workers of `make test`, and with
  the scripts and child processes they start (through the environment): many runs compile the
  same tiny networks. A size limit turns on JAX's file lock around each read and write of the
  cache, so that no process reads an entry another is still writing; it is never reached. Only
  programs that take 0.2 s or more to compile are kept: with every eager operation in it, the
  lock's bookkeeping (a scan of the whole cache at each write) cost more than sharing saved."""
  importlib.import_module("filelock")  # the lock's; without it JAX would turn the cache off
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # each worker's folder lies in the one folder of the whole run
  cache = str(base / "xla_cache")
  settings = {
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(64 << 30),
  }
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", 64 << 30)
  before = {name: os.environ.get(name) for name in settings}
  os.environ.update(settings)
  yield
  for name, value in before.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def fast_default_prng():
  """The keys tests make for themselves (`jax.random.key(0)`, `nnx.Rngs(0)`) use rbg, which
  XLA:CPU compiles several times faster than the default threefry, as the runs' own keys do
  (`train.prng_impl`). The library never relies on this default."""
  before = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", before)
