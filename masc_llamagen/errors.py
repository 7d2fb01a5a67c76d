"""One base class for every error a user can fix, and the one way entry points report it.

Each package raises its own subclass (``CheckpointError``, ``HeadError`` ...) with a message that names the problem
and the fix; every entry point turns a ``MascError`` (and the OS errors a user causes: a missing file, a read-only
or full disk) into one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager


class MascError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(MascError, ValueError):
    """A config value that cannot work (checked before anything runs)."""


class TrainingError(MascError, RuntimeError):
    """A run that must stop or cannot start (non-finite loss, a run directory in use, an incompatible resume)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message as one line (a library's multi-line message would break the one-line rule)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def describe_os_error(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free space (earlier checkpoints are intact) and rerun"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {e.strerror}; pick a writable place (paths.runs=..., paths.artifacts=...)"
    if isinstance(e, FileNotFoundError):
        return f"{e.filename} does not exist; check the path" if e.filename else str(e)
    return f"{e.strerror or e}{where}"


@contextmanager
def user_errors():
    """``with user_errors(): main()``: one line and exit 1 for what the user can fix, tracebacks for bugs only."""
    try:
        yield
    except MascError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
