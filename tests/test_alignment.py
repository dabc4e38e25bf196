"""Segmentation comparison in the three fairness modes, on tokenizers built in memory."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mechdiff.data.rendering import render_prompt
from mechdiff.fairness.alignment import (BaseIdsUnavailable, align_prompt, align_rendered, sample_pairs, segment,
                                summarize_alignments)
from mechdiff.fairness.vocab import compare_vocabularies
from tokenizers_fixture import (_byte_map, base_tokenizer, extended_tokenizer, permuted_tokenizer,
                                reordered_tokenizer)

EN = " the cat sat on the mat"
KK = " сәлем әлем"


@pytest.fixture(scope="module")
def base():
    return base_tokenizer()


@pytest.fixture(scope="module")
def ext():
    return extended_tokenizer()


def _align(text, tok_base, tok_tuned, **kw):
    superset = compare_vocabularies(tok_base, tok_tuned).id_preserving_superset
    return align_prompt(text, tok_base, tok_tuned, id_preserving_superset=superset, **kw)


def test_extension_english_identical(base, ext):
    a = _align(EN, base, ext)
    assert a.identical and a.base.ids == a.tuned.ids
    n = len(a.base.ids)
    for mode in ("strict", "aligned", "base_ids"):
        view = a.inputs(mode)
        assert view.kept
        np.testing.assert_array_equal(view.pairs, np.stack([np.arange(n)] * 2, axis=1))


def test_extension_new_tokens_not_identical(base, ext):
    a = _align(KK, base, ext)
    assert not a.identical
    assert a.tuned.tokens == ("ĠÑģÓĻÐ»ÐµÐ¼", "ĠÓĻÐ»ÐµÐ¼")  # two appended word tokens
    assert len(a.base.tokens) == 11                       # one token per character
    assert not a.inputs("strict").kept and a.inputs("strict").pairs.shape == (0, 2)
    np.testing.assert_array_equal(a.inputs("aligned").pairs, [[5, 0], [10, 1]])
    view = a.inputs("base_ids")  # allowed: id-preserving superset
    assert view.tuned_input_ids == view.base_input_ids == a.base.ids
    assert len(view.pairs) == 11


def test_partial_character_tokens_are_not_boundaries(base, ext):
    # 'С' (uppercase) is no token: its two UTF-8 bytes are two tokens sharing offsets (0, 1)
    a = _align("Сәлем сәлем", base, ext)
    assert a.base.tokens[:2] == ("Ð", "¡") and a.base.ends[:2] == (1, 1)
    assert a.base.boundary[:2] == (False, True)
    pairs = a.inputs("aligned").pairs.tolist()
    assert [0, 0] not in pairs and [1, 1] in pairs
    assert pairs[-1] == [len(a.base.ids) - 1, len(a.tuned.ids) - 1]


def _prefix_bytes(tokens):
    inv = {s: b for b, s in _byte_map().items()}
    out, acc = [], b""
    for t in tokens:
        acc += bytes(inv[c] for c in t)
        out.append(acc)
    return out


def test_aligned_pairs_match_byte_truth(base, ext):
    """Pairs are exactly the positions where both models have read the same whole characters."""
    rng = random.Random(0)
    words = [" the", " cat", "Сәлем", " сәлем", " әлем", " қазақ", " тілі", " one", "Ж", " мат", "."]
    for _ in range(50):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        a = _align(text, base, ext)
        pb, pt = _prefix_bytes(a.base.tokens), _prefix_bytes(a.tuned.tokens)
        char_ends = {len(text[:k].encode()) for k in range(1, len(text) + 1)}
        truth = [[i, j] for i in range(len(pb)) for j in range(len(pt))
                 if pb[i] == pt[j] and len(pb[i]) in char_ends]
        assert a.inputs("aligned").pairs.tolist() == truth, text


def test_merge_order_difference_caught_by_strict(base):
    tuned = reordered_tokenizer()
    a = _align("one", base, tuned)
    assert a.base.tokens == ("on", "e") and a.tuned.tokens == ("o", "ne")
    assert not a.identical and not a.inputs("strict").kept
    assert a.inputs("aligned").pairs.tolist() == [[1, 1]]  # only the last token's end coincides


def test_different_ids_same_strings(base):
    tuned = permuted_tokenizer()
    a = _align(EN, base, tuned)
    assert a.identical and a.base.ids != a.tuned.ids  # strict compares strings, ids may differ
    assert a.inputs("strict").tuned_input_ids == a.tuned.ids
    with pytest.raises(BaseIdsUnavailable, match="id-preserving superset"):
        a.inputs("base_ids")


def test_native_templates_align_on_content(base, ext):
    text = KK.strip()  # "сәлем әлем": five letters, then " әлем" (one appended token in the tuned vocab)
    rb = render_prompt(text, base, "chat", date="01 Jan 2031")
    rt = render_prompt(text, ext, "raw")
    a = align_rendered(rb, rt, base, ext, id_preserving_superset=True)
    assert not a.identical
    pairs = a.inputs("aligned").pairs
    assert [a.base.tokens[i] for i, _ in pairs] == ["Ñģ", "ÓĻ", "Ð»", "Ðµ", "Ð¼", "Ð¼"]
    assert [a.tuned.tokens[j] for _, j in pairs][-1] == "ĠÓĻÐ»ÐµÐ¼"
    assert pairs[-1].tolist() == [int(a.base.content_index[-1]), len(rt.ids) - 1]
    assert pairs[0, 0] > 5 and pairs[0, 1] == 1  # chat header before the content in the base
    a_en = align_rendered(render_prompt(EN.strip(), base, "chat"), render_prompt(EN.strip(), ext, "raw"),
                          base, ext)
    assert a_en.identical  # content tokens identical, templates differ
    with pytest.raises(ValueError, match="content spans differ"):
        align_rendered(render_prompt(KK, base, "chat"), render_prompt(KK, ext, "raw"), base, ext)


def test_special_tokens_are_not_content(base, ext):
    r = render_prompt(EN, base, "raw")
    seg = segment(r.text, base)
    assert seg.content[0] is False and all(seg.content[1:])


def test_sample_pairs_keeps_last():
    pairs = np.stack([np.arange(20)] * 2, axis=1)
    s = sample_pairs(pairs, 5, seed=3)
    assert s.shape == (6, 2) and s[-1].tolist() == [19, 19]
    np.testing.assert_array_equal(s, sample_pairs(pairs, 5, seed=3))
    assert len(sample_pairs(pairs[:3], 10, seed=0)) == 3


def test_summary_per_language_and_mode(base, ext):
    texts, langs = [EN, " the mat", KK, " қазақ тілі"], ["en", "en", "kk", "kk"]
    out = summarize_alignments([_align(t, base, ext) for t in texts], langs)
    assert out["en"]["segmentation_identity_rate"] == 1.0
    assert out["kk"]["segmentation_identity_rate"] == 0.0
    assert out["all"]["segmentation_identity_rate"] == 0.5
    assert out["kk"]["modes"]["strict"]["prompt_retention"] == 0.0
    assert out["kk"]["modes"]["aligned"]["prompt_retention"] == 1.0
    assert 0.0 < out["kk"]["modes"]["aligned"]["position_retention"] < 1.0
    assert out["all"]["modes"]["base_ids"]["available"]
    assert out["all"]["modes"]["base_ids"]["position_retention"] == 1.0
    perm = permuted_tokenizer()
    out = summarize_alignments([_align(t, base, perm) for t in texts], langs)
    assert out["all"]["modes"]["base_ids"] == {"available": False, "n_kept": 0, "prompt_retention": 0.0,
                                               "n_positions": out["all"]["modes"]["strict"]["n_positions"],
                                               "n_kept_positions": 0, "position_retention": 0.0}
