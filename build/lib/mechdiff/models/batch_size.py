"""Automatic batch size: the largest batch that fits, found once by probing and then recorded.

``params.yaml`` may say ``acts.batch_size: auto``. On a GPU the stage probes the longest prompts with
batch sizes ``start, 2*start, ...`` up to ``limit`` and keeps the largest one that ran without an
out-of-memory error (:func:`largest_fitting_batch`); the choice is written beside the outputs so a rerun
and a reader see the same number. On a CPU memory is rarely the limit and probing would only cost
time, so ``auto`` means the CPU default (:func:`resolve_batch_size`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CPU_DEFAULT", "largest_fitting_batch", "resolve_batch_size"]

CPU_DEFAULT = 32


def largest_fitting_batch(run: Callable[[int], object], start: int = 1, limit: int = 256) -> int:
    """Largest ``b`` in ``start, 2*start, 4*start, ... <= limit`` for which ``run(b)`` raises no
    ``torch.OutOfMemoryError`` (the sizes above the first failure are not tried). Raises the error when
    even ``start`` does not fit."""
    best, b = None, start
    while b <= limit:
        try:
            run(b)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if best is None:
                raise
            break
        best, b = b, b * 2
    return best if best is not None else start


def resolve_batch_size(value: int | str, device: str, probe: Callable[[int], object] | None = None,
                       limit: int = 256) -> tuple[int, str]:
    """``(batch size, how it was chosen)`` for a params value: an integer is used as given; ``"auto"``
    probes with ``probe(b)`` on a CUDA device and falls back to :data:`CPU_DEFAULT` elsewhere."""
    if value != "auto":
        return int(value), "params"
    if str(device).startswith("cuda") and probe is not None:
        return largest_fitting_batch(probe, 1, limit), f"probed on {device} (largest power of two <= {limit} that fits)"
    return CPU_DEFAULT, f"auto on {device}: CPU default {CPU_DEFAULT}"
