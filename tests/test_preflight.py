"""Pre-flight: unreachable ids answer fast with a fix; local pairs pass; mismatches are named."""

from __future__ import annotations

import subprocess
import sys
import time

import yaml

from mechdiff.models.preflight import activation_bytes, check_pair, resolve
from mechdiff.params.config import load_params
from tests.small_project import ROOT
from tests.tiny import tiny_llama


def test_unreachable_hub_id_fails_fast_with_a_fix(tmp_path, params_text):
    data = yaml.safe_load(params_text)
    data["pairs"] = {"x": {**data["pairs"]["cultural"], "base": "mechdiff-no-such-org/no-such-model",
                           "tuned": "mechdiff-no-such-org/no-such-model-2"}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mechdiff.models.preflight", "--params", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 30
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "[FAIL] x: resolve mechdiff-no-such-org/no-such-model:" in p.stdout
    assert ("cannot reach the Hub" in p.stdout) or ("does not exist or is private" in p.stdout)


def test_local_pair_passes_and_mismatch_is_named(tmp_path, params_text):
    params = load_params(params_text)
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(n_layers=4).save_pretrained(a)
    tiny_llama(n_layers=6).save_pretrained(b)
    pair = params.pairs["null"].__class__(**{**params.pairs["null"].__dict__, "base": str(a), "tuned": str(a)})
    checks = {c.name: c for c in check_pair("p", pair, params, 100, free_disk=10**12, gpu_free=None)}
    assert checks["architecture"].ok and checks["disk"].ok
    mismatched = pair.__class__(**{**pair.__dict__, "tuned": str(b)})
    arch = [c for c in check_pair("p", mismatched, params, 100, 10**12, None) if c.name == "architecture"][0]
    assert not arch.ok and "num_hidden_layers: 4 vs 6" in arch.message
    tight = [c for c in check_pair("p", pair, params, 100, free_disk=10, gpu_free=None) if c.name == "disk"][0]
    assert not tight.ok and "lower fairness.n_sampled_positions" in tight.message
    assert not resolve(str(tmp_path / "missing-dir/x/y"), None)[0].ok


def test_activation_estimate_matches_the_arithmetic(params_text):
    params = load_params(params_text)
    # 8 layers scanned at the default stride 1; 3 modes; 9 positions per prompt; float32; two models
    assert params.layers.scan_stride == 1
    assert activation_bytes(params, 10, 8, 128) == 2 * 10 * 9 * 3 * 8 * 128 * 4
    # the seed's stride 2 (the presets of 30-32-layer models) scans 4 of 8
    params = load_params(params_text.replace("scan_stride: 1 ", "scan_stride: 2 "))
    assert activation_bytes(params, 10, 8, 128) == 2 * 10 * 9 * 3 * 4 * 128 * 4
