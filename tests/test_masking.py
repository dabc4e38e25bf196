"""Logit masking, shared-id gathering and the shared-support KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechdiff.fairness.masking import gather_shared, mask_logits, shared_kl
from mechdiff.fairness.vocab import compare_vocabularies
from tokenizers_fixture import base_tokenizer, extended_tokenizer, permuted_tokenizer


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_argmax_allowed_and_lost_mass_per_row_sets():
    g = torch.Generator().manual_seed(0)
    rows, vocab = 1000, 64
    logits = torch.randn(rows, vocab, generator=g) * 4
    allowed = torch.rand(rows, vocab, generator=g) < torch.rand(rows, 1, generator=g)
    allowed[torch.arange(rows), torch.randint(vocab, (rows,), generator=g)] = True  # never empty
    masked, lost = mask_logits(logits, allowed)
    assert allowed[torch.arange(rows), masked.argmax(-1)].all()
    assert torch.isneginf(masked[~allowed]).all() and torch.equal(masked[allowed], logits[allowed])
    p = _softmax64(logits.double().numpy())
    expected = np.where(allowed.numpy(), 0.0, p).sum(-1)
    np.testing.assert_allclose(lost.numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_allowed_and_lost_mass_id_sets(dtype):
    rng = np.random.default_rng(1)
    for _ in range(50):
        vocab = int(rng.integers(2, 300))
        ids = rng.choice(vocab, size=int(rng.integers(1, vocab + 1)), replace=False)
        logits = torch.from_numpy(rng.normal(size=(3, 7, vocab)) * 3).to(dtype)  # (batch, pos, V)
        masked, lost = mask_logits(logits, ids)
        assert masked.dtype == dtype and lost.shape == (3, 7) and lost.dtype == torch.float64
        assert np.isin(masked.argmax(-1).numpy(), ids).all()
        outside = np.setdiff1d(np.arange(vocab), ids)
        expected = _softmax64(logits.double().numpy())[..., outside].sum(-1)
        np.testing.assert_allclose(lost.numpy(), expected, atol=1e-6, rtol=0)


def test_mask_errors():
    with pytest.raises(ValueError, match="empty"):
        mask_logits(torch.zeros(2, 5), [])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mask_logits(torch.zeros(2, 5), [5])
    with pytest.raises(ValueError, match="no finite logit"):
        mask_logits(torch.tensor([[0.0, float("-inf")]]), [1])


def test_gather_shared_through_a_permuted_id_map():
    base, tuned = base_tokenizer(), permuted_tokenizer()
    report = compare_vocabularies(base, tuned)
    g = torch.Generator().manual_seed(2)
    logits_base = torch.randn(4, 5, len(base), generator=g)  # (batch, pos, V)
    logits_tuned = torch.full((4, 5, len(tuned) + 3), -1e4)  # wider: padded embedding rows
    logits_tuned[..., report.tuned_ids] = logits_base[..., report.base_ids]  # same model, other ids
    lb, lt = gather_shared(logits_base, logits_tuned, report)
    assert lb.shape == lt.shape == (4, 5, report.n_shared)
    assert torch.equal(lb, lt)
    out = shared_kl(logits_base, logits_tuned, report)
    assert torch.allclose(out.kl, torch.zeros(4, 5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out.lost_base, torch.zeros_like(out.lost_base))
    # an identity id map on differing ids would compare different strings
    lb_wrong, lt_wrong = gather_shared(logits_base, logits_tuned, (report.base_ids, report.base_ids))
    assert not torch.equal(lb_wrong, lt_wrong)


def test_shared_kl_matches_numpy_and_reports_lost_mass():
    base, tuned = base_tokenizer(), extended_tokenizer()
    report = compare_vocabularies(base, tuned)
    rng = np.random.default_rng(3)
    lb_np, lt_np = rng.normal(size=(6, len(base))), rng.normal(size=(6, len(tuned))) * 2
    out = shared_kl(torch.from_numpy(lb_np).float(), torch.from_numpy(lt_np).float(), report)
    lb32, lt32 = lb_np.astype(np.float32).astype(np.float64), lt_np.astype(np.float32).astype(np.float64)
    p_t = _softmax64(lt32[:, report.tuned_ids])
    p_b = _softmax64(lb32[:, report.base_ids])
    np.testing.assert_allclose(out.kl.numpy(), (p_t * np.log(p_t / p_b)).sum(-1), rtol=1e-9)
    appended = np.setdiff1d(np.arange(len(tuned)), report.tuned_ids)
    np.testing.assert_allclose(out.lost_tuned.numpy(), _softmax64(lt32)[:, appended].sum(-1), atol=1e-12)
    assert np.all(out.lost_base.numpy() == 0)
    rev = shared_kl(torch.from_numpy(lb_np).float(), torch.from_numpy(lt_np).float(), report,
                    direction="base||tuned")
    np.testing.assert_allclose(rev.kl.numpy(), (p_b * np.log(p_b / p_t)).sum(-1), rtol=1e-9)
