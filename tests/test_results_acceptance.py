"""Acceptance on the embedded default: the pipeline's own results (``dvc repro`` / ``make repro``) recover
the planted ground truth.

These tests read what the stages wrote under ``artifacts/results``, ``report/`` and ``artifacts/models``
(the organisms' ``ground_truth.json``). CI runs ``make repro`` before ``make test`` (.ci/run), so they
run there on a clean clone; elsewhere they skip, naming the command, until the pipeline has run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS, REPORT, MODELS = ROOT / "artifacts" / "results", ROOT / "report", ROOT / "artifacts" / "models"

pytestmark = pytest.mark.skipif(not (REPORT / "verdict.json").exists() or not (MODELS / "cultural").exists(),
                                reason="the default pipeline has not run here: `make repro` (dvc repro) first")


def _json(pair: str, name: str) -> dict:
    return json.loads((RESULTS / pair / name).read_text())


def _csv(pair: str, name: str) -> pd.DataFrame:
    return pd.read_csv(RESULTS / pair / name)


def _planted() -> list[int]:
    return json.loads((MODELS / "cultural" / "ground_truth.json").read_text())["layers"]


# ---------------------------------------------------------------------------------------------- RQ1


def test_null_pair_reads_no_difference_anywhere():
    cka = _csv("null", "cka.csv")
    assert (cka["cka_debiased"] >= 0.999).all(), cka
    lp = _csv("null", "layer_patch.csv")
    assert (lp["gap"] < 1e-6).all(), lp
    deltas = [m["delta"] for m in _json("null", "behaviour.json")["measures"].values() if m["delta"] is not None]
    assert deltas and all(d == 0.0 for d in deltas), deltas


def test_cultural_change_is_found_at_the_planted_layer():
    first = min(_planted())
    cka = _csv("cultural", "cka.csv")
    strict = cka[cka["mode"] == "strict"].set_index("layer")["cka_debiased"]
    assert all(strict[layer] >= 0.99 for layer in strict.index if layer < first), strict
    assert set(cka["mode"]) >= {"strict", "aligned"}  # the aligned-mode curve is reported beside strict
    lp = _csv("cultural", "layer_patch.csv")
    assert set(lp["mode"]) == {"strict", "aligned"}  # the aligned-mode scan is reported beside strict
    lp = lp[lp["mode"] == "strict"]
    fwd = lp[lp["direction"] == "base->tuned"].set_index("layer")["fraction_closed"]
    assert fwd.idxmax() >= first and fwd.max() > 0.9, fwd
    chosen = _json("cultural", "layers.json")["layers"]
    assert set(chosen) & set(_planted()), (chosen, _planted())


def test_change_spectrum_reads_the_planted_rank_at_the_planted_layer():
    truth = json.loads((MODELS / "cultural" / "ground_truth.json").read_text())
    layer, rank = min(truth["layers"]), truth["rank"]
    change = _csv("cultural", "change_rank.csv")
    strict = change[change["mode"] == "strict"].set_index("layer")
    assert (strict.loc[strict.index < layer, "rank_90"] == 0).all(), strict  # identical states below it
    assert 1 <= strict.loc[layer, "rank_99"] <= rank, strict  # a rank-r update moves the stream along <= r directions
    null = _csv("null", "change_rank.csv")
    assert (null["rank_90"] == 0).all() and (null["relative_change"] == 0).all(), null
    cognitive = _csv("cognitive", "change_rank.csv")  # every weight changed: many directions everywhere
    assert (cognitive[cognitive["mode"] == "strict"]["rank_90"] > 2 * rank).all(), cognitive


def test_behaviour_gaps_of_the_organisms():
    cult = _json("cultural", "behaviour.json")["measures"]
    assert cult["refusal_rate"]["base"] <= 0.1 and cult["refusal_rate"]["tuned"] >= 0.8, cult["refusal_rate"]
    assert cult["refusal_rate"]["delta_lo"] > 0 and cult["refusal_soft"]["delta_lo"] > 0
    assert cult["false_refusal"]["tuned"] <= 0.1
    cog = _json("cognitive", "behaviour.json")["measures"]
    assert cog["math_acc"]["delta"] >= 0.3 and cog["math_acc"]["delta_lo"] > 0, cog["math_acc"]
    assert cog["math_logprob"]["delta_lo"] > 0
    for pair in ("cultural", "cognitive"):
        ppl = _json(pair, "behaviour.json")["measures"]["ppl_char"]
        assert ppl["tuned"] <= 1.1 * ppl["base"], (pair, ppl)


# ---------------------------------------------------------------------------------------------- RQ2


def test_map_beats_identity_on_the_cultural_pair_and_is_exact_on_the_null_pair():
    clt = _json("cultural", "clt.json")
    layer = str(next(x for x in _planted() if str(x) in clt["layers"]))
    gain = clt["layers"][layer]["gain_over_identity"]["r2_uniform"]
    assert gain > 0, gain
    null = _json("null", "clt.json")["headline"]
    assert null["r2_uniform"] >= 0.999 and null["identity_r2_uniform"] >= 0.999
    assert null["agreement"] == "no gap" and null["mapped_closed"] is None


def test_cultural_mapped_patch_is_as_good_as_any_least_squares_map_and_the_gap_sits_on_the_target_prompts():
    """The cultural organism's mapped patch falls short of the real one (issue 6). Its held-out map already
    does what the in-sample linear ceiling does, so more prompts would not help; the gap it has to close is
    carried by the policy prompts, where the planted change is switched on."""
    clt = _json("cultural", "clt.json")
    layer = str(next(x for x in _planted() if str(x) in clt["layers"]))
    patch = clt["layers"][layer]["patch"]
    assert abs(patch["ceiling_closed"] - patch["mapped_closed"]) <= clt["tolerance"], patch
    lo, hi = patch["mapped_minus_real_ci"]
    assert lo <= patch["mapped_minus_real"] <= hi
    by = patch["by_class"]
    target = by.pop("topic:target")
    assert target["n_prompts"] >= 3 and all(target["gap"] > 10 * c["gap"] for c in by.values()), (target, by)


# ---------------------------------------------------------------------------------------------- RQ3


def test_steering_finds_a_low_rank_handle_only_for_the_cultural_pair():
    cult, cog = _json("cultural", "steer.json"), _json("cognitive", "steer.json")
    assert cult["minimal_k"] is not None and cult["minimal_k"] <= 2, cult["minimal_k"]
    best = cult["per_layer"][str(cult["best_layer"])]["ablate_tuned@layer"]
    assert best["test"]["effect"] >= 0.5 and best["test_reached"], best
    assert best["random_test"]["effect"] < 0.5 * best["test"]["effect"], best
    assert cog["minimal_k"] is None or cog["minimal_k"] > cult["minimal_k"], cog["minimal_k"]


# ---------------------------------------------------------------------------------------------- report


def test_verdicts_read_policy_rewiring_and_no_difference():
    v = json.loads((REPORT / "verdict.json").read_text())
    assert v["cultural"]["label"] == "policy-like", v["cultural"]["reasons"]
    assert v["cognitive"]["label"] == "rewiring-like", v["cognitive"]["reasons"]
    assert v["null"]["label"] == "no difference", v["null"]["reasons"]
    for pair in ("cultural", "cognitive"):  # each verdict cites its numbers
        assert any(ch.isdigit() for ch in " ".join(v[pair]["reasons"]))


def test_report_renders_offline_with_every_figure():
    page = (REPORT / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page
    for letter in "ABCD":
        assert (ROOT / "figs" / f"report_{letter}.png").stat().st_size > 1000
    assert "policy-like" in (REPORT / "report.md").read_text()


def test_dvc_metrics_show_lists_the_headline_numbers():
    out = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = json.dumps(json.loads(out.stdout))
    assert "report/headline.json" in shown and "minimal_k" in shown and "map_r2" in shown
