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

import pytest

from mechdiff.organisms.planted_truth import CHECKS

ROOT = Path(__file__).resolve().parents[1]
REPORT, MODELS = ROOT / "report", ROOT / "artifacts" / "models"

pytestmark = pytest.mark.skipif(not (REPORT / "verdict.json").exists() or not (MODELS / "cultural").exists(),
                                reason="the default pipeline has not run here: `make repro` (dvc repro) first")


@pytest.fixture(scope="module")
def run() -> dict:
    """The pipeline's results as the report stage reads them, the cultural ground truth and the verdicts."""
    from stages.report_io import load_planted_run

    return load_planted_run(ROOT)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_run_recovers_the_planted_truth(run, name):
    """Each known answer of the organisms (mechdiff.organisms.planted_truth), on this machine's own build."""
    ok, seen = CHECKS[name](run["results"], run["truth"], run["verdicts"], run["policy_max_k"])
    assert ok, f"{name}: {seen}"


def test_every_verdict_cites_its_numbers(run):
    for pair in ("cultural", "cognitive"):
        assert any(ch.isdigit() for ch in " ".join(run["verdicts"][pair]["reasons"]))


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
    assert "report/metrics/cultural.json" in shown and "k_min" in shown and "entry" in shown
    assert "report/headline.json" not in shown and "artifacts/results" not in shown
