import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: extra threads only spin-wait, up to 40x slower when other jobs share the CPUs.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shapes() -> dict:
    with open(FIXTURES / "shapes.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def gpt_ref() -> dict:
    with open(FIXTURES / "gpt_tiny.json") as f:
        return json.load(f)
