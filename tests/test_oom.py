"""Out-of-memory recovery: a batch that does not fit is halved and retried, logged once, with results
identical to running small batches from the start."""

from __future__ import annotations

import pytest
import torch

from mechdiff.models.oom import HalveOnOOM


def _flaky(limit: int, calls: list):
    def run(items):
        calls.append(list(items))
        if len(items) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return [x * 10 for x in items]
    return run


def test_halving_covers_every_item_in_order_and_logs_once():
    logs, calls = [], []
    halve = HalveOnOOM(log=logs.append, what="test batch")
    parts = halve(_flaky(2, calls), range(7))
    assert [i for items, _ in parts for i in items] == list(range(7))
    assert [y for _, out in parts for y in out] == [10 * i for i in range(7)]
    assert all(len(items) <= 2 for items, _ in parts)
    assert len(logs) == 1 and "test batch of 7" in logs[0] and halve.splits >= 2


def test_a_single_item_that_does_not_fit_reraises():
    with pytest.raises(torch.OutOfMemoryError):
        HalveOnOOM(log=None)(_flaky(0, []), [1, 2, 3])


def test_attribution_recovers_from_an_injected_oom(monkeypatch):
    from mechdiff.rq4 import attribution as attr
    from tests.tiny import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(vocab=64, seed=1)
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13], [1, 14]]
    conts = [[20], [21, 22], [23], [24]]
    ref = attr.attribute(model, prompts, conts, 0, [1, 3], batch_size=1)
    real = attr._attribute_batch

    def flaky(model, ids, *a, **k):
        if len(ids) > 1:
            raise torch.OutOfMemoryError("injected")
        return real(model, ids, *a, **k)

    monkeypatch.setattr(attr, "_attribute_batch", flaky)
    got = attr.attribute(model, prompts, conts, 0, [1, 3], batch_size=4)
    assert torch.allclose(torch.as_tensor(got.score), torch.as_tensor(ref.score), atol=1e-6)
    assert torch.allclose(torch.as_tensor(got.metric), torch.as_tensor(ref.metric), atol=1e-6)


def test_the_cpu_allocators_failure_is_halved_too_and_other_errors_are_not():
    from mechdiff.models.oom import is_out_of_memory

    def run(items, calls=[]):  # noqa: B006 - the call log of this test
        if len(items) > 2:  # the message torch's CPU allocator gives (a plain RuntimeError)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 15000000000 bytes. Error code 12")
        return list(items)

    parts = HalveOnOOM(log=None)(run, range(5))
    assert [i for items, _ in parts for i in items] == list(range(5))
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))

    def broken(items):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        HalveOnOOM(log=None)(broken, range(4))
