"""The DVC pipeline: structure checks, and real `dvc repro` runs in a throwaway copy of the repo."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.project_copy import DVC, ENV, ROOT, copy_project, ran, ran_work, sh


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
            if isinstance(key, dict):  # `- params.yaml:` tracks the whole file
                assert key == {"params.yaml": None}, (name, key)
                continue
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
    return copy_project(tmp_path_factory.mktemp("mechdiff") / "repo")


def test_prepare_data_runs_per_pair_then_is_cached(repo):
    pairs = sorted(yaml.safe_load((repo / "params.yaml").read_text())["pairs"])
    out = sh(DVC + ["repro", "prepare_data"], repo)
    assert ran(out) == sorted(["check_params"] + [f"{s}@{p}" for p in pairs for s in ("prepare_data", "track_inputs")])
    for p in pairs:
        assert (repo / "data" / "prepared" / f"{p}.parquet").stat().st_size > 0
        assert json.loads((repo / "artifacts" / "results" / p / "data.json").read_text())["prompts"] > 0
    t0 = time.perf_counter()
    assert ran_work(sh(DVC + ["repro", "prepare_data"], repo)) == []
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
    assert ran_work(sh(DVC + ["repro", "prepare_data"], repo)) == ["check_params"]  # the one-second validation only


def test_a_bad_value_stops_dvc_before_any_finished_output_is_deleted(repo):
    sh(DVC + ["repro", "prepare_data"], repo)
    outputs = sorted((repo / "data" / "prepared").glob("*.parquet")) + sorted(
        (repo / "artifacts" / "results").glob("*/data.json"))
    before = {f: f.read_bytes() for f in outputs}
    good = (repo / "params.yaml").read_text()
    bad = good.replace("  dev_fraction: 0.5", "  dev_fraction: 1.5")  # a key prepare_data tracks
    assert bad != good
    (repo / "params.yaml").write_text(bad)
    p = subprocess.run(DVC + ["repro", "prepare_data"], cwd=repo, env=ENV, text=True, capture_output=True)
    assert p.returncode != 0 and "data.dev_fraction" in p.stdout + p.stderr
    assert "Running stage 'prepare_data@" not in p.stdout
    assert {f: f.read_bytes() for f in outputs} == before
    (repo / "params.yaml").write_text(good)


def test_dataset_param_change_reruns_only_that_pair(repo):
    # Change a dataset field of one pair only (the pair stops sharing the YAML anchor).
    lines = (repo / "params.yaml").read_text().splitlines()
    i = lines.index("  cognitive:")
    j = next(k for k in range(i, len(lines)) if lines[k].strip().startswith("datasets: *world_datasets"))
    lines[j] = ("    datasets:\n      world:\n        kind: world\n        task: world\n"
                "        world_n_math: 150\n        world_n_neutral: 60")
    (repo / "params.yaml").write_text("\n".join(lines) + "\n")
    assert ran_work(sh(DVC + ["repro", "prepare_data"], repo)) == ["check_params", "prepare_data@cognitive"]


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
    assert ran_work(sh(DVC + ["repro", "prepare_data@cultural"], clone)) == []  # pulled = up to date: nothing recomputed
    sh(DVC + ["pull", "prepare_data"], clone)
    for f in (repo / "data" / "prepared").glob("*.parquet"):
        assert (clone / "data" / "prepared" / f.name).read_bytes() == f.read_bytes()
    assert ran_work(sh(DVC + ["repro", "--pull", "--allow-missing", "prepare_data"], clone)) == []



def test_editing_a_dataset_file_outside_the_project_reruns_what_reads_it(repo, tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"text": f"question {i}?"}) + "\n" for i in range(8)))
    good = (repo / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["data"]["allow_external_paths"] = True
    params["pairs"]["cultural"]["datasets"]["mine"] = {
        "kind": "file", "task": "freeform", "path": str(src), "language": "en", "fields": {"text": "text"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    assert "prepare_data@cultural" in ran(sh(DVC + ["repro", "prepare_data"], repo))
    assert ran_work(sh(DVC + ["repro", "prepare_data"], repo)) == []  # the digests held: nothing else reruns
    src.write_text(src.read_text() + json.dumps({"text": "one more?"}) + "\n")
    stages = ran(sh(DVC + ["repro", "prepare_data"], repo))
    assert "prepare_data@cultural" in stages and "prepare_data@cognitive" not in stages
    prepared = pd.read_parquet(repo / "data" / "prepared" / "cultural.parquet")
    assert "one more?" in set(prepared["text"])
    (repo / "params.yaml").write_text(good)


def _local_imports(path: Path) -> set[str]:
    """Project files (``mechdiff/x.py``, ``stages/x.py``) that ``path`` imports anywhere in its body."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                f = ROOT.joinpath(*parts[:k]).with_suffix(".py")
                if parts[0] in ("mechdiff", "stages") and f.exists() and f.name != "__init__.py":
                    found.add(f.relative_to(ROOT).as_posix())
                    break
    return found


def test_every_module_a_stage_runs_is_one_of_its_dependencies():
    """A stage reruns when code it runs changes, and only then: its code deps are exactly its script's project
    imports, transitively."""
    for name, stage in stages().items():
        body = stage.get("do", stage)
        module = re.search(r"python -m stages\.(\w+)", body["cmd"]).group(1)
        script = f"stages/{module}.py"
        todo, seen = [script], {script}
        while todo:
            for dep in _local_imports(ROOT / todo.pop()) - seen:
                seen.add(dep)
                todo.append(dep)
        missing = sorted(seen - set(body["deps"]) - {"stages/__init__.py", "mechdiff/errors.py"})
        assert not missing, f"{name}: runs {missing} but does not depend on them"
        code = {d for d in body["deps"] if re.fullmatch(r"(mechdiff|stages)/[\w/]+\.py", d)}
        stale = sorted(code - seen)
        assert not stale, f"{name}: depends on {stale} but never imports them (a change there reruns it for nothing)"


def test_one_byte_of_a_tuned_models_weights_reruns_that_pair_and_no_other(tmp_path):
    """Two pairs on small saved models outside the project (no organism: build_models trains nothing); a
    one-byte edit of pair b's tuned weights reruns b's model stage and nothing of pair a."""
    import shutil

    from tests.small_project import build as build_small

    proj = copy_project(tmp_path / "proj")
    build_small(tmp_path / "src")
    models = tmp_path / "src" / "models"
    shutil.copytree(models / "tuned", tmp_path / "tuned_b")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    world = {"world": {"kind": "world", "task": "world", "world_n_math": 8, "world_n_neutral": 4}}
    params["pairs"] = {name: {"base": str(models / "base"), "tuned": str(tuned), "base_revision": None,
                              "tuned_revision": None, "domain": "cultural", "target": "cultural",
                              "tokenizer_policy": "shared_vocab_recommended", "datasets": world}
                       for name, tuned in (("a", models / "tuned"), ("b", tmp_path / "tuned_b"))}
    params["organisms"]["build"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    first = ran_work(sh(DVC + ["repro", "filter_shared"], proj))
    assert {"build_models", "filter_shared@a", "filter_shared@b"} <= set(first)
    assert not any((proj / "artifacts" / "models" / n).exists() for n in ("base", "cultural", "cognitive"))
    assert ran_work(sh(DVC + ["repro", "filter_shared"], proj)) == []
    digest_a = (proj / "artifacts" / "results" / "a" / "models.json").read_bytes()
    weights = tmp_path / "tuned_b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight, past the header
    weights.write_bytes(bytes(data))
    assert ran_work(sh(DVC + ["repro", "filter_shared"], proj)) == ["filter_shared@b"]
    assert (proj / "artifacts" / "results" / "a" / "models.json").read_bytes() == digest_a


MODEL_STAGES = ("filter_shared", "behaviour", "collect_acts", "layer_patch", "fit_clt", "steer_sweep", "head_patch",
                "attribution")  # the stages that load a pair's tokenizers or weights


def test_no_per_pair_stage_depends_on_the_organisms_build_but_through_its_model_digests():
    """Rebuilding the organisms changes only the models.json of the pairs that use them (track_models digests
    build_models' output), so a pair of other models never reruns for it; preparing data never waits for it."""
    for name, stage in stages().items():
        body = stage.get("do", stage)
        if name not in ("build_models", "track_models"):
            assert "artifacts/models" not in body.get("deps", []), name
        if name in MODEL_STAGES:
            assert "artifacts/results/${key}/models.json" in body["deps"], name
    assert "artifacts/models" in stages()["track_models"]["do"]["deps"] and set(MODEL_STAGES) <= set(stages())
