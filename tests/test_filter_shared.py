"""filter_shared: per-mode retention on an extended tokenizer, zero-prompt error, masked mass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechdiff.fairness.filter_shared import NoPromptsLeft, fairness_report, filter_prompts, require_prompts
from mechdiff.fairness.masking import masked_mass_at_last
from mechdiff.fairness.vocab import compare_vocabularies
from mechdiff.params.config import FairnessParams
from tests.tiny import tiny_llama
from tests.tokenizers_fixture import base_tokenizer, extended_tokenizer, permuted_tokenizer

FRAME = pd.DataFrame({"id": ["e1", "e2", "k1", "k2"], "language": ["en", "en", "kk", "kk"],
                      "text": ["the cat sat", " the mat", "сәлем әлем", " қазақ тілі"],
                      "task": ["topic"] * 4})


def _run(tok_b, tok_t, **kw):
    fairness = FairnessParams(**kw)
    vocab = compare_vocabularies(tok_b, tok_t)
    kept, alignments = filter_prompts(FRAME, tok_b, tok_t, fairness, vocab)
    return kept, fairness_report(vocab, FRAME, alignments, fairness), vocab


def test_extended_tokenizer_keeps_english_strict_and_kazakh_aligned():
    kept, report, vocab = _run(base_tokenizer(), extended_tokenizer())
    assert report["vocab"]["id_preserving_superset"] and report["vocab"]["id_identity"] == 1.0
    seg = report["segmentation"]
    assert seg["en"]["segmentation_identity_rate"] == 1.0 and seg["kk"]["segmentation_identity_rate"] == 0.0
    assert seg["kk"]["modes"]["aligned"]["prompt_retention"] == 1.0
    assert seg["kk"]["modes"]["base_ids"]["prompt_retention"] == 1.0
    by_id = kept.set_index("id")
    assert list(by_id["kept_strict"]) == [True, True, False, False]
    for pid, row in by_id.iterrows():  # the last compared pair is the last token of each tokenization
        assert row["pos_base_aligned"][-1] == len(row["base_input_ids"]) - 1
        assert row["pos_tuned_aligned"][-1] == len(row["tuned_input_ids"]) - 1
        assert row["base_input_ids"].count(base_tokenizer().bos_token_id) == 1


def test_base_ids_mode_is_unavailable_when_ids_move():
    kept, report, _ = _run(base_tokenizer(), permuted_tokenizer())
    assert not report["vocab"]["id_preserving_superset"]
    assert report["segmentation"]["all"]["modes"]["base_ids"]["available"] is False
    assert not kept["kept_base_ids"].any()


def test_zero_prompts_in_the_primary_mode_names_retention_and_the_fix():
    _, report, _ = _run(base_tokenizer(), extended_tokenizer())
    only_kk = {"all": {**report["segmentation"]["kk"]}}
    with pytest.raises(NoPromptsLeft, match=r"filter_shared@cultural: no prompt survives mode 'strict' \(kept per mode: "
                                            r"strict 0/2, aligned 2/2, base_ids 2/2\); set fairness.primary_mode to "
                                            r"one of \['aligned', 'base_ids'\] in params.yaml"):
        require_prompts(only_kk, "strict", "cultural")
    require_prompts(report["segmentation"], "strict", "cultural")


def test_masked_mass_equals_probability_outside_the_allowed_ids():
    model = tiny_llama(vocab=64)
    ids = [[1, 5, 9], [1, 7, 8, 10, 3]]
    allowed = np.arange(0, 64, 2)
    got = masked_mass_at_last(model, ids, allowed, pad_id=0)
    for i, seq in enumerate(ids):
        with torch.no_grad():
            p = model(input_ids=torch.tensor([seq])).logits[0, -1].double().softmax(-1)
        assert abs(got[i].item() - p[1::2].sum().item()) < 1e-6


def test_prompts_longer_than_the_limit_are_found_without_tokenizing_a_huge_text():
    from mechdiff.fairness.filter_shared import too_long

    tb, tt = base_tokenizer(), extended_tokenizer()
    frame = pd.DataFrame({"text": ["the cat sat", "the mat " * 60, "x" * 100_000, "сәлем әлем"]})
    long = too_long(frame, tb, tt, FairnessParams(), limit=32)
    assert long.tolist() == [False, True, True, False]
    assert not too_long(frame.iloc[[1]], tb, tt, FairnessParams(), limit=10_000).any()
