"""Test-wide settings: one thread each (two cores are shared), and no network, ever; shared fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_runs import make_tiny_run  # noqa: E402


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """An unconditional tiny run folder (tests/tiny_runs.py)."""
    return make_tiny_run(tmp_path / "run")


@pytest.fixture
def tiny_class_run(tmp_path: Path) -> Path:
    """A 3-class tiny run folder."""
    return make_tiny_run(tmp_path / "class_run", num_classes=3)
