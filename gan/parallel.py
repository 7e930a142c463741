"""Data parallelism over the devices of one or many processes, with JAX's own machinery.

One `Mesh` with a single axis, `data`, spans the devices. The TrainState is replicated on every
device; each global batch is split along the data axis, one slice per device, and XLA inserts
the all-reduces, so gradients and BatchNorm statistics are those of the whole global batch and
the step computes what one device with the same batch computes.

With several processes (`jax.distributed.initialize`, e.g. one per host), each process feeds the
rows of the global batch that its own devices hold (`make_array_from_process_local_data`).
Replicated results are the same on every process, so each reads its local copy (`to_host`).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gan.errors import UserError

DATA_AXIS = "data"


def create_mesh(data_axis_size: int = 0) -> Mesh:
  """A one-axis mesh over `data_axis_size` devices; 0 means all of them.

  Raises:
    UserError: for more devices than exist, or fewer than all of them with several processes.
  """
  devices = jax.devices()
  size = data_axis_size or len(devices)
  if not 0 < size <= len(devices):
    raise UserError(
      f"mesh.data_axis_size is {data_axis_size} but {len(devices)} devices are available "
      "(0 uses all of them)"
    )
  if jax.process_count() > 1 and size != len(devices):
    raise UserError(
      f"with {jax.process_count()} processes the mesh must span all {len(devices)} devices; "
      f"set mesh.data_axis_size to 0, not {data_axis_size}"
    )
  return Mesh(np.asarray(devices[:size]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same whole array on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split along the data axis: device i holds the i-th slice of the batch."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises UserError unless the global batch splits evenly over the devices."""
  if batch_size % mesh.size:
    raise UserError(
      f"train.batch_size {batch_size} does not split over the {mesh.size} devices of the data "
      f"axis: use a multiple of {mesh.size}, or set mesh.data_axis_size"
    )


def process_rows(batch_size: int) -> slice:
  """The rows of each global batch that this process feeds: its devices' slices, in order."""
  per_process = batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Makes a global batch, split over `sharding`, from this process's rows of it."""
  return {
    name: jax.make_array_from_process_local_data(sharding, rows) for name, rows in local.items()
  }


def gather_rows(local: np.ndarray) -> np.ndarray:
  """The whole global batch on every process, from each process's rows (in process order)."""
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def to_host(tree):
  """Fetches a pytree of replicated (or single-device) arrays to numpy.

  A replicated array spanning several processes is not fully addressable; every process holds
  the same values, so each reads its own first copy.
  """

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x.addressable_shards[0].data
    return x

  return jax.device_get(jax.tree.map(fetch, tree))


def agree(flag: bool) -> bool:
  """True on every process when `flag` is True on any: a decision all processes take together."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def is_main_process() -> bool:
  """Process 0 alone writes logs, samples and other files besides the checkpoints."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process gets here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
