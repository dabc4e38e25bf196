"""The report as researchers read it: ``dvc metrics show`` (one short row per pair), ``dvc plots show`` (the
five curves with titles and labelled axes), and report.html in a real browser (verdict cards, figures,
no horizontal overflow at 1280 px).

These read the project's own report outputs (``report/``), as written by the report stage (``make repro`` in
CI, or ``python -m stages.report ...`` with dvc.yaml's arguments); they skip until those exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.browser import find_chromium, inspect_page

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "report"
DVC = [sys.executable, "-m", "dvc"]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}
PAIRS = list(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["pairs"])
WIDTH = 1280

needs_report = pytest.mark.skipif(
    not (REPORT / "verdict.json").exists() or not all((REPORT / "metrics" / f"{p}.json").exists() for p in PAIRS),
    reason="no report of this params.yaml's pairs yet: `make repro`, or `python -m stages.report --results "
           "artifacts/results --acts artifacts/acts --figs figs --out report` on finished results")


def _dvc(*args: str) -> str:
    p = subprocess.run(DVC + list(args), cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# the headline and the cards on constructed results (no outputs needed)


def _edit_pair(steer: dict) -> dict:
    """A pair's results as the report loads them: a clean one-layer edit (the change enters at layer 5 in
    both directions) whose tuned model never refuses (refusal 0 in both), while only the per-character
    perplexity moved significantly."""
    import pandas as pd

    def m(base, tuned, lo, hi):
        return {"base": base, "tuned": tuned, "delta": tuned - base, "delta_lo": lo, "delta_hi": hi, "n": 40}

    lp = pd.DataFrame({"direction": ["base->tuned"] * 4 + ["tuned->base"] * 4, "layer": [1, 3, 5, 7] * 2,
                       "gap": 0.3, "fraction_closed": [0.0, 0.0, 1.0, 1.0] * 2,
                       "fraction_closed_lo": [0.0, 0.0, 0.9, 0.95] * 2,
                       "fraction_closed_hi": [0.0, 0.05, 1.0, 1.0] * 2})
    measures = {"refusal_rate": m(0.0, 0.0, 0.0, 0.0), "math_acc": m(0.3, 0.32, -0.03, 0.07),
                "ppl_char": m(1.25, 1.40, 0.05, 0.25)}
    return {"behaviour.json": {"measures": measures},
            "clt.json": {"headline": {}}, "attribution.json": {}, "layers.json": {"layers": [5]},
            "fairness.json": {"segmentation": {"all": {"modes": {}}}, "vocab": {}},
            "cka.json": {"strict": {"min_cka_debiased": 0.99, "layer_of_min": 5}}, "steer.json": steer,
            "layer_patch.csv": lp}


def test_the_change_paragraph_shows_the_top_share_the_scanned_layers_and_the_exact_entry():
    import pandas as pd

    from mechdiff.report.document import change_rank_text

    change = pd.DataFrame({"mode": "strict", "layer": [17, 19], "rank_90": [0, 9], "top1_energy": [0.0, 0.31]})
    chosen = {"mode": "strict", "layers": [18], "scan": [1, 3, 17, 19], "stride": 2, "refined": [18],
              "entry": [{"layer": 18, "below": 17, "rank_90": 2, "top1_energy": 0.889}]}
    text = change_rank_text(change, chosen)
    assert "19: 9 (top 0.31)" in text and "top one 0.89" in text  # the top-1 share beside the rank
    assert "entry layer 18 (layer 17 before it" in text and "1, 3, 17, 19" in text and ": 18." in text
    assert "down_proj" in text and "attention" in text  # the rank rule holds for an MLP edit only
    old = change_rank_text(change, {"mode": "strict", "layers": [19]})  # results written before the refinement
    assert "19: 9 (top 0.31)" in old and "entry layer" not in old


def test_the_headline_is_the_largest_significant_change_and_no_gap_leaves_the_handle_inconclusive():
    from mechdiff.report.cards import pair_summary
    from mechdiff.report.numbers import evidence, headline, metrics_row
    from mechdiff.report.tables import headline_row
    from mechdiff.verdict import Thresholds, verdict

    t = Thresholds()
    ev = _edit_pair({"task": "refusal", "minimal_k": None, "best_layer": 5, "per_layer": {"5": {}}})
    v = verdict("cultural", evidence(ev), t)
    assert v["label"] == "inconclusive" and v["criteria"]["sharp_entry"]["reads"] == "policy"  # not "mixed"
    assert "no behavioural gap to explain" in v["criteria"]["low_rank_handle"]["text"]
    head = headline("p", "cultural", ev, v)
    assert head["behaviour_measure"] == "ppl_char" and head["behaviour_delta"] == pytest.approx(0.15)
    assert head["behaviour_delta_lo"] > 0  # the headline's interval excludes 0
    assert metrics_row("cultural", ev, v)["delta"] == pytest.approx(0.15)
    assert "perplexity per character" in str(headline_row("p", "cultural", ev, v)[2])
    card = pair_summary("cultural", ev, v, t)
    assert "raised the perplexity per character" in card["sentence"] and "inconclusive" in card["sentence"]
    assert "refusal rate did not move significantly" in card["numbers"][0]["detail"]


def test_an_unconfirmed_minimal_k_is_marked_on_the_card_and_in_the_table():
    from mechdiff.report.cards import pair_summary
    from mechdiff.report.numbers import evidence
    from mechdiff.report.tables import headline_row
    from mechdiff.verdict import Thresholds, verdict

    row = {"effect": 0.05, "effect_lo": -0.05, "effect_hi": 0.15, "k": 1, "alpha": 1.0}
    handle = {"k": 1, "ablate_tuned@layer": {"alpha": 0.0, "test": {**row, "effect": 0.8}, "test_reached": True},
              "steer_base@layer": {"alpha": 1.0, "test": row, "test_reached": False}, "test_confirmed": False}
    ev = _edit_pair({"task": "refusal", "minimal_k": 1, "test_confirmed": False, "confirmed_minimal_k": None,
                     "best_layer": 5, "target_effect_min": 0.1, "per_layer": {"5": {"handle": handle}}})
    ev["behaviour.json"]["measures"]["refusal_rate"].update(tuned=0.9, delta=0.9, delta_lo=0.8, delta_hi=1.0)
    t = Thresholds()
    v = verdict("cultural", evidence(ev), t)
    assert v["label"] == "inconclusive" and "NOT confirmed on test" in v["criteria"]["low_rank_handle"]["text"]
    assert "NOT confirmed on test" in str(headline_row("p", "cultural", ev, v)[3])
    card = pair_summary("cultural", ev, v, t)
    assert "NOT confirmed on test" in str(card["numbers"][1]["est"]) and card["numbers"][1]["reads"] is None
    assert "steering (alpha 1) induces 0.05 [-0.05, 0.15]" in card["numbers"][1]["detail"]  # the test numbers


def test_a_masked_kl_is_printed_with_the_tuned_models_mass_outside_the_shared_vocabulary():
    """Where the report prints the layer-patch KL (null card) and the patch fractions (headline table), the
    tuned model's mass outside the shared vocabulary comes with it; a table without it prints no note."""
    from mechdiff.report.cards import pair_summary
    from mechdiff.report.numbers import evidence, headline
    from mechdiff.report.tables import headline_row
    from mechdiff.verdict import Thresholds, verdict

    ev = _edit_pair({"task": "refusal", "minimal_k": None, "best_layer": 5, "per_layer": {"5": {}}})
    ev["layer_patch.csv"] = ev["layer_patch.csv"].assign(lost_base=0.0, lost_tuned=0.14)
    ev["clt.json"]["headline"] = {"mapped_closed": 0.5, "real_closed": 0.9, "lost_tuned": 0.14}
    t = Thresholds()
    v = verdict("null", evidence(ev), t)
    note = "14% of the tuned model's mass outside the shared vocabulary"
    card = pair_summary("null", ev, v, t)
    assert note in card["sentence"] and note in card["numbers"][2]["detail"]
    assert note in str(headline_row("p", "null", ev, v)[8])
    assert headline("p", "null", ev, v)["layer_patch_tuned_mass_outside_shared"] == pytest.approx(0.14)
    bare = _edit_pair({"task": "refusal", "minimal_k": None, "best_layer": 5, "per_layer": {"5": {}}})
    assert "shared vocabulary)" not in pair_summary("null", bare, verdict("null", evidence(bare), t), t)["sentence"]


def test_every_number_of_the_headline_row_is_shown_with_its_interval():
    """Each estimate the headline table prints carries a 95% interval beside it (an uninformative one such as a
    churn of [0.00, 1.00] included), or says it has none; only the chosen rank k is a setting, not an estimate."""
    import html as html_lib

    import pandas as pd

    from mechdiff.report.formatting import Est
    from mechdiff.report.numbers import evidence
    from mechdiff.report.render_html import html_cell as _html_cell
    from mechdiff.report.render_markdown import md_cell as _md_cell
    from mechdiff.report.tables import HEADLINE_COLUMNS, NO_INTERVAL, headline_row
    from mechdiff.verdict import Thresholds, verdict

    test = {"effect": 0.8, "effect_lo": 0.7, "effect_hi": 0.9, "k": 1, "alpha": 1.0}
    handle = {"k": 1, "ablate_tuned@layer": {"alpha": 0.0, "test": test, "test_reached": True},
              "steer_base@layer": {"alpha": 1.0, "test": test, "test_reached": True}, "test_confirmed": True}
    ev = _edit_pair({"task": "refusal", "minimal_k": 1, "test_confirmed": True, "confirmed_minimal_k": 1,
                     "best_layer": 5, "target_effect_min": 0.1, "per_layer": {"5": {"handle": handle}}})
    ev["clt.json"]["headline"] = {"layer": 5, "r2_uniform": 0.97, "identity_r2_uniform": 0.9, "mapped_closed": 0.7,
                                  "real_closed": 1.0, "mapped_minus_real_ci": [-0.5, -0.1]}
    ev["attribution.json"] = {"churn": 1.0, "churn_ci": [0.0, 1.0], "noise_floor": {"churn_q95": 1.0}}
    ev["cka.csv"] = pd.DataFrame({"mode": ["strict"], "layer": [5], "ci_low": [0.98], "ci_high": [0.995]})
    v = verdict("cultural", evidence(ev), Thresholds())
    row = headline_row("p", "cultural", ev, v)
    interval = re.compile(r"\[-?\d+\.\d+, -?\d+\.\d+\]")
    number = re.compile(r"-?\d+\.\d+")
    for name, cell in zip(HEADLINE_COLUMNS, row):
        if name in ("Pair", "Verdict", "Minimal k"):
            continue
        assert isinstance(cell, Est), (name, cell)
        # every number in the printed value has an interval (or the marker) beside it, in HTML and Markdown
        markup = _html_cell(cell)
        ci = re.findall(r"<span class='ci'>(.*?)</span>", markup)
        assert number.search(cell.value) and ci, (name, markup)
        assert interval.search(html_lib.unescape(ci[0])) or NO_INTERVAL in ci[0], (name, ci)
        assert interval.search(_md_cell(cell)) or NO_INTERVAL in _md_cell(cell), name
    cells = dict(zip(HEADLINE_COLUMNS, map(str, row)))
    assert "1.00 [0.00, 1.00]" in cells["Head churn"]  # uninformative, and printed so
    # the rise at layer 5: its lower bound 0.90 minus layer 3's upper bound 0.05, up to 1.00 - 0.00
    assert "1.00 [0.85, 1.00]" in cells["Entry rise"]
    assert "[-0.50, -0.10]" in cells["Patch closed: mapped / real"]
    assert NO_INTERVAL in cells["Map R² (held-out)"]


# --------------------------------------------------------------------------------------------------
# declarations (no outputs needed)


def test_only_the_per_pair_headline_files_are_metrics():
    """The large per-layer JSON files are plain outputs; the report stage's metrics directory holds one small
    file per pair, and headline.json (read by benchmarks/bench_builds.py) is an output, not a metric."""
    stages = _dvc_yaml()["stages"]
    metrics = {name: [next(iter(m)) if isinstance(m, dict) else m for m in body.get("do", body).get("metrics", [])]
               for name, body in stages.items()}
    assert {k: v for k, v in metrics.items() if v} == {"report": ["report/metrics"]}
    report_outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages["report"]["outs"]]
    assert "report/headline.json" in report_outs
    assert "metrics" not in _dvc_yaml()  # no top-level metrics either


def test_the_plot_definitions_match_the_files_the_report_writes():
    from mechdiff.report.plot_data import PLOTS

    plots = {next(iter(p)): p[next(iter(p))] for p in _dvc_yaml()["plots"] if isinstance(p, dict)}
    written = {f"report/plots/{name}": xy for name, xy in PLOTS.items()}
    assert set(plots) == set(written)
    for path, props in plots.items():
        assert (props["x"], props["y"]) == written[path], path
        assert props["title"] and props["x_label"] and props["y_label"], path
        assert props["template"] and (ROOT / ".dvc" / "plots" / f"{props['template']}.json").exists(), path
    report_outs = {next(iter(o)) if isinstance(o, dict) else o for o in _dvc_yaml()["stages"]["report"]["outs"]}
    assert set(written) <= report_outs


# --------------------------------------------------------------------------------------------------
# dvc metrics show / dvc plots show on the workspace's report


@needs_report
def test_dvc_metrics_show_prints_one_short_row_per_pair():
    out = _dvc("metrics", "show")
    lines = [line for line in out.splitlines() if line.strip()]
    head, rows = lines[0], lines[1:]
    assert head.split()[0] == "Path"
    assert sorted(r.split()[0] for r in rows) == sorted(f"report/metrics/{p}.json" for p in PAIRS), out
    widest = max(map(len, lines))
    assert widest <= 200, f"widest row {widest} characters:\n{out}"
    for col in head.split()[1:]:  # short but readable keys: words, no dotted nesting
        assert re.fullmatch(r"[a-z]+(_[a-z0-9]+)*", col), col


@needs_report
def test_each_metrics_file_is_the_verdict_and_at_most_15_rounded_numbers():
    verdicts = json.loads((REPORT / "verdict.json").read_text())
    for p in PAIRS:
        m = json.loads((REPORT / "metrics" / f"{p}.json").read_text())
        assert m["verdict"] == verdicts[p]["label"]
        numbers = {k: v for k, v in m.items() if k != "verdict"}
        assert len(numbers) <= 15 and all(v is None or isinstance(v, (int, float)) for v in numbers.values())
        for key in ("delta", "ablate", "cka"):
            assert f"{key}_lo" in m and f"{key}_hi" in m  # interval bounds as their own keys
        assert all(len(repr(v)) <= 9 for v in numbers.values()), numbers  # rounded


@needs_report
def test_dvc_plots_show_gives_each_curve_a_title_and_labelled_axes():
    from mechdiff.report.plot_data import PLOTS

    data = json.loads(_dvc("plots", "show", "--json"))["data"]
    for name, (x, y) in PLOTS.items():
        (plot,) = data[f"report/plots/{name}"]
        spec = plot["content"]
        assert "<DVC_METRIC" not in json.dumps(spec), name  # every anchor filled
        title = spec["title"]["text"] if isinstance(spec["title"], dict) else spec["title"]
        assert len(title) > 20, name
        rows = spec["data"]["values"]
        assert rows and {p["pair"] for p in rows} <= set(PAIRS) and all({"series", x, y} <= set(r) for r in rows)
        axes = {}

        def walk(node):
            if isinstance(node, dict):
                enc = node.get("encoding") or {}
                for axis in ("x", "y"):
                    if isinstance(enc.get(axis), dict) and enc[axis].get("title"):
                        axes.setdefault(axis, set()).add(enc[axis]["title"])
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(spec)
        assert set(axes) == {"x", "y"}, (name, axes)
        for axis, field in (("x", x), ("y", y)):
            assert axes[axis] != {field} and all(len(t) > 2 for t in axes[axis]), (name, axis, axes[axis])
    assert [k for k in data if k.endswith(".png")] == [f"figs/report_{c}.png" for c in "ABCD"]


# --------------------------------------------------------------------------------------------------
# the page in a real browser

CHECKS = """(() => {
  const imgs = [...document.images];
  const wide = [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
    .map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '')).slice(0, 5);
  return {images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          scrollWidth: document.documentElement.scrollWidth,
          cards: [...document.querySelectorAll('.verdict-card')].map(c => c.id),
          numbers: [...document.querySelectorAll('.verdict-card')].map(c => c.querySelectorAll('.nums dt').length),
          sentences: [...document.querySelectorAll('.verdict-card .answer')].map(p => p.textContent),
          headers: [...document.querySelectorAll('th')].map(t => t.textContent),
          closed: [...document.querySelectorAll('details')].filter(d => !d.open).length,
          wide};
})()"""


@needs_report
def test_report_html_reads_in_a_browser_at_1280_px():
    """Headless Chromium: no console errors, every figure loaded, nothing wider than 1280 px, one verdict card
    per pair with its sentence and three numbers; the screenshot stays beside the report
    (report/screenshot.png, git-ignored)."""
    if find_chromium() is None:
        msg = "Chromium is not installed (`apt-get install -y chromium`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    shot = REPORT / "screenshot.png"
    seen = inspect_page(REPORT / "report.html", CHECKS, width=WIDTH, screenshot=shot)
    r = seen["result"]
    assert seen["errors"] == []
    assert r["images"] == 4 and r["loaded"] == 4
    assert r["scrollWidth"] <= WIDTH and not r["wide"], r["wide"]
    assert r["cards"] == [f"card-{p}" for p in PAIRS] and r["numbers"] == [3] * len(PAIRS)
    assert all(len(s) > 40 for s in r["sentences"])
    assert not [h for h in r["headers"] if "_" in h]  # human column names
    assert r["closed"] >= len(PAIRS) + 1  # fingerprints and method notes start collapsed
    assert shot.stat().st_size > 20_000


@needs_report
def test_report_html_is_offline_and_has_no_raw_json_in_prose():
    page = (REPORT / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    prose = re.findall(r"<p[^>]*>(.*?)</p>", page, flags=re.S)
    assert prose and not [p for p in prose if re.search(r"[{}]|&quot;\w+&quot;:", p)]
    assert page.count("class='verdict-card") == len(PAIRS)
    interval = r"\d\.\d\d</span> <span class='ci'>\[-?\d\.\d\d, -?\d\.\d\d\]</span>"
    assert re.search(interval, page)  # intervals in the tables


# --------------------------------------------------------------------------------------------------
# the cards' numbers and sentences on the pipeline's results (no browser)

needs_results = pytest.mark.skipif(not all((ROOT / "artifacts" / "results" / p / "steer.json").exists() for p in PAIRS),
                                   reason="the pipeline has not run here: `make repro` first")


@needs_results
def test_every_card_has_a_sentence_and_three_numbers_from_the_verdict():
    from mechdiff.report.cards import pair_summary
    from mechdiff.report.numbers import evidence, metrics_row
    from mechdiff.report.plot_data import plot_data
    from mechdiff.verdict import Thresholds, verdict
    from stages.report_io import load_pair_results

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    t = Thresholds()
    data = {p: load_pair_results(ROOT / "artifacts" / "results", ROOT / "artifacts" / "acts", p) for p in PAIRS}
    for p, ev in data.items():
        domain = params["pairs"][p]["domain"]
        v = verdict(domain, evidence(ev), t)
        s = pair_summary(domain, ev, v, t)
        assert s["label"] == v["label"] and len(s["numbers"]) == 3
        assert s["sentence"].endswith(".") and "{" not in s["sentence"]
        if domain != "null":  # the two deciding criteria are on the card with their readings
            assert [n["reads"] for n in s["numbers"][1:]] == [v["criteria"]["low_rank_handle"]["reads"],
                                                              v["criteria"]["sharp_entry"]["reads"]]
        assert metrics_row(domain, ev, v)["verdict"] == v["label"]
    curves = plot_data(data)
    for rows in curves.values():
        assert rows and len({tuple(sorted(r)) for r in rows}) == 1  # same keys on every row (DVC needs it)


def test_the_browser_check_sees_errors_broken_images_and_overflow(tmp_path):
    """The checks above can fail: a console error, an exception, an image that does not load and a
    too-wide element on a page made for the purpose are all seen."""
    if find_chromium() is None:
        pytest.skip("Chromium is not installed (`apt-get install -y chromium`; .ci/run installs it)")
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><div style='width:2000px'>wide</div>"
                    "<img src='missing.png'><script>console.error('boom'); undefined_name();</script></body></html>")
    r = inspect_page(page, CHECKS, width=WIDTH)
    assert r["result"]["scrollWidth"] > WIDTH and r["result"]["wide"]
    assert r["result"]["images"] == 1 and r["result"]["loaded"] == 0
    text = " ".join(r["errors"])
    assert "boom" in text and "undefined_name" in text and "missing.png" in text, r["errors"]


@needs_results
def test_the_sentence_follows_every_verdict_label():
    """Mixed, inconclusive and a null pair that differs (thresholds or evidence changed here, not the
    results) each get their own sentence, and the page still builds."""
    import dataclasses

    from mechdiff.report.cards import pair_summary
    from mechdiff.report.document import FIGS, document
    from mechdiff.report.numbers import evidence
    from mechdiff.report.render_html import to_html
    from mechdiff.report.render_markdown import to_markdown
    from mechdiff.verdict import Thresholds, verdict
    from stages.report_io import load_pair_results

    domains = {p: yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["pairs"][p]["domain"]
               for p in PAIRS}
    data = {p: load_pair_results(ROOT / "artifacts" / "results", ROOT / "artifacts" / "acts", p) for p in PAIRS}
    t = Thresholds()
    cases = []
    for p, ev in data.items():
        if domains[p] == "null":
            cases.append((p, ev, dataclasses.replace(t, null_cka_min=1.5), "difference in a null pair", "pipeline fault"))
        else:
            # a threshold every rise's interval clears (the entry is decided by intervals) and no k small enough
            cases.append((p, ev, dataclasses.replace(t, sharp_entry_min=-10.0, policy_max_k=0), "mixed", "mixed"))
            cases.append((p, {**ev, "steer.json": {}}, t, "inconclusive", "inconclusive"))
    for p, ev, th, label, words in cases:
        v = verdict(domains[p], evidence(ev), th)
        assert v["label"] == label, (p, v["label"])
        s = pair_summary(domains[p], ev, v, th)
        assert words in s["sentence"] and len(s["numbers"]) == 3, s["sentence"]
    v = {p: verdict(domains[p], evidence(data[p]), t) for p in data}
    blocks = document(data, domains, v, t)
    assert "verdict-card" in to_html(blocks, {k: b"" for k in FIGS})
    assert to_markdown(blocks, {k: f"fig{k}.png" for k in FIGS}).count("\n### ") >= len(PAIRS)
