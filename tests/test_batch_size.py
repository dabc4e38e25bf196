"""The automatic batch size: the largest power of two that fits, never probing past the first failure."""

from __future__ import annotations

import pytest
import torch

from mechdiff.models.batch_size import CPU_DEFAULT, largest_fitting_batch, resolve_batch_size


def _fits_up_to(n: int, tried: list):
    def run(b):
        tried.append(b)
        if b > n:
            raise torch.OutOfMemoryError("injected")
    return run


def test_largest_power_of_two_that_fits():
    tried = []
    assert largest_fitting_batch(_fits_up_to(40, tried), 1, 256) == 32
    assert tried == [1, 2, 4, 8, 16, 32, 64]
    assert largest_fitting_batch(_fits_up_to(10_000, []), 1, 256) == 256


def test_nothing_fits_raises():
    with pytest.raises(torch.OutOfMemoryError):
        largest_fitting_batch(_fits_up_to(0, []), 1, 8)


def test_resolve_batch_size():
    assert resolve_batch_size(16, "cuda", None) == (16, "params")
    assert resolve_batch_size("auto", "cpu", _fits_up_to(3, []))[0] == CPU_DEFAULT
    size, how = resolve_batch_size("auto", "cuda:0", _fits_up_to(100, []), limit=128)
    assert size == 64 and "probed on cuda:0" in how
