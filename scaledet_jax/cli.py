"""Shared command-line plumbing: config files, overrides and one-line errors for user mistakes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import ml_collections


class UserError(Exception):
    """A mistake in what the user asked for; reported as one line, without a traceback."""


def define_config_flag(name: str = "config") -> None:
    """``--config=configs/X.py`` plus ``--config.key=value`` overrides (unknown keys refused)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(name, None, "Path to a config file, e.g. configs/spinenet49.py.", lock_config=True)


def config_from_flags(name: str = "config") -> ml_collections.ConfigDict:
    """The parsed config, with loading failures turned into a one-line ``UserError``."""
    from absl import flags

    holder = flags.FLAGS[name]
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


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with ml_collections' override errors (typos, bad types) made one line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
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


def run_app(main: Callable[[list[str]], None], prog: str) -> None:
    """``absl.app.run(main)``; user mistakes (UserError, ValueError) end with one line and exit 2."""
    from absl import app
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_quiet_library_logs)
    try:
        app.run(main, flags_parser=_parse_flags)
    except (UserError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
