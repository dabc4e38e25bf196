"""Layer patching across models: a change planted at one layer is closed exactly from that layer on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechdiff.rq1.layer_entry import entry_profile
from mechdiff.rq1.layer_patch import patch_batch, summarise
from mechdiff.rq1.layer_refine import choose_layers
from tests.tiny import spare_bos, tiny_llama, with_appended_tokens

IDS = [[1, 5, 9, 11, 3, 7], [1, 8, 4], [1, 6, 6, 10, 12]]
ID_MAP = (np.arange(64), np.arange(64))


def _pairs():
    return [np.stack([np.arange(1, len(s)), np.arange(1, len(s))], 1) for s in IDS]  # every position after the BOS


def test_patching_recovers_the_other_model_from_the_planted_layer_on():
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        w = tuned.model.layers[2].mlp.down_proj.weight
        w.add_(0.8 * torch.randn_like(w))
    spare_bos(base, tuned, 2)
    rows = pd.DataFrame(patch_batch(base, tuned, (IDS, IDS), _pairs(), [0, 1, 2, 3], ID_MAP, (0, 0)))
    s = summarise(rows).set_index(["direction", "layer"])
    assert s["gap"].min() > 1e-4
    for direction in ("base->tuned", "tuned->base"):
        for layer in (2, 3):
            assert abs(s.loc[(direction, layer), "fraction_closed"] - 1.0) < 1e-4
        for layer in (0, 1):  # states below the edit are identical: patching them changes nothing
            assert abs(s.loc[(direction, layer), "fraction_closed"]) < 1e-4
    chosen = choose_layers(summarise(rows), {0: 1.0, 1: 0.99, 2: 0.8, 3: 0.7}, n_choose=2)
    assert chosen["layers"] == [2, 3]


def test_the_mass_a_tuned_model_puts_on_appended_tokens_is_carried_beside_the_masked_kl():
    """The tuned model's extended vocabulary takes a known 14% of its next-token mass; the masked KL
    renormalises it away (the KLs equal those of the same model without the new tokens), so every row,
    the summary and the entry profile the report prints carry it as ``lost_tuned``."""
    def edited():
        m = tiny_llama(seed=0)
        with torch.no_grad():
            w = m.model.layers[2].mlp.down_proj.weight
            w.add_(0.8 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
        return m
    base, mass = tiny_llama(seed=0), 0.14
    plain = pd.DataFrame(patch_batch(base, edited(), (IDS, IDS), _pairs(), [1, 2], ID_MAP, (0, 0)))
    rows = pd.DataFrame(patch_batch(base, with_appended_tokens(edited(), 8, mass), (IDS, IDS), _pairs(), [1, 2],
                                    ID_MAP, (0, 0)))
    np.testing.assert_allclose(rows[["gap", "remaining"]], plain[["gap", "remaining"]], atol=1e-6)
    np.testing.assert_allclose(rows["lost_tuned"], mass, atol=1e-5)
    assert (rows["lost_base"] == 0).all() and (plain[["lost_base", "lost_tuned", "lost_patched"]] == 0).all().all()
    fwd = rows["direction"] == "base->tuned"  # the patched model is the tuned one, which keeps its new tokens
    np.testing.assert_allclose(rows.loc[fwd, "lost_patched"], mass, atol=1e-5)
    assert (rows.loc[~fwd, "lost_patched"] == 0).all()
    s = summarise(rows)
    np.testing.assert_allclose(s["lost_tuned"], mass, atol=1e-5)
    assert entry_profile(s)["lost_tuned"] == pytest.approx(mass, abs=1e-5)
    assert np.isnan(entry_profile(summarise(rows.drop(columns=["lost_base", "lost_tuned", "lost_patched"])))
                    ["lost_tuned"])  # a table written before the column: not recorded, not 0


def test_the_layer_patch_never_writes_position_0_the_bos_sink():
    """In every comparison mode the patched positions start after position 0 (same tokens: every later
    position; aligned: the aligned content pairs), and the last one is the prompt's last token."""
    from mechdiff.rq1.layer_patch import patched_positions

    same = {"base_input_ids": [1, 5, 9, 11], "tuned_input_ids": [1, 5, 9, 11]}
    other = {"base_input_ids": [1, 5, 9, 11], "tuned_input_ids": [1, 70, 11],
             "pos_base_aligned": [0, 1, 3], "pos_tuned_aligned": [0, 1, 2]}
    for row, mode, want in ((same, "strict", [[1, 1], [2, 2], [3, 3]]), (other, "base_ids", [[1, 1], [2, 2], [3, 3]]),
                            (other, "aligned", [[1, 1], [3, 2]])):
        assert patched_positions(row, mode).tolist() == want, mode


def test_null_pair_has_no_gap_and_no_division_by_zero():
    base = tiny_llama(seed=0)
    rows = pd.DataFrame(patch_batch(base, base, (IDS, IDS), _pairs(), [1, 3], ID_MAP, (0, 0)))
    assert rows["gap"].abs().max() < 1e-9 and rows["remaining"].abs().max() < 1e-9
    s = summarise(rows)
    assert s["fraction_closed"].isna().all()
    assert choose_layers(s, {1: 1.0, 3: 0.999}, n_choose=2)["layers"] == [3, 1]


def test_restandardise_moves_the_statistics_exactly():
    from mechdiff.rq1.layer_patch import restandardise

    g = torch.Generator().manual_seed(0)
    h = 3.0 * torch.randn(500, 8, generator=g, dtype=torch.float64) + 2.0
    src = (h.mean(0), h.std(0, unbiased=False))
    dst = (torch.full((8,), -1.0, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64))
    out = restandardise(h, src, dst)
    assert torch.allclose(out.mean(0), dst[0], atol=1e-9) and torch.allclose(out.std(0, unbiased=False), dst[1])
    assert torch.equal(restandardise(h, src, src), h) or torch.allclose(restandardise(h, src, src), h, atol=1e-12)


def test_standardised_patch_between_identical_models_changes_nothing_and_still_finds_the_edit():
    from mechdiff.rq1.layer_patch import calibration_stats

    base = tiny_llama(seed=0)
    stats = calibration_stats(base, base, [((IDS, IDS), _pairs())], [1, 3], (0, 0))
    for layer in (1, 3):
        (mb, sb), (mt, st) = stats[layer]
        assert torch.equal(mb, mt) and torch.equal(sb, st) and (sb > 0).all()
    rows = pd.DataFrame(patch_batch(base, base, (IDS, IDS), _pairs(), [1, 3], ID_MAP, (0, 0), stats))
    assert rows["remaining"].abs().max() < 1e-9
    tuned = tiny_llama(seed=0)
    with torch.no_grad():
        tuned.model.layers[2].mlp.down_proj.weight.add_(0.8 * torch.randn_like(tuned.model.layers[2].mlp.down_proj.weight))
    spare_bos(base, tuned, 2)
    stats = calibration_stats(base, tuned, [((IDS, IDS), _pairs())], [1, 3], (0, 0))
    s = summarise(pd.DataFrame(patch_batch(base, tuned, (IDS, IDS), _pairs(), [1, 3], ID_MAP, (0, 0), stats)))
    s = s.set_index(["direction", "layer"])["fraction_closed"]
    assert abs(s[("base->tuned", 1)]) < 1e-4  # below the edit the statistics agree: still nothing to close
    assert s[("base->tuned", 3)] > 0.5


@pytest.mark.parametrize("n_layers, planted", [(6, 2), (30, 18)])
def test_the_bracket_around_the_entry_is_scanned_so_an_even_layer_edit_reads_exactly(n_layers, planted):
    """A rank-1 down_proj edit at an even layer, scanned every 2 layers (1, 3, 5, ...): the coarse scan only
    brackets the entry between planted - 1 and planted + 1; refining it patches the planted layer, reads
    the entry there (not one above), and the change read from both models' states there is rank 1 (top
    direction holding all of it). (30, 18): the issue's case, a 30-layer model edited at layer 18."""
    from mechdiff.models.collect_acts import scan_layers
    from mechdiff.organisms.planted import plant_random_edit
    from mechdiff.rq1.change_rank import change_row
    from mechdiff.rq1.layer_patch import paired_states
    from mechdiff.rq1.layer_refine import entry_layers, refine_scan

    base, tuned = tiny_llama(n_layers=n_layers, seed=0), tiny_llama(n_layers=n_layers, seed=0)
    plant_random_edit(tuned, layer=planted, rank=1, relative_norm=2.0, seed=0)
    spare_bos(base, tuned, planted)
    coarse = scan_layers(n_layers, 2)
    seen = []

    def patch(at):
        seen.append(list(at))
        return summarise(pd.DataFrame(patch_batch(base, tuned, (IDS, IDS), _pairs(), at, ID_MAP, (0, 0))))

    cka = {layer: 1.0 - 0.01 * i for i, layer in enumerate(coarse)}
    summary, chosen, entries = refine_scan(patch, coarse, cka, n_choose=1, threshold=0.5)
    assert seen[0] == coarse and planted in sum(seen[1:], [])  # coarse first, then the bracket
    assert entries == [planted] and chosen["layers"] == [planted]
    states = paired_states(base, tuned, [((IDS, IDS), _pairs())], entries, (0, 0))
    row = change_row(*states[planted])
    assert row["rank_90"] == 1 and row["top1_energy"] > 1 - 1e-6
    coarse_only = summarise(pd.DataFrame(patch_batch(base, tuned, (IDS, IDS), _pairs(), coarse, ID_MAP, (0, 0))))
    assert entry_layers(coarse_only, 0.5) == [planted + 1]  # what the coarse scan alone reports


def test_brackets_are_below_an_entry_and_around_other_chosen_layers():
    from mechdiff.rq1.layer_refine import bracket_layers

    assert bracket_layers([1, 5, 9, 13], entries=[9], others=[]) == [6, 7, 8]
    assert bracket_layers([1, 5, 9, 13], entries=[1], others=[13]) == [0, 10, 11, 12]
    assert bracket_layers([1, 5, 9, 13], entries=[9], others=[5]) == [2, 3, 4, 6, 7, 8]
    assert bracket_layers([1, 2, 3, 5], entries=[2], others=[3]) == [4]
    assert bracket_layers([0, 1, 2], entries=[1], others=[2]) == []


def _rows(n: int, seed: int = 0, closed: dict | None = None, noise: float = 0.3) -> pd.DataFrame:
    """Per-prompt layer-patch rows with a known fraction closed per layer (both directions): each prompt's
    gap varies, and the share of it its patch closes is ``closed[layer]`` +- ``noise`` (uniform, symmetric,
    never outside [0, 1]), so the fraction of the mean gap closed is ``closed[layer]`` in expectation."""
    rng = np.random.default_rng(seed)
    closed = closed or {1: 0.0, 3: 0.6, 5: 1.0}
    gap = rng.uniform(0.5, 1.5, n)
    rows = []
    for layer, f in closed.items():
        assert f in (0, 1) or (0 <= f - noise and f + noise <= 1), "the noise must keep the share in [0, 1]"
        share = f + noise * rng.uniform(-1, 1, n) if 0 < f < 1 else np.full(n, float(f))
        for direction in ("base->tuned", "tuned->base"):
            rows += [{"id": f"p{k:04d}", "prompt": k % 7, "layer": layer, "direction": direction, "gap": gap[k],
                      "remaining": gap[k] * (1 - share[k])} for k in range(n)]
    return pd.DataFrame(rows)


def test_the_fraction_closed_has_a_prompt_bootstrap_interval_around_it_that_shrinks_with_more_prompts():
    small, large = summarise(_rows(20), n_boot=400), summarise(_rows(800), n_boot=400)
    for s in (small, large):
        assert {"fraction_closed_lo", "fraction_closed_hi"} <= set(s.columns)
        assert (s["fraction_closed_lo"] <= s["fraction_closed"] + 1e-12).all()
        assert (s["fraction_closed"] <= s["fraction_closed_hi"] + 1e-12).all()
    width = {n: (s["fraction_closed_hi"] - s["fraction_closed_lo"]).to_numpy() for n, s in ((20, small), (800, large))}
    mid = (small["layer"] == 3).to_numpy()  # the noisy layer; layers 1 and 5 close exactly 0 and 1 in every prompt
    assert (width[800][mid] < width[20][mid] / 3).all()  # ~1/sqrt(40) of the width: well under a third
    assert np.allclose(width[20][~mid], 0) and np.allclose(width[800][~mid], 0)
    # the interval covers the known fraction of the many-prompt sample
    big = large[large["layer"] == 3]
    assert ((big["fraction_closed_lo"] < 0.6) & (0.6 < big["fraction_closed_hi"])).all()


def test_the_intervals_resample_whole_prompts_alike_across_calls_on_other_layers():
    """The refined scan summarises new layers in a second call: the same prompts draw the same resamples."""
    rows = _rows(50)
    whole = summarise(rows, n_boot=200)
    part = summarise(rows[rows["layer"] == 3], n_boot=200)
    cols = ["fraction_closed", "fraction_closed_lo", "fraction_closed_hi"]
    assert np.allclose(whole[whole["layer"] == 3][cols].to_numpy(), part[cols].to_numpy())


def test_a_summary_without_a_gap_has_no_interval():
    rows = _rows(10).assign(gap=0.0, remaining=0.0)
    s = summarise(rows, n_boot=50)
    assert s[["fraction_closed", "fraction_closed_lo", "fraction_closed_hi"]].isna().all().all()


def test_the_layer_choice_states_the_entry_fraction_with_its_interval():
    s = summarise(_rows(40, closed={1: 0.0, 3: 0.6, 5: 1.0}, noise=0.3), n_boot=200)
    out = choose_layers(s, {1: 0.9, 3: 0.95, 5: 0.99}, 1)
    row = s[(s["direction"] == "base->tuned") & (s["layer"] == 3)].iloc[0]
    assert out["layers"] == [3]
    assert f"{row['fraction_closed']:.2f} [{row['fraction_closed_lo']:.2f}, {row['fraction_closed_hi']:.2f}]" in \
        out["reasons"][0]


def test_the_layers_are_chosen_on_dev_prompts_only():
    """Each prompt's change enters at its own layer (the patch closes its gap from there on). The choice
    (the refined scan on the dev sample) reads the dev prompts' entry and does not move when the test
    prompts' entries, or which test prompts are kept, change; moving the dev entries moves it."""
    from mechdiff.rq1.layer_patch import split_sample
    from mechdiff.rq1.layer_refine import refine_scan

    def table(dev_entry, test_entry, test_kept=True):
        n = 12
        return pd.DataFrame({"id": [f"p{i}" for i in range(2 * n)], "split": ["dev"] * n + ["test"] * n,
                             "kept_strict": [True] * n + [test_kept] * n,
                             "entry": [dev_entry] * n + [test_entry] * n})

    def chosen(t):
        prompts = split_sample(t, "kept_strict", "dev", 8, seed=0)
        assert set(prompts["split"]) == {"dev"}

        def patch(at):
            rows = [{"id": r["id"], "prompt": i, "layer": x, "direction": d, "gap": 1.0,
                     "remaining": 0.0 if x >= r["entry"] else 1.0}
                    for i, r in enumerate(prompts.to_dict("records")) for x in at
                    for d in ("base->tuned", "tuned->base")]
            return summarise(pd.DataFrame(rows), 50, 0)
        summary, choice, entries = refine_scan(patch, [0, 2, 4, 6, 8], {}, 1, 0.5)
        return choice["layers"], entries

    ref = chosen(table(5, 5))
    assert ref[0] == [5]
    assert chosen(table(5, 1)) == ref and chosen(table(5, 8, test_kept=False)) == ref
    assert chosen(table(3, 5))[0] == [3]
    pd.testing.assert_frame_equal(split_sample(table(5, 1), "kept_strict", "dev", 8, 0),
                                  split_sample(table(5, 8, False), "kept_strict", "dev", 8, 0))


def test_the_rise_between_layers_has_a_paired_interval_that_is_exact_when_the_layers_move_together():
    """Layer 3 closes exactly 0.5 more of every prompt's gap than layer 1, while the prompts' own fractions
    scatter widely: on every prompt resample the rise is 0.5, so its paired interval is the point 0.5, where
    the difference of the two marginal intervals would be wide; the verdict reads the paired one."""
    from mechdiff.rq1.layer_entry import entry_profile
    from mechdiff.rq1.layer_patch import rise_intervals

    rng = np.random.default_rng(0)
    gap = rng.uniform(0.5, 2.0, 40)
    rem1 = gap * rng.uniform(0.6, 1.4, 40)  # layer 1: anywhere from -0.4 to 0.4 of each prompt's gap closed
    rows = pd.DataFrame([{"id": f"p{i}", "direction": d, "layer": layer, "gap": gap[i], "remaining": r}
                         for d in ("base->tuned", "tuned->base") for i in range(40)
                         for layer, r in ((1, rem1[i]), (3, rem1[i] - 0.5 * gap[i]))])
    rises = rise_intervals(rows, n_boot=500, seed=0).set_index(["direction", "layer"])
    for d in ("base->tuned", "tuned->base"):
        assert rises.loc[(d, 3), "rise"] == pytest.approx(0.5)
        assert rises.loc[(d, 3), "rise_lo"] == pytest.approx(0.5) and rises.loc[(d, 3), "rise_hi"] == pytest.approx(0.5)
        assert rises.loc[(d, 1), "rise_hi"] - rises.loc[(d, 1), "rise_lo"] > 0.1  # layer 1's own fraction scatters
    summary = summarise(rows, 500, 0)
    marginal = entry_profile(summary)["rise_ci"][1]
    assert marginal[1] - marginal[0] > 0.2  # the unpaired difference of marginal intervals is wide
    paired = entry_profile(summary.merge(rises.reset_index(), on=["direction", "layer"]))["rise_ci"][1]
    assert paired == pytest.approx((0.5, 0.5))
