"""Patching: own activations change nothing; patching the changed layer's output closes the whole gap."""

from __future__ import annotations

import math

import torch

from mechdiff.models.capture import attended_positions, capture
from mechdiff.models.patching import fraction_closed, run_patched
from tests.tiny import padded_batch, tiny_llama

SEQS = [[1, 5, 9, 11, 3, 7], [1, 8, 4], [1, 6, 6, 10, 12]]


def _last(mask):
    lengths = mask.sum(1)
    return torch.stack([torch.arange(len(mask)), lengths - 1], 1)  # right padding


def test_patching_with_own_activations_changes_nothing():
    model = tiny_llama()
    ids, mask = padded_batch(SEQS, "right")
    pos = attended_positions(mask)
    for site in ("layers.1.resid_post", "layers.2.attn.o_proj_in"):
        own = capture(model, ids, mask, [site], pos)[site]
        _, ref = capture(model, ids, mask, [], _last(mask), return_logits=True)
        got = run_patched(model, ids, mask, site, pos, own, _last(mask))
        assert torch.equal(got, ref)


def test_patching_base_output_of_the_edited_layer_recovers_base_logits():
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        tuned.model.layers[2].mlp.down_proj.weight.add_(0.5 * torch.randn_like(tuned.model.layers[2].mlp.down_proj.weight))
    ids, mask = padded_batch(SEQS, "right")
    pos, last = attended_positions(mask), _last(mask)
    _, base_logits = capture(base, ids, mask, [], last, return_logits=True)
    _, tuned_logits = capture(tuned, ids, mask, [], last, return_logits=True)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    for layer, expect_exact in ((2, True), (3, True), (1, False)):
        site = f"layers.{layer}.resid_post"
        h_base = capture(base, ids, mask, [site], pos)[site]
        patched = run_patched(tuned, ids, mask, site, pos, h_base, last)
        assert torch.allclose(patched, base_logits, atol=1e-5) == expect_exact, layer


def test_fraction_closed_handles_no_gap():
    assert fraction_closed(2.0, 0.5) == 0.75
    assert math.isnan(fraction_closed(0.0, 0.0))
