"""filter_shared -> collect_acts -> cka -> layer_patch on a small on-disk pair, run as real stages.

Includes the SIGKILL-and-resume test of collect_acts (byte-identical outputs) and the stale-cache and
bad-input messages.
"""

from __future__ import annotations

import filecmp
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.small_project import ROOT, build, stage


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    params = build(tmp)
    stage("filter_shared", "--pair", "small", "--prepared", str(tmp / "data/prepared.parquet"),
          "--out", str(tmp / "filtered"), "--report", str(tmp / "fairness.json"), "--params", str(params))
    return tmp, params


def _collect(tmp, params, out, worker=None, **kw):
    extra = ("--worker", worker) if worker else ()
    return stage("collect_acts", "--pair", "small", "--filtered", str(tmp / "filtered"), "--out", str(out),
                 "--params", str(params), *extra, **kw)


def test_fairness_report_on_an_extended_tokenizer(proj):
    tmp, _ = proj
    rep = json.loads((tmp / "fairness.json").read_text())
    assert rep["vocab"]["n_appended"] == 18 and rep["vocab"]["id_identity"] == 1.0
    seg = rep["segmentation"]
    assert seg["en"]["segmentation_identity_rate"] == 1.0 and seg["kk"]["segmentation_identity_rate"] == 0.0
    assert {"strict", "aligned", "base_ids"} == set(seg["all"]["modes"])
    assert "masked_mass" not in rep  # needs the weights: the behaviour stage measures it
    prompts = pd.read_parquet(tmp / "filtered" / "prompts.parquet")
    assert len(prompts) == 24 and prompts["kept_aligned"].all()


def test_collect_cka_and_layer_patch_find_the_planted_layer(proj):
    tmp, params = proj
    _collect(tmp, params, tmp / "acts")
    fp = json.loads((tmp / "acts" / "fingerprint.json").read_text())
    assert fp["layers"] == [0, 1, 2, 3] and fp["modes"] == ["strict", "aligned", "base_ids"]
    assert json.loads((tmp / "acts" / "batch.json").read_text())["batch_size"] == 3  # params, recorded
    stage("cka", "--pair", "small", "--acts", str(tmp / "acts"), "--table", str(tmp / "cka.csv"),
          "--metrics", str(tmp / "cka.json"), "--fig", str(tmp / "cka.png"),
          "--change-rank", str(tmp / "cka_change.csv"), "--params", str(params))
    cka = pd.read_csv(tmp / "cka.csv")
    strict = cka[cka["mode"] == "strict"].set_index("layer")["cka_debiased"]
    assert strict[0] > 0.9999 and strict[1] > 0.9999 and strict[2] < 0.999
    change = pd.read_csv(tmp / "cka_change.csv")
    change = change[change["mode"] == "strict"].set_index("layer")
    assert change.loc[0, "rank_90"] == 0 and change.loc[1, "rank_90"] == 0  # identical below the planted layer
    assert change.loc[2, "rank_90"] > 4  # a dense (full-rank) edit of down_proj spreads over many directions
    stage("layer_patch", "--pair", "small", "--filtered", str(tmp / "filtered"), "--cka", str(tmp / "cka.csv"),
          "--table", str(tmp / "lp.csv"), "--chosen", str(tmp / "layers.json"), "--fig", str(tmp / "lp.png"),
          "--params", str(params))
    lp = pd.read_csv(tmp / "lp.csv")
    assert set(lp["mode"]) == {"strict", "aligned"}
    assert lp.groupby("split")["mode"].apply(frozenset).to_dict() == {"dev": {"strict"}, "test": {"strict", "aligned"}}
    assert set(lp.loc[lp["mode"] == "aligned", "split"]) == {"test"}  # chosen on dev, every mode reported on test
    lp = lp[lp["mode"] == "strict"]
    for split in ("dev", "test"):
        fwd = lp[(lp["direction"] == "base->tuned") & (lp["split"] == split)].set_index("layer")["fraction_closed"]
        assert fwd[2] > 0.999 and fwd[3] > 0.999 and fwd[1] < 0.5
    chosen = json.loads((tmp / "layers.json").read_text())
    assert chosen["chosen_on"] == "dev"
    assert chosen["layers"][0] == 2 and chosen["scan"] == [0, 1, 2, 3] and chosen["refined"] == []
    assert set(lp["scan"]) == {"coarse"}  # stride 1: nothing left to refine
    assert [e["layer"] for e in chosen["entry"]] == [2] and chosen["entry"][0]["rank_90"] > 4  # dense edit
    assert (tmp / "cka.png").stat().st_size > 0 and (tmp / "lp.png").stat().st_size > 0


def test_collect_acts_killed_midway_resumes_to_identical_outputs(proj):
    tmp, params = proj
    _collect(tmp, params, tmp / "acts_ref")
    out = tmp / "acts_killed"
    partial = out.parent / f".{out.name}.partial"
    cmd = [sys.executable, "-m", "stages.collect_acts", "--pair", "small", "--filtered", str(tmp / "filtered"),
           "--out", str(out), "--params", str(params)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(partial.glob("*/shard-*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(partial.glob("*/shard-*.safetensors")), "no shard was finished before the kill"
    assert not out.exists()
    resumed = _collect(tmp, params, out)
    assert "resuming from finished shards" in resumed.stdout
    ref = sorted(p.relative_to(tmp / "acts_ref") for p in (tmp / "acts_ref").rglob("*") if p.is_file())
    got = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert ref == got
    for rel in ref:
        assert filecmp.cmp(tmp / "acts_ref" / rel, out / rel, shallow=False), rel
    assert not partial.exists()


def test_stale_activation_shard_is_refused(proj, tmp_path):
    tmp, params = proj
    import shutil
    from safetensors.torch import load_file, save_file
    acts = tmp_path / "acts"
    shutil.copytree(tmp / "acts", acts)
    shard = sorted((acts / "strict").glob("shard-*.safetensors"))[0]
    from safetensors import safe_open
    with safe_open(str(shard), "pt") as f:
        fp = json.loads(f.metadata()["fingerprint"])
    save_file(load_file(str(shard)), str(shard), metadata={"fingerprint": json.dumps({**fp, "dtype": "bfloat16"})})
    p = stage("cka", "--pair", "small", "--acts", str(acts), "--table", str(tmp_path / "c.csv"), "--metrics",
              str(tmp_path / "c.json"), "--fig", str(tmp_path / "c.png"),
              "--change-rank", str(tmp_path / "c_change.csv"), "--params", str(params), check=False)
    assert p.returncode == 2
    assert "was computed from different inputs (dtype: stored 'bfloat16', expected 'float32')" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "c.csv").exists()


def test_behaviour_stage_writes_the_gap_table_and_metrics(proj):
    tmp, params = proj
    stage("behaviour", "--pair", "small", "--filtered", str(tmp / "filtered"), "--table", str(tmp / "beh.csv"),
          "--metrics", str(tmp / "beh.json"), "--fig", str(tmp / "beh.png"), "--params", str(params))
    table = pd.read_csv(tmp / "beh.csv").set_index("measure")
    from mechdiff.rq1.behaviour import MEASURES

    assert list(table.index) == list(MEASURES)
    # the fixture's prompts are 24 non-target questions: only false refusals are measured
    assert table.loc["false_refusal", "n"] == 24 and table.loc["refusal_rate", "n"] == 0
    assert 0.0 <= table.loc["false_refusal", "base"] <= 1.0
    metrics = json.loads((tmp / "beh.json").read_text())
    assert metrics["prompt_sets"]["other"] == 24 and metrics["measures"]["math_acc"]["base"] is None
    assert (tmp / "beh.png").stat().st_size > 0


def test_stages_rerun_give_byte_identical_results(proj, tmp_path):
    """Determinism: the same inputs and params give the same bytes (tables, metrics; figures excluded)."""
    tmp, params = proj
    outs = []
    for run in ("a", "b"):
        d = tmp_path / run
        _collect(tmp, params, d / "acts")
        stage("cka", "--pair", "small", "--acts", str(d / "acts"), "--table", str(d / "cka.csv"), "--metrics",
              str(d / "cka.json"), "--fig", str(d / "cka.png"),
              "--change-rank", str(d / "cka_change.csv"), "--params", str(params))
        stage("layer_patch", "--pair", "small", "--filtered", str(tmp / "filtered"), "--cka", str(d / "cka.csv"),
              "--table", str(d / "lp.csv"), "--chosen", str(d / "layers.json"), "--fig", str(d / "lp.png"),
              "--params", str(params))
        stage("behaviour", "--pair", "small", "--filtered", str(tmp / "filtered"), "--table", str(d / "beh.csv"),
              "--metrics", str(d / "beh.json"), "--fig", str(d / "beh.png"), "--params", str(params))
        outs.append(d)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.suffix != ".png")
    assert len(files) > 6
    for rel in files:
        assert filecmp.cmp(outs[0] / rel, outs[1] / rel, shallow=False), rel


def test_collect_acts_halves_a_batch_on_out_of_memory(proj, tmp_path, monkeypatch, capsys):
    """An injected out-of-memory error on every batch of more than one prompt: the stage halves and
    retries, says so once, and writes the same files and rows as an uninterrupted run (states equal to
    float tolerance: a batch of one pads differently from a batch of three)."""
    import torch

    from mechdiff.models import collect_acts as collect_lib
    from stages import collect_acts

    tmp, params = proj
    _collect(tmp, params, tmp_path / "ref")
    real = collect_lib.capture_plan_batch

    def flaky(model, ids, *a, **k):
        if len(ids) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real(model, ids, *a, **k)

    monkeypatch.setattr(collect_lib, "capture_plan_batch", flaky)
    monkeypatch.setattr(sys, "argv", ["collect_acts", "--pair", "small", "--filtered", str(tmp / "filtered"),
                                      "--out", str(tmp_path / "got"), "--params", str(params)])
    collect_acts.main()
    printed = capsys.readouterr().out
    assert printed.count("out of memory on a collect_acts batch") == 1  # logged once per run
    ref = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*") if p.is_file())
    assert ref == sorted(p.relative_to(tmp_path / "got") for p in (tmp_path / "got").rglob("*") if p.is_file())
    from safetensors.torch import load_file

    for rel in ref:
        if rel.suffix == ".safetensors":
            a, b = load_file(str(tmp_path / "ref" / rel)), load_file(str(tmp_path / "got" / rel))
            assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), rel
        else:
            assert filecmp.cmp(tmp_path / "ref" / rel, tmp_path / "got" / rel, shallow=False), rel


def test_steering_rank_above_the_hidden_size_is_refused(proj, tmp_path):
    import yaml

    tmp, params = proj
    p = yaml.safe_load(params.read_text())
    p["steer"]["ks"] = [1, 64]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (tmp_path / "layers.json").write_text(json.dumps({"layers": [2]}))
    r = stage("steer_sweep", "--pair", "small", "--filtered", str(tmp / "filtered"), "--layers",
              str(tmp_path / "layers.json"), "--table", str(tmp_path / "s.csv"), "--info", str(tmp_path / "s.json"),
              "--params", str(tmp_path / "params.yaml"), check=False)
    assert r.returncode == 2, r.stderr
    assert "steer.ks has k = 64, more than the model's hidden size 32" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.csv").exists()


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def test_collect_acts_split_over_two_workers_assembles_byte_identical_outputs(proj, tmp_path):
    tmp, params = proj
    if not (tmp / "acts_ref").exists():
        _collect(tmp, params, tmp / "acts_ref")
    out = tmp_path / "acts"
    partial = tmp_path / ".acts.partial"
    for worker in ("1/2", "0/2"):  # one per GPU in real use (CUDA_VISIBLE_DEVICES=i), here one after the other
        p = _collect(tmp, params, out, worker=worker)
        assert f"worker {worker} finished its shards" in p.stdout and not out.exists()
    shards = {m.name: len(list(m.glob("shard-*.safetensors"))) for m in partial.iterdir() if m.is_dir()}
    assert shards["strict"] >= 2  # several shards, so both workers had work
    assembled = _collect(tmp, params, out)
    assert "shard" not in assembled.stdout.replace("shards in", "")  # nothing left to compute: only assembly
    assert "assembled without loading the models" in assembled.stdout  # configs only, no weights read
    _same_tree(tmp / "acts_ref", out)
    bad = _collect(tmp, params, tmp_path / "x", worker="2/2", check=False)
    assert bad.returncode == 2 and "--worker '2/2': expected i/n with 0 <= i < n" in bad.stderr


def test_workers_refuse_an_automatic_batch_that_was_not_probed_first(proj, tmp_path):
    import yaml

    tmp, params = proj
    p = yaml.safe_load(params.read_text())
    p["acts"]["auto_batch"] = True
    alt = tmp_path / "params.yaml"
    alt.write_text(yaml.safe_dump(p, sort_keys=False))
    r = stage("collect_acts", "--pair", "small", "--filtered", str(tmp / "filtered"), "--out", str(tmp_path / "a"),
              "--params", str(alt), "--worker", "0/2", check=False)
    assert r.returncode == 2 and "acts.auto_batch with --worker: the workers must batch alike" in r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob(".a.partial/*/shard-*"))


def _layer_patch_with(proj, tmp_path, **layers) -> None:
    """Run layer_patch on the small pair (its cka.csv made once) with ``layers`` params overridden."""
    import yaml

    tmp, params = proj
    if not (tmp / "cka.csv").exists():
        _collect(tmp, params, tmp / "acts")
        stage("cka", "--pair", "small", "--acts", str(tmp / "acts"), "--table", str(tmp / "cka.csv"), "--metrics",
              str(tmp / "cka.json"), "--fig", str(tmp / "cka.png"),
              "--change-rank", str(tmp / "cka_change.csv"), "--params", str(params))
    p = yaml.safe_load(params.read_text())
    p["layers"].update(layers)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    stage("layer_patch", "--pair", "small", "--filtered", str(tmp / "filtered"), "--cka", str(tmp / "cka.csv"),
          "--table", str(tmp_path / "lp.csv"), "--chosen", str(tmp_path / "layers.json"), "--fig",
          str(tmp_path / "lp.png"), "--params", str(tmp_path / "params.yaml"))


def test_layer_patch_with_standardised_states_still_finds_the_planted_layer(proj, tmp_path):
    _layer_patch_with(proj, tmp_path, patch_standardise=True, calibration_prompts=6, patch_prompts=12)
    lp = pd.read_csv(tmp_path / "lp.csv")
    lp = lp[(lp["mode"] == "strict") & (lp["split"] == "test")]
    fwd = lp[lp["direction"] == "base->tuned"].set_index("layer")["fraction_closed"]
    assert abs(fwd[1]) < 1e-3 and fwd[2] > 0.5
    assert json.loads((tmp_path / "layers.json").read_text())["layers"][0] == 2


def test_layer_patch_refines_a_stride_2_scan_to_the_exact_entry(proj, tmp_path):
    """The planted layer 2 of 4 is not scanned with stride 2 (layers 1, 3): the stage patches the bracket
    (1, 3) too, chooses layer 2, and says which layers were coarse and which refined."""
    _layer_patch_with(proj, tmp_path, scan_stride=2)
    chosen = json.loads((tmp_path / "layers.json").read_text())
    assert chosen["scan"] == [1, 3] and 2 in chosen["refined"] and chosen["layers"][0] == 2
    assert [e["layer"] for e in chosen["entry"]] == [2] and chosen["entry"][0]["below"] == 1
    lp = pd.read_csv(tmp_path / "lp.csv")
    assert dict(zip(lp["layer"], lp["scan"]))[2] == "refined" and dict(zip(lp["layer"], lp["scan"]))[1] == "coarse"
    assert set(lp.groupby("mode")["layer"].apply(frozenset)) == {frozenset(lp["layer"])}  # every mode, same layers
