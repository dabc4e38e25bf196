"""The ``llama31`` preset through ``dvc repro``, prepare_data to report, on real published inputs.

Both pairs of the preset run on tiny random-weight Llama models saved beside the real Llama-3 tokenizer
with the 3.1 config (base) and a Sherkala-like append-only extension of it (tuned; :mod:`tests.real_pair`),
with the real GSM8K, MATH-500 and refusal files as the datasets (paths instead of Hub ids, as the preset
allows offline) and a Kazakh multiple-choice benchmark in the per-subject dev/test JSONL layout. The sweeps
are cut to CPU size; everything else is the preset. Random weights decide nothing: these tests assert what
the inputs fix (vocabulary facts, answers as published, every stage ran, no organism trained).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from mechdiff.params.preset import apply_preset
from tests.project_copy import DVC, copy_project, ran, sh
from tests.real_pair import REAL, build_pair

pytestmark = pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} is absent: the real-inputs tests need it")

N = 16  # prompts (groups) per dataset
CPU_SIZE = {  # sweeps cut to a 2-core CPU
    "behaviour": {"max_prompts": 32, "n_bootstrap": 200},
    "layers": {"patch_prompts": 16, "calibration_prompts": 16},
    "cka": {"n_permutations": 20, "n_bootstrap": 20},
    "clt": {"n_positions": 1500, "min_positions": 300, "patch_prompts": 8, "cv_folds": 3},
    "steer": {"ks": [1, 2], "alphas": [1.0], "max_prompts": 8, "all_layers": False, "n_bootstrap": 50},
    "head_patch": {"max_prompts": 8, "n_random": 4},
    "attribution": {"max_prompts": 16},
}
MC_SUBJECTS = {"history": [("Абай Құнанбайұлы кім болған?", ["ақын", "әнші", "батыр", "хан"], "A"),
                           ("Қазақстанның астанасы қай қала?", ["Алматы", "Астана", "Шымкент", "Атырау"], "B")],
               "culture": [("Наурыз қай айда тойланады?", ["қаңтар", "наурыз", "мамыр", "шілде"], "B"),
                           ("Домбыра неше ішекті?", ["бір", "екі", "үш", "төрт"], "B")]}


def _mc_folder(root):
    """``root/{dev,test}/<subject>.jsonl`` rows ``{question, choices, answer}`` (the per-subject layout)."""
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        for subject, rows in MC_SUBJECTS.items():
            lines = [json.dumps({"question": f"{q} ({split} {i})", "choices": c, "answer": a}, ensure_ascii=False)
                     for i in range(N // 2) for q, c, a in rows]
            (root / split / f"{subject}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _local(spec: dict, path, fields: dict, **extra) -> dict:
    """A preset Hub dataset pointed at a local copy (no revision needed with ``path``)."""
    return {**spec, "path": str(path), "revision": None, "fields": fields, "n": N, **extra}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama31")
    base, tuned, n_added = build_pair(tmp / "models")
    repo = copy_project(tmp / "repo")
    params = yaml.safe_load(apply_preset((repo / "params.yaml").read_text(), "llama31"))
    data = REAL / "data"
    for pair in params["pairs"].values():
        pair.update(base=str(base), tuned=str(tuned), base_revision=None, tuned_revision=None)
        ds = pair["datasets"]
        ds["neutral"] = _local(ds["neutral"], data / "refusal" / "harmless_test.json", {"text": "instruction"})
    cultural = params["pairs"]["cultural"]["datasets"]
    cultural["refusal"] = _local(cultural["refusal"], data / "refusal" / "advbench.csv", {"text": "goal"})
    cultural["kk_mc"] = _local(cultural["kk_mc"], _mc_folder(tmp / "kk_mc"),
                               {"text": "question", "choices": "choices", "answer": "answer"}, split_from_path=True)
    cognitive = params["pairs"]["cognitive"]["datasets"]
    cognitive["gsm8k"] = _local(cognitive["gsm8k"], data / "gsm8k" / "test.jsonl", cognitive["gsm8k"]["fields"])
    cognitive["math"] = _local(cognitive["math"], data / "math" / "math500_test.jsonl", cognitive["math"]["fields"])
    for section, values in CPU_SIZE.items():
        params[section].update(values)
    params["data"]["allow_external_paths"] = True  # the real files live beside the project
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    out = sh(DVC + ["repro"], repo, timeout=1800)
    return repo, out, n_added


def test_every_stage_of_both_pairs_runs_and_no_organism_is_trained(run):
    repo, out, _ = run
    stages = ran(out)
    for pair in ("cultural", "cognitive"):
        for stage in ("prepare_data", "filter_shared", "behaviour", "collect_acts", "cka", "layer_patch",
                      "fit_clt", "steer_sweep", "head_patch", "attribution"):
            assert f"{stage}@{pair}" in stages, (stage, pair)
    assert "report" in stages
    assert json.loads((repo / "artifacts" / "models" / "build_report.json").read_text())["built"] is False
    assert not any(p.is_dir() for p in (repo / "artifacts" / "models").iterdir())
    assert (repo / "report" / "report.html").stat().st_size > 0


def test_the_extended_tokenizer_reads_as_an_id_preserving_superset(run):
    repo, _, n_added = run
    fair = json.loads((repo / "artifacts" / "results" / "cultural" / "fairness.json").read_text())
    assert fair["vocab"]["base_size"] == 128256 and fair["vocab"]["n_appended"] == n_added
    assert fair["vocab"]["id_identity"] == 1.0
    assert fair["segmentation"]["en"]["segmentation_identity_rate"] == 1.0  # new tokens are all non-ASCII


def test_math500_and_gsm8k_answers_reach_the_judge_as_published(run):
    repo, _, _ = run
    prepared = pd.read_parquet(repo / "data" / "prepared" / "cognitive.parquet")
    rows = [json.loads(line) for line in (REAL / "data" / "math" / "math500_test.jsonl").read_text().splitlines()]
    published = {r["unique_id"]: r["answer"] for r in rows}
    math = prepared[prepared["source"] == "math"]
    assert len(math) == N and all(a == published[i.split(":", 1)[-1]] or a in published.values()
                                  for i, a in zip(math["id"], math["answer"]))
    behaviour = json.loads((repo / "artifacts" / "results" / "cognitive" / "behaviour.json").read_text())
    assert behaviour["measures"]["math_acc"]["n"] > 0


def test_the_source_split_of_the_mc_benchmark_is_kept(run):
    repo, _, _ = run
    prepared = pd.read_parquet(repo / "data" / "prepared" / "cultural.parquet")
    mc = prepared[prepared["source"] == "kk_mc"]
    assert set(mc["topic"]) == set(MC_SUBJECTS)
    assert all(("(dev " in t) == (s == "dev") for t, s in zip(mc["text"], mc["split"]))


def test_a_bad_threshold_under_dvc_loses_no_finished_output(run):
    """DVC deletes a stage's outputs before its command runs: check_params, which every stage depends on,
    stops `dvc repro` and `dvc exp run -S` first, so the finished report survives (``cache: false``
    outputs cannot be restored)."""
    import subprocess

    from tests.project_copy import ENV

    repo, _, _ = run
    outputs = sorted(p for p in (repo / "report").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in outputs}
    good = (repo / "params.yaml").read_text()
    bad = good.replace("null_kl_max: ", "null_kl_max: -1.0 #", 1)
    assert bad != good
    for cmd, setup in ((DVC + ["repro"], lambda: (repo / "params.yaml").write_text(bad)),
                       (DVC + ["exp", "run", "-S", "report.null_kl_max=-1.0"], lambda: None)):
        (repo / "params.yaml").write_text(good)
        setup()
        p = subprocess.run(cmd, cwd=repo, env=ENV, text=True, capture_output=True, timeout=600)
        assert p.returncode != 0 and "report.null_kl_max" in p.stdout + p.stderr, (cmd, p.stdout, p.stderr)
        assert {q: q.read_bytes() for q in outputs} == before, cmd
    (repo / "params.yaml").write_text(good)
