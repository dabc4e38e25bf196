"""Reading the report's inputs: every result file of one pair, and a finished run of the embedded default (for
the planted-truth checks in tests and benchmarks/bench_builds.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stages.common import StageError, load_stage_params

#: result file -> the stage that writes it (named in the error when it is missing)
FILES = {"behaviour.json": "behaviour", "cka.json": "cka", "cka.csv": "cka", "layer_patch.csv": "layer_patch",
         "layers.json": "layer_patch", "clt.json": "fit_clt", "steer.json": "steer_select",
         "steer_curve.csv": "steer_select", "attribution.json": "churn", "fairness.json": "filter_shared",
         "head_patch.json": "head_patch", "change_rank.csv": "cka", "steer.csv": "steer_sweep"}


def load_pair_results(results: Path, acts: Path, pair: str) -> dict:
    """Every result file of one pair, parsed; a missing one names the stage that writes it.
    ``layer_patch.csv`` keeps the primary mode's rows (the mode that chose the layers) of the test split
    (the layers were chosen on dev; a table without ``split`` is read whole); the other modes' rows are
    under ``layer_patch_other``."""
    ev = {}
    for name, stage in FILES.items():
        path = results / pair / name
        if not path.exists():
            raise StageError(f"{path} is missing: run `dvc repro {stage}@{pair}` (or the whole pipeline) first")
        ev[name] = pd.read_csv(path) if name.endswith(".csv") else json.loads(path.read_text())
    lp, primary = ev["layer_patch.csv"], ev["layers.json"].get("mode")
    if "split" in lp.columns:
        lp = lp[lp["split"] == "test"].reset_index(drop=True)
    if "mode" in lp.columns and primary is not None:
        ev["layer_patch.csv"], ev["layer_patch_other"] = lp[lp["mode"] == primary], lp[lp["mode"] != primary]
    fp = acts / pair / "fingerprint.json"
    ev["fingerprint"] = json.loads(fp.read_text()) if fp.exists() else None
    return ev


def load_planted_run(root: Path) -> dict:
    """A finished run of the embedded default under project folder ``root``, as the planted-truth checks
    (mechdiff.organisms.planted_truth) take it: ``results`` per organism pair, the cultural ``truth``
    (ground_truth.json), ``verdicts`` (verdict.json) and ``policy_max_k`` (its params.yaml)."""
    results = {pair: load_pair_results(root / "artifacts" / "results", root / "artifacts" / "acts", pair)
               for pair in ("cultural", "cognitive", "null")}
    return {"results": results,
            "truth": json.loads((root / "artifacts" / "models" / "cultural" / "ground_truth.json").read_text()),
            "verdicts": json.loads((root / "report" / "verdict.json").read_text()),
            "policy_max_k": load_stage_params(root / "params.yaml").success.policy_max_k}
