"""Sources made of many files, a source's own split, bad rows (``data.on_bad_row``) and dataset paths:
the per-subject multiple-choice layout (``dev/<subject>.jsonl``, ``test/<subject>.jsonl``), options that
keep their letters, text fields that must be strings, and paths that must stay inside the project."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from mechdiff.data.prepare_data import assign_splits, dataset_rows, prepare_pair_rows, summarise
from mechdiff.data.prompt_rows import BadRowError, file_split, normalise_files, topic_from_name
from mechdiff.data.prompt_schema import SourceError
from mechdiff.data.source_files import SourceFile, load_files
from mechdiff.params.config import DatasetSpec, PairSpec, ParamsError
from mechdiff.params.parse import parse_value
from stages.common import StageError
from stages.prepare_data import check_paths
from tests.small_project import stage

SUBJECTS = ("history", "geography", "literature")
REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


def _mc_row(k: int, subject: str, split: str, choices=None, answer="B") -> dict:
    return {"question": f"{subject} {split} сұрақ {k}?", "choices": choices or ["бір", "екі", "үш", "төрт"],
            "answer": answer}


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _per_subject(root: Path, n: int = 6, extra: dict[str, list[dict]] | None = None) -> Path:
    """``root/kk_mc/{dev,test}/<subject>.jsonl`` with ``n`` good rows each, plus rows appended per file,
    a README and a hidden file (neither is data)."""
    folder = root / "kk_mc"
    for split in ("dev", "test"):
        for subject in SUBJECTS:
            name = f"{split}/{subject}.jsonl"
            rows = [_mc_row(k, subject, split) for k in range(n)] + (extra or {}).get(name, [])
            _write_rows(folder / name, rows)
    (folder / "README.md").write_text("per-subject Kazakh MC\n", encoding="utf-8")
    _write_rows(folder / "dev" / ".hidden.jsonl", [{"nothing": 1}])
    return folder


def _kk_mc(path: str, **kw) -> DatasetSpec:
    return DatasetSpec(kind="file", task="mc", path=path, language="kk",
                       fields={"text": "question", "choices": "choices", "answer": "answer"},
                       answer_format="letter", **kw)


def _pair(**datasets: DatasetSpec) -> PairSpec:
    return PairSpec(base="b", tuned="t", domain="cultural", tokenizer_policy="shared_vocab_required",
                    datasets=datasets)


def _one(rows: list[dict], on_bad_row: str = "skip", **kw):
    return normalise_files([SourceFile("", rows)], _kk_mc("x.jsonl", **kw), "kk_mc", on_bad_row)


# ------------------------------------------------------------------------------------------------
# bad rows


def test_all_empty_choices_row_is_skipped_and_counted():
    rows = [_mc_row(0, "s", "t"), _mc_row(1, "s", "t", choices=["", "", "", ""]), _mc_row(2, "s", "t")]
    frame, skipped = _one(rows)
    assert len(frame) == 2 and skipped.read == 3
    assert skipped.reasons() == {"empty_choices": 1}
    assert skipped.bad[0].label.startswith("kk_mc record 2")
    assert skipped.line("kk_mc").startswith("kk_mc: skipped 1 of 3 rows (1 empty_choices)")


def test_all_empty_choices_row_stops_the_run_with_error():
    rows = [_mc_row(0, "s", "t"), _mc_row(1, "s", "t", choices=["", "", "", ""])]
    with pytest.raises(BadRowError) as err:
        _one(rows, on_bad_row="error")
    msg = str(err.value)
    assert "kk_mc record 2" in msg and "data.on_bad_row: skip" in msg and "\n" not in msg
    assert err.value.reason == "empty_choices"


def test_gold_on_an_empty_option_is_skipped_never_relettered():
    frame, skipped = _one([_mc_row(0, "s", "t", choices=["", "T", "Ж", ""], answer="A")])
    assert frame.empty and skipped.reasons() == {"answer_points_at_empty_choice": 1}


def test_options_keep_their_source_letters():
    frame, skipped = _one([_mc_row(0, "s", "t", choices=["", "T", "Ж", ""], answer="B")])
    row = frame.iloc[0]
    assert not skipped.bad
    assert row["answer"] == "B" and row["choices"] == ["", "T", "Ж", ""]
    lines = row["text"].splitlines()
    assert "B) T" in lines and "C) Ж" in lines
    assert not any(line.startswith(("A)", "D)")) for line in lines)  # empty options are not shown


@pytest.mark.parametrize("value", [["what is", "this"], {"q": "what"}, 42, 3.5, True, False])
def test_text_field_must_be_a_string(value):
    rows = [_mc_row(0, "s", "t"), dict(_mc_row(1, "s", "t"), question=value)]
    frame, skipped = _one(rows)
    assert len(frame) == 1 and skipped.reasons() == {"text_not_a_string": 1}
    assert not any(str(value) in t for t in frame["text"])
    with pytest.raises(BadRowError, match=r"kk_mc record 2 .*expected a string.*data.on_bad_row: skip"):
        _one(rows, on_bad_row="error")


@pytest.mark.parametrize("field, value, reason", [("choices", "A) x B) y", "choices_not_a_list"),
                                                  ("choices", ["x", ["y"], "z"], "choice_not_text"),
                                                  ("question", "   ", "empty_text"),
                                                  ("answer", "", "empty_answer"),
                                                  ("answer", "Q", "unreadable_answer")])
def test_each_bad_row_has_its_reason(field, value, reason):
    frame, skipped = _one([_mc_row(0, "s", "t"), dict(_mc_row(1, "s", "t"), **{field: value})])
    assert len(frame) == 1 and skipped.reasons() == {reason: 1}


def test_skipped_rows_reach_the_summary(tmp_path):
    _per_subject(tmp_path, extra={"test/history.jsonl": [_mc_row(9, "h", "t", choices=["", "", "", ""]),
                                                         _mc_row(10, "h", "t", choices=["", "T", "Ж", ""],
                                                                 answer="D")]})
    frame, skipped = prepare_pair_rows(_pair(kk_mc=_kk_mc("kk_mc")), tmp_path, 0, 0.5, "p", on_bad_row="skip")
    summary = summarise(frame, skipped)
    json.dumps(summary)
    src = summary["sources"]["kk_mc"]
    assert src["rows_read"] == src["prompts"] + src["rows_skipped"]
    assert src["skip_reasons"] == {"answer_points_at_empty_choice": 1, "empty_choices": 1}
    assert summary["rows_skipped"] == 2
    assert "of test/history.jsonl" in skipped["kk_mc"].bad[0].label


# ------------------------------------------------------------------------------------------------
# folders, globs, topics and the source's own split


@pytest.mark.parametrize("path", ["kk_mc", "kk_mc/*/*.jsonl"])
def test_folder_and_glob_read_every_subject_file_in_order(tmp_path, path):
    _per_subject(tmp_path, n=3)
    files = load_files(_kk_mc(path), tmp_path)
    names = [f.name for f in files]
    assert names == sorted(f"{s}/{t}.jsonl" for s in ("dev", "test") for t in SUBJECTS)
    frame, _ = dataset_rows(_kk_mc(path), "kk_mc", tmp_path, 0)
    assert len(frame) == 3 * len(names) and frame["id"].is_unique
    assert set(frame["topic"]) == set(SUBJECTS)
    for subject in SUBJECTS:
        assert frame.loc[frame["topic"] == subject, "text"].str.startswith(subject).all()


def test_mapped_topic_field_wins_over_the_file_name(tmp_path):
    _write_rows(tmp_path / "mc" / "test" / "history.jsonl", [dict(_mc_row(0, "h", "t"), cat="Тарих")])
    spec = dataclasses.replace(_kk_mc("mc"), fields={**_kk_mc("mc").fields, "topic": "cat"})
    assert dataset_rows(spec, "kk_mc", tmp_path, 0)[0]["topic"].tolist() == ["Тарих"]


@pytest.mark.parametrize("name, topic", [("dev/history.jsonl", "history"), ("history_test.csv", "history"),
                                         ("test/world-history_dev.json", "world-history"),
                                         ("history/test.jsonl", "history")])
def test_topic_from_file_name(name, topic):
    assert topic_from_name(name) == topic


@pytest.mark.parametrize("name, split", [("dev/history.jsonl", "dev"), ("validation/x.csv", "dev"),
                                         ("harmful_val.json", "dev"), ("test/x.jsonl", "test"),
                                         ("history_test.jsonl", "test"), ("x/test.parquet", "test")])
def test_file_split_rule(name, split):
    assert file_split(name) == split


@pytest.mark.parametrize("name", ["train/x.jsonl", "latest/x.jsonl", "dev/x_test.jsonl", "x.jsonl"])
def test_unclassifiable_file_is_an_error_naming_it(name):
    with pytest.raises(SourceError, match=rf"cannot place file '{name}'.*split_from_path"):
        file_split(name, "kk_mc")


def test_split_from_path_keeps_the_sources_split(tmp_path):
    _per_subject(tmp_path)
    spec = _kk_mc("kk_mc", split_from_path=True)
    frame, _ = prepare_pair_rows(_pair(kk_mc=spec), tmp_path, 0, 0.5, "p")
    from_dev = frame["id"].str.startswith("kk_mc-dev/")
    assert from_dev.any() and (~from_dev).any()
    assert (frame.loc[from_dev, "split"] == "dev").all() and (frame.loc[~from_dev, "split"] == "test").all()
    assert frame["text"].str.contains(" dev ").eq(from_dev).all()


def test_without_the_option_the_hash_split_ignores_folders(tmp_path):
    _per_subject(tmp_path)
    frame, _ = prepare_pair_rows(_pair(kk_mc=_kk_mc("kk_mc")), tmp_path, 0, 0.5, "p")
    expected = assign_splits(frame.drop(columns="split"), 0.5, 0)["split"]
    assert frame["split"].tolist() == expected.tolist()


def test_split_from_path_with_a_train_file_names_it(tmp_path):
    _per_subject(tmp_path)
    _write_rows(tmp_path / "kk_mc" / "train" / "history.jsonl", [_mc_row(0, "h", "train")])
    with pytest.raises(SourceError, match=r"'train/history.jsonl'"):
        prepare_pair_rows(_pair(kk_mc=_kk_mc("kk_mc", split_from_path=True)), tmp_path, 0, 0.5, "p")


def test_folder_or_glob_without_data_files_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    for path in ("empty", "empty/*.jsonl", "missing/*.jsonl"):
        with pytest.raises(SourceError, match=r"no .*jsonl.* files found; fix `path:`"):
            load_files(_kk_mc(path), tmp_path)


# ------------------------------------------------------------------------------------------------
# params: hub + path, split_from_path


def _spec_from(data: dict) -> DatasetSpec:
    return parse_value(data, DatasetSpec, "pairs.p.datasets.d")


def test_hub_with_a_local_path_needs_no_revision(tmp_path):
    hub = {"kind": "hub", "task": "mc", "hub_id": "org/kk-mmlu", "language": "kk",
           "fields": {"text": "question", "choices": "choices", "answer": "answer"}, "answer_format": "letter"}
    with pytest.raises(ParamsError, match=r"datasets\.d\.revision'"):
        _spec_from(hub)
    _per_subject(tmp_path, n=2)
    spec = _spec_from({**hub, "path": "kk_mc"})
    assert spec.revision is None
    assert len(dataset_rows(spec, "kk_mc", tmp_path, 0)[0]) == 12


def test_split_from_path_needs_a_path():
    with pytest.raises(ParamsError, match=r"datasets\.d\.split_from_path'"):
        _spec_from({"kind": "hub", "task": "mc", "hub_id": "x/y", "revision": "main", "split_from_path": True,
                    "fields": {"text": "q"}})


# ------------------------------------------------------------------------------------------------
# dataset paths and the project root


def test_a_path_leaving_the_project_is_an_error_unless_params_allow_it(tmp_path):
    project = tmp_path / "project"
    (project / "data" / "sources").mkdir(parents=True)
    outside = str(tmp_path / "outside" / "x.jsonl")
    for path in ("../outside/x.jsonl", "data/../../outside/*.jsonl", outside):
        with pytest.raises(StageError, match=r"leaves the project directory .* data\.allow_external_paths: true"):
            check_paths(_pair(d=_kk_mc(path)), root=project)
    ok = {"in": _kk_mc("data/sources/kk_mc"), "other": _kk_mc("tests/fixtures/x.jsonl")}
    assert check_paths(_pair(**ok), root=project)["in"] == project / "data" / "sources" / "kk_mc"
    paths = check_paths(_pair(mine=_kk_mc(outside)), allow_outside=True, root=project)
    assert paths["mine"] == tmp_path / "outside" / "x.jsonl"  # allowed: the user's own data


# ------------------------------------------------------------------------------------------------
# the stage: skip counts in data.json and on stderr, or one error line


def _stage_params(tmp_path, params_text: str, on_bad_row: str) -> str:
    data = yaml.safe_load(params_text)
    spec = {"kind": "file", "task": "mc", "path": str(tmp_path / "kk_mc"), "language": "kk",
            "fields": {"text": "question", "choices": "choices", "answer": "answer"}, "answer_format": "letter"}
    data["pairs"]["cultural"]["datasets"] = {"kk_mc": spec}
    data["data"]["on_bad_row"] = on_bad_row
    data["data"]["allow_external_paths"] = True  # the benchmark lives in tmp_path
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return str(path)


def _prepare(tmp_path, params):
    return stage("prepare_data", "--pair", "cultural", "--out", str(tmp_path / "out.parquet"),
                 "--summary", str(tmp_path / "out.json"), "--params", params, check=False)


def test_stage_skips_and_reports_or_stops_on_a_bad_row(tmp_path, params_text):
    _per_subject(tmp_path, n=3, extra={"dev/history.jsonl": [_mc_row(9, "h", "d", choices=["", "", "", ""])]})
    p = _prepare(tmp_path, _stage_params(tmp_path, params_text, "skip"))
    assert p.returncode == 0, p.stderr
    skip_lines = [x for x in p.stderr.splitlines() if "skipped" in x]
    assert skip_lines == [x for x in skip_lines if x.startswith("prepare_data: kk_mc: skipped 1 of 19 rows "
                                                                "(1 empty_choices)")] and len(skip_lines) == 1
    summary = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert summary["sources"]["kk_mc"]["skip_reasons"] == {"empty_choices": 1}

    (tmp_path / "out.parquet").unlink()
    p = _prepare(tmp_path, _stage_params(tmp_path, params_text, "error"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = p.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: kk_mc record 4 of dev/history.jsonl")
    assert "data.on_bad_row: skip" in errors[0] and not (tmp_path / "out.parquet").exists()


# ------------------------------------------------------------------------------------------------
# the real data sets (read through the `file` kind; nothing skipped)


def _real(relative: str) -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real data sets not present: no folder {REAL}")
    return REAL / "data" / relative


@pytest.mark.parametrize("relative, fields, extra", [
    ("gsm8k/test.jsonl", {"text": "question", "answer": "answer"}, {"answer_format": "gsm8k", "task": "math"}),
    *[(f"refusal/{kind}_{split}.json", {"text": "instruction", "topic": "category"}, {})
      for kind in ("harmful", "harmless") for split in ("train", "val", "test")],
    ("refusal/advbench.csv", {"text": "goal"}, {}),
])
def test_real_data_reads_without_skipped_rows(relative, fields, extra):
    path = _real(relative)
    spec = DatasetSpec(**{"kind": "file", "task": "refusal", "path": str(path), "language": "en",
                          "fields": fields, **extra})
    frame, skipped = dataset_rows(spec, "real", Path("/nonexistent-root"), 0, on_bad_row="skip")
    assert skipped.bad == () and len(frame) == skipped.read > 0
    assert frame["text"].str.strip().str.len().gt(0).all()
    if relative.startswith("gsm8k"):
        assert len(frame) == 1319 and frame["answer"].notna().all()


def test_real_refusal_splits_keep_their_own_split():
    val, test = _real("refusal/harmful_val.json"), _real("refusal/harmful_test.json")
    spec = {"kind": "file", "task": "refusal", "language": "en", "fields": {"text": "instruction"},
            "split_from_path": True}
    pair = _pair(val=DatasetSpec(path=str(val), **spec), test=DatasetSpec(path=str(test), **spec))
    frame, skipped = prepare_pair_rows(pair, Path("/nonexistent-root"), 0, 0.5, "real")
    assert all(not s.bad for s in skipped.values())
    assert frame.groupby("source")["split"].agg(set).to_dict() == {"val": {"dev"}, "test": {"test"}}
