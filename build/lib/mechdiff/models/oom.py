"""Out-of-memory recovery for batched work: a batch that does not fit is halved and retried.

A researcher's overnight run should not die because one length-sorted batch of long prompts did not fit
the GPU (or the CPU's memory). :class:`HalveOnOOM` wraps a per-batch function: on an allocation failure
(:func:`is_out_of_memory`: CUDA's ``torch.OutOfMemoryError``, or the CPU allocator's ``RuntimeError``) it frees the
CUDA cache, splits the batch's items in halves and runs each half (recursively, down to one item, which
re-raises). Results come back per executed sub-batch, in item order. The first split is logged once
per instance, with the batch size that failed, so the user can lower the configured batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["HalveOnOOM", "is_out_of_memory"]


def is_out_of_memory(err: BaseException) -> bool:
    """True for an allocation failure on any device: ``torch.OutOfMemoryError`` (CUDA), Python's
    ``MemoryError``, and the CPU allocator's plain ``RuntimeError`` ("DefaultCPUAllocator: can't allocate
    memory")."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text)


class HalveOnOOM:
    """``halver(run, items) -> [(sub_items, run(sub_items)), ...]`` with halving on out-of-memory.

    ``log`` receives one message at the first split; ``splits`` counts every split.
    """

    def __init__(self, log: Callable[[str], Any] | None = print, what: str = "batch"):
        self.log, self.what, self.splits = log, what, 0

    def __call__(self, run: Callable[[list], Any], items: Sequence) -> list[tuple[list, Any]]:
        items = list(items)
        try:
            return [(items, run(items))]
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if not is_out_of_memory(err) or len(items) <= 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if self.splits == 0 and self.log is not None:
                self.log(f"out of memory on a {self.what} of {len(items)}: halving and retrying "
                         "(logged once; lower the batch size in params.yaml to avoid the retries)")
            self.splits += 1
            half = len(items) // 2
            return self(run, items[:half]) + self(run, items[half:])
