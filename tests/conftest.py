"""Shared test fixtures: the repository root and the default params."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning OpenMP workers (see stages/__init__.py)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture()
def params_text() -> str:
    return (ROOT / "params.yaml").read_text(encoding="utf-8")


@pytest.fixture()
def one_torch_thread():
    """Tiny ops on a shared, loaded 2-core box stall on thread hand-offs; restore the setting after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
