"""The run directory's guards: one writer at a time, a fresh start never lands on an old run, no stale temp files.

The lock is a file created with O_EXCL holding ``{host, pid, started}``; it is removed on exit. A lock left by a
process that is gone (same host, pid not alive) is stale and taken over, saying so; one held on another host cannot
be checked from here, so the message names it and how to clear it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from masc_llamagen.checkpoint import TrainingCheckpoint
from masc_llamagen.errors import TrainingError
from masc_llamagen.train.checkpointing import list_checkpoints

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    print(f"warning: removing the stale lock of pid {holder.get('pid')} (no longer running) "
                          f"on {self.path.parent}", flush=True)
                    self.path.unlink(missing_ok=True)
                    continue
                raise TrainingError(
                    f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')}; wait for that run to end, or delete {self.path} if it is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise TrainingError(f"could not take the lock {self.path}; delete it if no run uses {self.path.parent}")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temp_files(ckpt_dir: Path) -> list[Path]:
    """Half-written checkpoints of a killed run (``.ckpt-*.tmp``, and ``.ckpt-*.tmp-PID`` of older versions); only
    called while holding the lock."""
    d = Path(ckpt_dir)
    stale = [p for p in d.glob(".ckpt-*.tmp*")] if d.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def refuse_fresh_start_over_a_run(ckpt_dir: Path) -> None:
    found = list_checkpoints(ckpt_dir)
    if found:
        raise TrainingError(
            f"{Path(ckpt_dir).parent} already holds a run (checkpoints up to step {found[-1][0]}); train.resume=false "
            "would mix a fresh run into it. Resume it (train.resume=true) or start fresh elsewhere (name=... or "
            "hydra.run.dir=...)")


def load_newest_checkpoint(ckpt_dir: Path) -> tuple[Path | None, TrainingCheckpoint | None]:
    """The newest checkpoint and its contents; a corrupt newest one stops with the previous readable one named."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        return None, None
    newest = found[-1][1]
    try:
        return newest, TrainingCheckpoint.load(newest)
    except Exception as e:  # noqa: BLE001 - any unreadable file: name it and the way out
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        previous = next((p for _, p in reversed(found[:-1]) if _reads(p)), None)
        hint = (f"move it away to resume from {previous.name}" if previous is not None
                else "move it away to start afresh (no earlier checkpoint reads)")
        raise TrainingError(f"the newest checkpoint {newest} is unreadable ({first}); {hint}") from None


def _reads(path: Path) -> bool:
    try:
        TrainingCheckpoint.load(path)
        return True
    except Exception:  # noqa: BLE001
        return False
