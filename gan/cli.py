"""What every script shares: quiet libraries, GPUs hidden from TensorFlow, one-line user errors."""

import contextlib
import errno
import logging as std_logging
import os
import signal
import sys
import threading

from absl import app, flags, logging

from gan.errors import UserError

# TensorFlow's C++ start-up chatter; set before any module imports TensorFlow. Its oneDNN
# kernels are for TensorFlow's own math, which the scripts do not use (tf.data decodes images),
# and turning them off also stops the banner announcing them, which no log level silences.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class _Quieter(std_logging.Filter):
  """Drops records below `level` from the named packages."""

  def __init__(self, level: int, *packages: str):
    super().__init__()
    self._level = level
    self._paths = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= self._level or not any(p in record.pathname for p in self._paths)


class _Orphans(std_logging.Filter):
  """Drops asyncio's "exception was never retrieved" reports. Orbax is the only user of asyncio
  here: when a save fails, each of its parallel writes fails (in TensorStore's C++, often with no
  Python traceback), Orbax hands the first failure to the trainer, which reports it in one line,
  and asyncio reports each of the rest whenever it is garbage-collected, even after that line."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.name != "asyncio" or "exception was never retrieved" not in record.getMessage()


class _NotYetPrepared(std_logging.Filter):
  """Drops TFDS's warning that a dataset's version folder has no dataset_info.json: TFDS logs it
  whenever the dataset is not prepared yet, even with no such folder, just before the builder
  prepares it or the script says in one line why it cannot."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname or not (
      record.getMessage().endswith("has no dataset_info.json")
    )


def _one_line(error: Exception) -> str:
  # config_flags wraps what a config file raises in a quoted message with its traceback.
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
  text = " ".join(lines)
  if isinstance(error, AttributeError | KeyError) and "Did you mean" in text:
    text = "no such config field: " + text.replace("'", "")
  return text


# What the machine, not the code, makes a read or write fail with: the user can fix each.
_MACHINE_ERRNOS = frozenset(
  {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EMFILE,
  }
)


def _os_error(error: OSError) -> str:
  """'No space left on device: PATH': the operating system's words, and the file."""
  where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name)
  return f"{error.strerror or error}{f': {where}' if where else ''}"


# What Orbax leaves behind after a failed save or restore, which the trainer reports by itself:
# TensorStore's callbacks into Orbax's closed event loop, and the array reads a failed restore
# left pending, each raising again when collected (from TensorStore's threads, at any time).
_PENDING_READ = "_read_array_index_and_device_put"


def is_orbax_leftover(unraisable) -> bool:
  """Whether a sys.unraisablehook argument is one of Orbax's leftovers above."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  return getattr(unraisable.object, "__name__", None) == _PENDING_READ


def _unraisable(hook):
  """Wraps sys.unraisablehook to drop Orbax's leftovers (is_orbax_leftover), and to deliver again
  a Ctrl-C that landed in a callback whose errors Python ignores (JAX's garbage-collection
  callback, which runs often while the libraries import): it would be lost, and the run go on."""

  def quieter(unraisable):
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
      # Sent again a moment later, from another thread: raised here, it would be ignored too.
      again = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT))
      again.daemon = True
      again.start()
    elif not is_orbax_leftover(unraisable):
      hook(unraisable)

  return quieter


def _last_word(message: str) -> None:
  """Prints `message` as the last line on stderr, and sends what interpreter shutdown would print
  after it (asyncio's and TensorStore's reports about a failed save's other writes, collected at
  exit, from Python or straight from C++) to /dev/null: the user's one line stays the last."""
  print(message, file=sys.stderr, flush=True)
  with contextlib.suppress(OSError, ValueError):  # a stderr with no file descriptor: leave it
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config file reported in one line; --help prints
  the script's flags and exits 0."""
  if any(arg in _HELP for arg in argv[1:]):
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  try:
    argv = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      # config_flags defers a config file's load errors to first use: surface them now.
      flags.FLAGS.config.to_dict()
    return argv
  except Exception as e:  # config files raise anything; all of it is the user's to fix
    print(f"error: {_unknown_field(e, argv) or _one_line(e)}", file=sys.stderr)
    sys.exit(2)


def _unknown_field(error: Exception, argv: list[str]) -> str | None:
  """'no such config field: model.wobble' for an override of a field the config lacks, which
  ml_collections reports as a bare 'wobble' (a KeyError, wrapped in an AttributeError)."""
  if not isinstance(error, KeyError | AttributeError) or "Did you mean" in str(error):
    return None
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(...))
    error = error.args[0]
  name = str(error.args[0]).strip("'\"") if error.args else ""
  for arg in argv[1:]:
    flag = arg.split("=", 1)[0].removeprefix("--")
    if flag.startswith("config.") and name in flag.split(".")[1:]:
      return f"no such config field: {flag.removeprefix('config.')} (from {arg})"
  return None


def run(main) -> None:
  """Runs `main(argv)` under absl. A UserError, an OSError the machine caused (a full disk, a
  read-only or missing folder, no permission) and Ctrl-C outside the trainer's own handling each
  become one line on stderr and exit status 2."""

  def wrapped(argv):
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    handler = logging.get_absl_handler()
    handler.addFilter(_Quieter(std_logging.WARNING, "jax"))
    # Orbax logs every step of every save, and a failed background save as tracebacks from
    # each of its threads; the failure reaches the trainer as one error, reported below.
    handler.addFilter(_Quieter(std_logging.CRITICAL, "orbax"))
    handler.addFilter(_Orphans())
    handler.addFilter(_NotYetPrepared())
    try:
      import tensorflow as tf  # here, after flag parsing, so --help and flag errors stay fast

      # tf.data runs on the host; the accelerators belong to JAX.
      tf.config.set_visible_devices([], "GPU")
      return main(argv)
    except UserError as e:
      message = str(e)
    except OSError as e:
      if e.errno not in _MACHINE_ERRNOS:
        raise
      message = _os_error(e)
    except KeyboardInterrupt:
      message = "interrupted; what was saved before stays as it was"
    logging.flush()
    _last_word(f"error: {message}")
    sys.exit(2)

  app.run(wrapped, flags_parser=_parse_flags)
