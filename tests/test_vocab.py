"""Known-answer tests of :mod:`mechdiff.fairness.vocab` on tokenizers built in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechdiff.fairness.vocab import compare_vocabularies, special_token_ids
from tokenizers_fixture import (ALPHABET, SPECIALS, base_tokenizer, extended_tokenizer, n_appended_extended,
                                permuted_tokenizer, reordered_tokenizer, special_mismatch_tokenizer)


@pytest.fixture(scope="module")
def base():
    return base_tokenizer()


def test_id_preserving_extension(base):
    tuned = extended_tokenizer()
    report = compare_vocabularies(base, tuned)
    n_new = n_appended_extended()
    assert n_new > 0
    assert (report.base_size, report.tuned_size) == (len(base), len(base) + n_new)
    assert report.n_appended == report.n_tuned_only == n_new
    assert report.n_base_only == 0 and report.n_shared == len(base)
    assert report.id_identity == 1.0 and report.ids_identical
    assert report.id_preserving_superset
    assert report.pct_increase == pytest.approx(100.0 * n_new / len(base))
    np.testing.assert_array_equal(report.base_ids, report.tuned_ids)
    assert report.special_tokens_agree and report.special_mismatches == ()


def test_shared_strings_are_raw_vocab_keys_not_decoded(base):
    # single bytes of a Cyrillic letter decode to U+FFFD: decoding would merge them, raw strings do not
    decoded = {base.decode([base.convert_tokens_to_ids(s)]) for s in ALPHABET}
    assert len(decoded) < len(ALPHABET)
    report = compare_vocabularies(base, extended_tokenizer())
    assert report.n_shared == len(base.get_vocab())


def test_different_ids_give_an_explicit_id_map(base):
    tuned = permuted_tokenizer()
    report = compare_vocabularies(base, tuned)
    assert report.n_shared == len(base) and report.n_tuned_only == 0
    assert not report.ids_identical and not report.id_preserving_superset
    assert 0.0 < report.id_identity < 1.0
    assert report.base_ids.dtype == np.int64 and np.all(np.diff(report.base_ids) > 0)
    assert (base.convert_ids_to_tokens(report.base_ids.tolist())
            == tuned.convert_ids_to_tokens(report.tuned_ids.tolist()))
    k = int(np.flatnonzero(report.base_ids == base.convert_tokens_to_ids("Ġthe"))[0])
    assert report.tuned_ids[k] == tuned.get_vocab()["Ġthe"] != base.get_vocab()["Ġthe"]


def test_merge_order_change_keeps_the_vocabulary(base):
    report = compare_vocabularies(base, reordered_tokenizer())
    assert report.id_preserving_superset and report.n_tuned_only == 0  # only segmentation can tell


def test_special_token_disagreement_is_detected(base):
    report = compare_vocabularies(base, special_mismatch_tokenizer())
    assert not report.special_tokens_agree
    assert report.special_mismatches == ("<|end_header_id|>", "<|eot_id|>")
    assert not report.template_specials["<|eot_id|>"].agree
    assert report.template_specials["<|start_header_id|>"].agree
    assert report.specials["bos"].agree and report.specials["eos"].agree
    assert not report.specials["pad"].agree  # pad is <|eot_id|>, whose id moved


def test_special_ids_and_json(base):
    assert special_token_ids(base) == frozenset(base.convert_tokens_to_ids(list(SPECIALS)))
    d = compare_vocabularies(base, extended_tokenizer()).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["id_preserving_superset"] and set(d["template_specials"]) == {
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}


def test_tokenizer_policy_required_refuses_a_non_superset_and_recommended_records_a_warning(base):
    from mechdiff.fairness.filter_shared import fairness_report, filter_prompts
    from mechdiff.fairness.vocab import TokenizerPolicyError, enforce_tokenizer_policy
    from mechdiff.params.config import FairnessParams

    assert enforce_tokenizer_policy(compare_vocabularies(base, extended_tokenizer()), "shared_vocab_required",
                                    "cultural") == {"policy": "shared_vocab_required", "satisfied": True,
                                                    "problems": [], "warnings": []}
    permuted = compare_vocabularies(base, permuted_tokenizer())
    with pytest.raises(TokenizerPolicyError, match=r"pair 'kk': tokenizer_policy shared_vocab_required, but the tuned "
                                                   r"vocabulary is not an id-preserving superset .* have another id.*"
                                                   r"Fix: set pairs.kk.tokenizer_policy: shared_vocab_recommended"):
        enforce_tokenizer_policy(permuted, "shared_vocab_required", "kk")
    moved = compare_vocabularies(base, special_mismatch_tokenizer())  # same strings, two special ids swapped
    with pytest.raises(TokenizerPolicyError, match=r"base special tokens missing or moved: \['<\|end_header_id\|>', "
                                                   r"'<\|eot_id\|>'\]"):
        enforce_tokenizer_policy(moved, "shared_vocab_required", "kk")
    policy = enforce_tokenizer_policy(permuted, "shared_vocab_recommended", "kk")
    assert not policy["satisfied"] and policy["warnings"] and "another id" in policy["warnings"][0]
    import pandas as pd

    frame = pd.DataFrame({"id": ["e1"], "text": ["the cat sat"], "language": ["en"], "task": ["topic"]})
    fairness = FairnessParams()
    _, alignments = filter_prompts(frame, base, permuted_tokenizer(), fairness, permuted, pair="kk")
    report = fairness_report(permuted, frame, alignments, fairness, policy=policy)
    assert json.loads(json.dumps(report))["warnings"] == policy["warnings"]
    assert report["tokenizer_policy"]["policy"] == "shared_vocab_recommended"
