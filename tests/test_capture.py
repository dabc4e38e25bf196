"""Capture: hooked sites equal the model's own hidden states, for either padding side."""

from __future__ import annotations

import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.models.architecture import ArchitectureMismatch, adapter_for, check_compatible
from mechdiff.models.capture import attended_positions, capture
from tests.tiny import padded_batch, tiny_llama

SEQS = [[1, 5, 9, 11, 3, 7], [1, 8, 4], [1, 6, 6, 10, 12]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_hooked_residuals_equal_output_hidden_states(side):
    model = tiny_llama()
    ids, mask = padded_batch(SEQS, side)
    sites = [f"layers.{i}.resid_post" for i in range(model.config.num_hidden_layers - 1)]
    acts = capture(model, ids, mask, sites)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    pos = attended_positions(mask)
    for i, site in enumerate(sites):
        ref = hs[i + 1][pos[:, 0], pos[:, 1]]
        torch.testing.assert_close(acts[site], ref, rtol=1e-5, atol=1e-5)


def test_padding_side_and_batching_do_not_change_captured_values():
    model = tiny_llama()
    site = "layers.2.resid_post"
    per_seq = []
    for s in SEQS:
        ids, mask = padded_batch([s], "right")
        per_seq.append(capture(model, ids, mask, [site])[site])
    for side in ("left", "right"):
        ids, mask = padded_batch(SEQS, side)
        got = capture(model, ids, mask, [site])[site]
        torch.testing.assert_close(got, torch.cat(per_seq), rtol=1e-4, atol=1e-5)


def test_o_proj_input_has_one_slice_per_head_and_logits_come_back():
    model = tiny_llama()
    ids, mask = padded_batch(SEQS, "right")
    pos = torch.tensor([[0, 5], [1, 2]])
    acts, logits = capture(model, ids, mask, ["layers.1.attn.o_proj_in", "layers.1.mlp_out"], pos,
                           return_logits=True)
    a = adapter_for(model)
    assert acts["layers.1.attn.o_proj_in"].shape == (2, a.n_heads * a.head_dim)
    assert acts["layers.1.mlp_out"].shape == (2, model.config.hidden_size)
    assert logits.shape == (2, model.config.vocab_size)


def test_bad_sites_and_mismatched_architectures_are_named():
    model = tiny_llama()
    with pytest.raises(MechdiffError, match=r"layer 9 out of range; the model has 4 layers"):
        adapter_for(model).module("layers.9.resid_post")
    with pytest.raises(MechdiffError, match=r"unknown site 'layer.1.resid'"):
        adapter_for(model).module("layer.1.resid")
    other = tiny_llama(n_layers=6, hidden=48)
    with pytest.raises(ArchitectureMismatch, match=r"num_hidden_layers: 4 vs 6; hidden_size: 32 vs 48"):
        check_compatible(model.config, other.config, "a", "b")
