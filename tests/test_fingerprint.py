"""Fingerprints: stable digests, and a stale cache named field by field."""

from __future__ import annotations

import pytest

from mechdiff.fingerprint import StaleCacheError, check_fingerprint, digest


def test_digest_is_stable_and_order_independent():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert len(digest("x")) == 16


def test_stale_cache_names_every_differing_field_but_not_versions():
    exp = {"model": "m", "dtype": "bfloat16", "sites": "s1", "versions": "t2.13"}
    check_fingerprint(exp, {**exp, "versions": "t2.12"}, "acts")
    with pytest.raises(StaleCacheError, match=r"acts was computed from different inputs \(dtype: stored "
                                              r"'float32', expected 'bfloat16'; model: stored 'm2', expected 'm'\)"):
        check_fingerprint(exp, {**exp, "dtype": "float32", "model": "m2"}, "acts")
