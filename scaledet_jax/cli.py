"""Shared command-line plumbing: config files, overrides and one-line errors for user mistakes.

``run_app(main, prog)`` runs an absl ``main`` and decides how a failure ends (``describe_error``):

* exit 2, one line ``PROG: error: MESSAGE`` -- a mistake in what was asked:
  ``UserError`` (raised wherever the library detects one: config values, data, paths, checkpoints);
  ``OSError`` (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, a full disk, ...:
  the line names the path); ``ValueError`` raised by scaledet_jax's own checks or by a library that
  validates what the user passed (tfds split or dataset names, a json decoder, ...).
* exit 1, one line -- the run itself failed: ``FloatingPointError`` (the NaN guard: loss or
  parameters became NaN/Inf; nothing non-finite was checkpointed), out of memory (``MemoryError``,
  XLA ``RESOURCE_EXHAUSTED``), each with what to change.
* exit 130, ``PROG: interrupted`` -- ``KeyboardInterrupt`` (Ctrl-C; training waits for a
  checkpoint being written and the next run resumes).
* anything else is a bug and keeps its full traceback (exit 1). That includes a ``ValueError``
  raised inside the numerical stack (JAX, jaxlib, Flax, optax, orbax, TensorStore, NumPy,
  TensorFlow, clu): there it means scaledet_jax handed the library something wrong, not the user.
  The raise site decides, read from the unfiltered traceback (run_app asks JAX to keep it, as
  ``JAX_TRACEBACK_FILTERING=remove_frames``, unless that variable is set).

``SCALEDET_JAX_TRACEBACK=1`` shows the traceback for the one-line cases too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import ml_collections

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130

# A ValueError raised inside one of these packages is an internal error (traceback), see the docstring.
INTERNAL_PACKAGES = frozenset(
    {"jax", "jaxlib", "flax", "optax", "orbax", "tensorstore", "numpy", "chex", "ml_dtypes", "tensorflow",
     "keras", "clu", "scipy"}
)  # fmt: skip


class UserError(Exception):
    """A mistake in what the user asked for; reported as one line, without a traceback."""


def define_config_flag(name: str = "config", flag_values=None, sys_argv: list[str] | None = None) -> None:
    """``--config=configs/X.py`` plus ``--config.key=value`` overrides (unknown keys refused).
    ``flag_values``/``sys_argv``: another flag registry and the command line it will parse (tests)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        name,
        None,
        "Path to a config file, e.g. configs/spinenet49.py.",
        flag_values=flag_values if flag_values is not None else flags.FLAGS,
        lock_config=True,
        sys_argv=sys_argv,
    )


def config_from_flags(name: str = "config", flag_values=None) -> ml_collections.ConfigDict:
    """The parsed config, with loading failures turned into a one-line ``UserError``."""
    from absl import flags

    holder = (flag_values if flag_values is not None else flags.FLAGS)[name]
    if not holder.present:
        raise UserError(f"--{name} is required, e.g. --{name}=configs/spinenet49.py")
    path = holder.config_filename
    if not os.path.exists(path):
        raise UserError(f"config file {path!r} not found (run from the repository root; configs live in configs/)")
    try:
        return holder.value
    except OSError as e:  # ml_collections reports load errors lazily, over several lines
        raise UserError(f"cannot load config file {path!r}: {_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _parse_flags(argv: list[str], flag_values=None) -> list[str]:
    """absl's parse, with ml_collections' override errors (typos, bad types) made one line."""
    from absl import flags

    flag_values = flag_values if flag_values is not None else flags.FLAGS
    try:
        return flag_values(argv)
    except flags.Error as e:
        raise UserError(_one_line(e)) from None
    except (AttributeError, KeyError, TypeError) as e:  # --config.some.key=value problems
        details = " ".join(line.strip() for line in str(e).strip("'\"").replace("\\n", "\n").splitlines())
        raise UserError(f"bad config override: {details.replace(chr(92) + chr(39), chr(39))}") from None
    except SyntaxError as e:
        raise UserError(f"config file {e.filename} line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - an error inside the config file's own code
        raise UserError(f"cannot load the config: {type(e).__name__}: {_one_line(e)}") from None


def _quiet_library_logs(record) -> bool:
    """Keeps INFO chatter of orbax/tfds/clu internals out of the run's log (warnings still pass)."""
    import logging as py_logging

    noisy = ("/orbax/", "/tensorflow_datasets/", "/etils/")
    return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in noisy)


def keep_jax_raise_sites() -> None:
    """Makes JAX keep an exception's full traceback (as its ``__cause__``) so ``describe_error`` can
    tell where it was raised; JAX's default drops its own frames. A user's own setting wins."""
    if "JAX_TRACEBACK_FILTERING" in os.environ:
        return
    os.environ["JAX_TRACEBACK_FILTERING"] = "remove_frames"
    if "jax" in sys.modules:  # already imported: its config read the environment then
        sys.modules["jax"].config.update("jax_traceback_filtering", "remove_frames")


def raise_site_package(error: BaseException) -> str | None:
    """The top-level installed package whose code raised ``error`` ('jax', 'tensorflow_datasets', ...),
    or None for scaledet_jax, config files and the standard library."""
    tb = error.__traceback__
    cause = error.__cause__
    if cause is not None and type(cause).__name__ == "UnfilteredStackTrace" and cause.__traceback__ is not None:
        tb = cause.__traceback__  # JAX filtered ``error``'s own traceback; this one is complete
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    parts = os.path.normpath(tb.tb_frame.f_code.co_filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            index = len(parts) - 1 - parts[::-1].index(marker)
            if index + 1 < len(parts):
                return parts[index + 1].removesuffix(".py")
    return None


def _collapse(text: str, limit: int = 2000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_error(error: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an expected failure, None for a bug (see the module docstring)."""
    name = type(error).__name__
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(error, UserError):
        return _collapse(str(error), limit=10_000), EXIT_USER_ERROR
    if isinstance(error, FloatingPointError):
        return _collapse(str(error)), EXIT_RUN_FAILED
    if isinstance(error, MemoryError):
        return "out of host memory: lower data.train_batch_size or data.shuffle_buffer", EXIT_RUN_FAILED
    if name in ("XlaRuntimeError", "JaxRuntimeError") and str(error).startswith("RESOURCE_EXHAUSTED"):
        first = str(error).splitlines()[0]
        return (
            f"out of accelerator memory ({_collapse(first, 300)}): lower data.train_batch_size "
            "(or data.eval_batch_size, model.image_size)",
            EXIT_RUN_FAILED,
        )
    if isinstance(error, OSError):
        if error.strerror and error.filename is not None:
            where = repr(error.filename) + (f" -> {error.filename2!r}" if error.filename2 is not None else "")
            return f"{error.strerror}: {where}", EXIT_USER_ERROR
        return _collapse(str(error) or name), EXIT_USER_ERROR
    if isinstance(error, ValueError) and raise_site_package(error) not in INTERNAL_PACKAGES:
        return _collapse(str(error) or name), EXIT_USER_ERROR
    return None


def run_app(main: Callable[[list[str]], None], prog: str) -> None:
    """``absl.app.run(main)``; an expected failure ends with one line ``PROG: error: ...`` and its exit
    code, a bug with its traceback (``describe_error``, module docstring)."""
    from absl import app
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_quiet_library_logs)
    keep_jax_raise_sites()
    try:
        app.run(main, flags_parser=_parse_flags)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - sorted out below; bugs are re-raised
        described = None if os.environ.get("SCALEDET_JAX_TRACEBACK") == "1" else describe_error(e)
        if described is None:
            raise
        message, code = described
        if code == EXIT_INTERRUPTED:
            print(f"{prog}: {message}", file=sys.stderr)
        else:
            print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(code)
