"""Shared test fixtures: the repository root and the default params."""

from __future__ import annotations

import os
from pathlib import Path

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
