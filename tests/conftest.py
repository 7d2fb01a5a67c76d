import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen"


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
