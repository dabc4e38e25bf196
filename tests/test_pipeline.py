"""The DVC pipeline: structure checks, and real `dvc repro` runs in a throwaway copy of the repo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "CI": "true",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
       "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost",
       "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@localhost"}


def sh(cmd: list[str], cwd: Path) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=ENV, text=True, capture_output=True, timeout=1200)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def ran(out: str) -> list[str]:
    return sorted(re.findall(r"Running stage '([^']+)'", out))


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _outputs() -> set[str]:
    """Every path some stage writes (outs, metrics, plots), so deps on them need not exist yet."""
    outs = set()
    for stage in stages().values():
        body = stage.get("do", stage)
        for section in ("outs", "metrics", "plots"):
            for item in body.get(section, []):
                outs.add(next(iter(item)) if isinstance(item, dict) else item)
    return outs


def test_every_stage_script_exists_and_is_a_dependency():
    produced = _outputs()
    for name, stage in stages().items():
        body = stage.get("do", stage)
        module = re.search(r"python -m stages\.(\w+)", body["cmd"]).group(1)
        assert (ROOT / "stages" / f"{module}.py").exists(), name
        assert f"stages/{module}.py" in body["deps"], name
        for dep in body["deps"]:
            made = dep in produced or any(o.startswith(dep.rstrip("/") + "/") for o in produced)
            if "${" not in dep and not made:
                assert (ROOT / dep).exists(), f"{name}: dependency {dep} does not exist"


def test_stage_params_exist_in_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in stages().items():
        body = stage.get("do", stage)
        for key in body.get("params", []):
            for pair in params["pairs"]:
                node = params
                for part in key.replace("${key}", pair).split("."):
                    assert part in node, f"{name}: params key {key} not in params.yaml"
                    node = node[part]


def test_dvc_yaml_parses():
    out = sh(DVC + ["stage", "list"], ROOT)
    for pair in yaml.safe_load((ROOT / "params.yaml").read_text())["pairs"]:
        assert f"prepare_data@{pair}" in out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC copy of the project's files (no dvc.lock, no outputs) in a temp dir."""
    dst = tmp_path_factory.mktemp("mechdiff") / "repo"
    files = subprocess.check_output(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                                    cwd=ROOT, text=True).split("\n")
    for f in filter(None, files):
        if f == "dvc.lock" or f.startswith(("artifacts/", "figs/", "data/prepared/")) or not (ROOT / f).exists():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    (dst / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    sh(["git", "init", "-q", "-b", "main"], dst)
    sh(["git", "add", "-A"], dst)
    sh(["git", "commit", "-qm", "base"], dst)
    return dst


def test_prepare_data_runs_per_pair_then_is_cached(repo):
    pairs = sorted(yaml.safe_load((repo / "params.yaml").read_text())["pairs"])
    out = sh(DVC + ["repro", "prepare_data"], repo)
    assert ran(out) == sorted(f"prepare_data@{p}" for p in pairs)
    for p in pairs:
        assert (repo / "data" / "prepared" / f"{p}.parquet").stat().st_size > 0
        assert json.loads((repo / "artifacts" / "results" / p / "data.json").read_text())["prompts"] > 0
    t0 = time.perf_counter()
    assert ran(sh(DVC + ["repro", "prepare_data"], repo)) == []
    assert time.perf_counter() - t0 < 10
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "prepared"], repo)


def test_threshold_edit_shows_exactly_that_change_and_reruns_no_data(repo):
    text = (repo / "params.yaml").read_text()
    new = text.replace("max_ppl_increase: 0.05", "max_ppl_increase: 0.07")
    assert new != text
    (repo / "params.yaml").write_text(new)
    diff = json.loads(sh(DVC + ["params", "diff", "--json"], repo))
    assert list(diff) == ["params.yaml"] and list(diff["params.yaml"]) == ["steer.max_ppl_increase"]
    assert (diff["params.yaml"]["steer.max_ppl_increase"]["old"], diff["params.yaml"]["steer.max_ppl_increase"]["new"]) == (0.05, 0.07)
    assert ran(sh(DVC + ["repro", "prepare_data"], repo)) == []


def test_dataset_param_change_reruns_only_that_pair(repo):
    # Change a dataset field of one pair only (the pair stops sharing the YAML anchor).
    lines = (repo / "params.yaml").read_text().splitlines()
    i = lines.index("  cognitive:")
    j = next(k for k in range(i, len(lines)) if lines[k].strip().startswith("datasets: *world_datasets"))
    lines[j] = ("    datasets:\n      world:\n        kind: world\n        task: world\n"
                "        world_n_math: 150\n        world_n_neutral: 60")
    (repo / "params.yaml").write_text("\n".join(lines) + "\n")
    assert ran(sh(DVC + ["repro", "prepare_data"], repo)) == ["prepare_data@cognitive"]


def test_remote_round_trip_restores_outputs_in_a_fresh_clone(repo, tmp_path):
    """`dvc push` to a local-folder remote, then a fresh clone pulls the same bytes and finds nothing to
    rerun (`dvc repro --pull --allow-missing`, the CI recipe of docs/pipeline.md)."""
    sh(DVC + ["repro", "prepare_data"], repo)
    remote = tmp_path / "remote"
    sh(DVC + ["remote", "add", "-f", "-d", "store", str(remote)], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "remote", "--allow-empty"], repo)
    sh(DVC + ["push"], repo)
    assert any(remote.rglob("*")), "nothing was pushed"
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not list((clone / "data" / "prepared").glob("*.parquet"))
    sh(DVC + ["pull", "prepare_data@cultural"], clone)  # one pair's outputs only
    assert sorted(f.name for f in (clone / "data" / "prepared").glob("*.parquet")) == ["cultural.parquet"]
    assert ((clone / "data" / "prepared" / "cultural.parquet").read_bytes()
            == (repo / "data" / "prepared" / "cultural.parquet").read_bytes())
    assert ran(sh(DVC + ["repro", "prepare_data@cultural"], clone)) == []  # pulled = up to date: nothing recomputed
    sh(DVC + ["pull", "prepare_data"], clone)
    for f in (repo / "data" / "prepared").glob("*.parquet"):
        assert (clone / "data" / "prepared" / f.name).read_bytes() == f.read_bytes()
    assert ran(sh(DVC + ["repro", "--pull", "--allow-missing", "prepare_data"], clone)) == []

