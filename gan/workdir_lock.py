"""One trainer (or one change by hand) at a time per workdir: an OS file lock on WORKDIR/.lock.

The lock is `flock`'s: the kernel holds it for the life of the open file and lets go when the
process ends however it ends (kill -9 included), so a dead holder never leaves a stale lock. The
file names the holder (pid and host) for the one-line refusal a second process gets.
"""

import contextlib
import fcntl
import os
import socket

from gan.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(workdir: str, purpose: str):
  """Holds WORKDIR's lock inside the block.

  Args:
    workdir: an existing directory.
    purpose: what the holder does, named in a refusal (e.g. "training").

  Raises:
    UserError: when another process holds it, naming that process.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"cannot open {path}: {e.strerror}") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise UserError(f"{workdir} is in use by {holder}; wait for it to end or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{purpose} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
