"""One measurement per process: the speed benchmarks' workers run here, so that no measurement's allocations (or the
kernels torch pages in on first use) can hide another's peak. Imports nothing heavy itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_CALL = ("import json, sys; sys.path.insert(0, sys.argv[1]); import importlib; "
         "print(json.dumps(getattr(importlib.import_module(sys.argv[2]), sys.argv[3])(**json.loads(sys.argv[4]))))")


def in_fresh_process(module: str, function: str, env: dict | None = None, **kwargs) -> dict:
    """``benchmarks/<module>.<function>(**kwargs)`` in a new interpreter; its JSON-able result back."""
    res = subprocess.run([sys.executable, "-c", _CALL, str(HERE), module, function, json.dumps(kwargs)],
                         capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{module}.{function}({kwargs}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
