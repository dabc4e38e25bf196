"""collect_acts library: scanned layers, position plans, batching that never changes the values."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.models.collect_acts import capture_plan_batch, check_finite, length_sorted_batches, position_plan, scan_layers
from tests.tiny import tiny_llama


def test_scan_layers_every_second_block_ending_at_the_last():
    assert scan_layers(8, 2) == [1, 3, 5, 7]
    assert scan_layers(32, 2)[-1] == 31 and len(scan_layers(32, 2)) == 16
    assert scan_layers(4, 1) == [0, 1, 2, 3]


def test_position_plan_keeps_the_last_token_and_skips_dropped_prompts():
    prompts = pd.DataFrame([
        {"id": "a", "language": "en", "task": "t", "split": "dev", "kept_strict": True,
         "pos_base_strict": [1, 2, 3, 4, 5], "pos_tuned_strict": [1, 2, 3, 4, 5]},
        {"id": "b", "language": "kk", "task": "t", "split": "test", "kept_strict": False,
         "pos_base_strict": [], "pos_tuned_strict": []},
    ])
    plan = position_plan(prompts, "strict", n_sampled=2, seed=0)
    assert list(plan["id"]) == ["a"] * 3 and list(plan["kind"]) == ["sampled", "sampled", "last"]
    assert plan["base_pos"].iloc[-1] == 5
    assert plan.equals(position_plan(prompts, "strict", n_sampled=2, seed=0))


def test_length_sorted_batches_cover_every_index_once():
    batches = length_sorted_batches([3, 9, 1, 7, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_batched_capture_equals_one_prompt_at_a_time():
    model = tiny_llama()
    ids = [[1, 5, 9, 11, 3], [1, 8, 4], [1, 6, 6, 10]]
    pos = [torch.tensor([1, 4]), torch.tensor([2]), torch.tensor([0, 3])]
    together = capture_plan_batch(model, ids, pos, [1, 3], pad_id=0)
    alone = [capture_plan_batch(model, [i], [p], [1, 3], pad_id=0) for i, p in zip(ids, pos)]
    for layer in (1, 3):
        torch.testing.assert_close(together[layer], torch.cat([a[layer] for a in alone]), rtol=1e-4, atol=1e-5)


def test_non_finite_activations_name_the_site_and_prompt():
    t = torch.ones(3, 4)
    t[1, 2] = float("nan")
    with pytest.raises(MechdiffError, match=r"non-finite activations \(NaN or Inf\) at base layers.3.resid_post "
                                            r"for prompt 'p2'"):
        check_finite(t, "base layers.3.resid_post", ["p1", "p2", "p3"])
