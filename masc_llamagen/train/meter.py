"""Training throughput with evaluation and checkpoint time paused out, and the stop signal the loop obeys."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import torch


class Throughput:
    """Images and tokens per second over training time only.

    On CUDA the clock is read after a device sync, and only where the loop syncs anyway (log steps) or is about to
    do slow work (hooks), so it adds no per-step host sync.
    """

    def __init__(self, step: int):
        self.last_step, self.busy = step, 0.0
        self.last = time.perf_counter()

    def rates(self, step: int, batch: int, tokens_per_image: int, device: torch.device) -> dict:
        _sync(device)
        now = time.perf_counter()
        dt = max(now - self.last - self.busy, 1e-9)
        steps = max(step - self.last_step, 1)
        self.last, self.last_step, self.busy = now, step, 0.0
        out = {"train/images_per_s": steps * batch / dt, "train/tokens_per_s": steps * batch * tokens_per_image / dt,
               "train/step_time_s": dt / steps}
        if device.type == "cuda":
            out["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out

    @contextmanager
    def paused(self, device: torch.device):
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.busy += time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StopSignal:
    """SIGTERM/SIGINT (cluster pre-emption, Ctrl-C): the loop finishes the step, saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self) -> StopSignal:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
