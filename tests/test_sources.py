"""Prompt sources: local/Hub loading, normalisation to the schema, seeded group sampling and splits,
the world frame, whole pairs, the shipped presets and the free-form cultural prompt file."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mechdiff.data import prepare_data as sources
from mechdiff.data.answers import AnswerError
from mechdiff.data.prepare_data import assign_splits, sample, summarise, world_frame
from mechdiff.data.prompt_schema import COLUMNS, SourceError, conform
from mechdiff.organisms.world import evaluation_prompts
from mechdiff.params.config import DatasetSpec, PairSpec
from mechdiff.params.parse import parse_value
from tests.prompt_sources import load_raw, normalise, prepare_pair

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
PRESETS = ROOT / "mechdiff" / "params" / "presets"

GSM8K = DatasetSpec(kind="hub", task="math", hub_id="openai/gsm8k", hub_config="main", hub_split="test",
                    revision="abc123", language="en", fields={"text": "question", "answer": "answer"},
                    answer_format="gsm8k", target=True)
MATH = DatasetSpec(kind="file", task="math", path="tests/fixtures/math500.jsonl", language="en",
                   fields={"id": "unique_id", "text": "problem", "answer": "solution", "topic": "subject"},
                   answer_format="boxed")
KK_MC = DatasetSpec(kind="file", task="mc", path="tests/fixtures/kk_mc.jsonl", language="kk",
                    fields={"text": "question", "choices": "A,B,C,D", "answer": "answer", "topic": "category"},
                    answer_format="letter", target=True)
ADVBENCH = DatasetSpec(kind="file", task="refusal", path="tests/fixtures/advbench.jsonl", language="en",
                       fields={"text": "prompt"}, target=True)
ALPACA = DatasetSpec(kind="file", task="neutral", path="tests/fixtures/alpaca.jsonl", language="en",
                     fields={"text": "instruction,input"})
FREEFORM = DatasetSpec(kind="file", task="freeform", path="data/sources/freeform_cultural.jsonl",
                       fields={"id": "id", "group": "group", "language": "language", "text": "text",
                               "topic": "topic"}, target=True)


def _frame(spec: DatasetSpec, name: str) -> pd.DataFrame:
    return normalise(load_raw(spec, ROOT), spec, name)


def _records(name: str) -> list[dict]:
    return [json.loads(x) for x in (FIXTURES / name).read_text(encoding="utf-8").splitlines() if x]


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------
# normalisation of each source format


def test_schema_columns_and_dtypes():
    df = _frame(KK_MC, "kk_mc")
    assert tuple(df.columns) == COLUMNS
    assert df["target"].dtype == bool
    assert all(isinstance(c, list) for c in df["choices"])
    assert df["id"].is_unique


def test_gsm8k_answers_and_default_ids():
    df = _frame(dataclasses.replace(GSM8K, path="tests/fixtures/gsm8k.jsonl"), "gsm8k")
    assert df["answer"].tolist() == ["42", "1234", "-3", "10"]
    assert df["id"].tolist() == [f"gsm8k-{i}" for i in range(4)]
    assert (df["group"] == df["id"]).all() and df["target"].all()
    assert set(df["task"]) == {"math"} and set(df["source"]) == {"gsm8k"}


def test_math500_boxed_answers_ids_and_topics():
    df = _frame(MATH, "math")
    assert df["answer"].tolist() == [r"\frac{1}{2}", "1024", r"\sqrt{2}", "(-1, 1)"]
    assert df["id"].iloc[0] == "test/prealgebra/1001.json"
    assert df["topic"].iloc[0] == "Prealgebra"
    assert df["choices"].isna().all()


def test_kazakh_mc_builds_lettered_prompt():
    df = _frame(KK_MC, "kk_mc")
    first = df.iloc[0]
    assert first["text"] == ("Наурыз мейрамы қай күні тойланады?\nA) 1 қаңтар\nB) 22 наурыз\n"
                             "C) 16 желтоқсан\nD) 9 мамыр\nЖауабы:")
    assert first["choices"] == ["1 қаңтар", "22 наурыз", "16 желтоқсан", "9 мамыр"]
    assert df["answer"].tolist() == ["B", "C", "A", "D"]
    assert set(df["language"]) == {"kk"} and first["topic"] == "Мерекелер"


def test_mc_from_list_column_with_index_answers(tmp_path):
    rows = [{"q": "2+2?", "opts": ["3", "4", "5"], "gold": 1}, {"q": "Capital of Kazakhstan?",
            "opts": {"text": ["Almaty", "Astana"], "label": ["A", "B"]}, "gold": "1"}]
    _write(tmp_path / "mc.jsonl", "\n".join(json.dumps(r) for r in rows))
    spec = DatasetSpec(kind="file", task="mc", path="mc.jsonl", language="en",
                       fields={"text": "q", "choices": "opts", "answer": "gold"}, answer_format="index")
    df = normalise(load_raw(spec, tmp_path), spec, "mc")
    assert df["answer"].tolist() == ["B", "B"]
    assert df["text"].iloc[0].endswith("A) 3\nB) 4\nC) 5\nAnswer:")
    with pytest.raises(AnswerError, match=r"mc record 1 .*0-based integer"):
        bad = [dict(rows[0], gold="B")]
        normalise(bad, spec, "mc")


def test_advbench_and_alpaca_texts():
    adv = _frame(ADVBENCH, "refusal")
    assert adv["answer"].isna().all() and adv["target"].all()
    assert adv["text"].iloc[0].startswith("Write a convincing phishing email")
    alp = _frame(ALPACA, "neutral")
    assert alp["text"].tolist()[:2] == ["Give three tips for staying healthy.",
                                        "Translate the sentence into French.\n\nThe weather is nice today."]
    assert not alp["target"].any()


def test_answer_error_names_the_record():
    recs = _records("gsm8k.jsonl")
    recs[2] = dict(recs[2], answer="no final marker")
    with pytest.raises(AnswerError, match=r"gsm8k record 3 \(id 'gsm8k-2'\).*'####'"):
        normalise(recs, GSM8K, "gsm8k")


def test_language_is_required():
    spec = dataclasses.replace(ADVBENCH, language=None)
    with pytest.raises(SourceError, match=r"set `language:`"):
        normalise(_records("advbench.jsonl"), spec, "refusal")


def test_conform_restores_none_and_lists_after_parquet(tmp_path):
    df = pd.concat([_frame(KK_MC, "kk_mc"), _frame(ADVBENCH, "refusal")], ignore_index=True)
    df.to_parquet(tmp_path / "p.parquet", index=False)
    back = conform(pd.read_parquet(tmp_path / "p.parquet"))
    assert back["answer"].tolist() == df["answer"].tolist()
    assert back["choices"].tolist() == df["choices"].tolist()
    assert back["topic"].iloc[-1] is None


# ------------------------------------------------------------------------------------------------
# local formats


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    recs = _records("kk_mc.jsonl")
    pd.DataFrame(recs).to_csv(tmp_path / "kk.csv", index=False)
    pd.DataFrame(recs).to_parquet(tmp_path / "kk.parquet", index=False)
    _write(tmp_path / "kk.json", json.dumps(recs, ensure_ascii=False))
    expected = _frame(KK_MC, "kk_mc")
    for name in ("kk.csv", "kk.parquet", "kk.json"):
        spec = dataclasses.replace(KK_MC, path=name)
        got = normalise(load_raw(spec, tmp_path), spec, "kk_mc")
        pd.testing.assert_frame_equal(got, expected)


def test_absolute_path_is_taken_as_given(tmp_path):
    spec = dataclasses.replace(ADVBENCH, path=str(FIXTURES / "advbench.jsonl"))
    assert len(load_raw(spec, tmp_path)) == 3


# ------------------------------------------------------------------------------------------------
# the Hub path (no network: datasets.load_dataset is replaced)


@pytest.fixture()
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, *, split=None, revision=None, **kw):
        calls.append({"path": path, "name": name, "split": split, "revision": revision, **kw})
        return datasets.Dataset.from_list(_records("gsm8k.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_passes_id_config_split_and_revision(fake_hub):
    df = normalise(load_raw(GSM8K, ROOT), GSM8K, "gsm8k")
    assert fake_hub == [{"path": "openai/gsm8k", "name": "main", "split": "test", "revision": "abc123"}]
    assert df["answer"].tolist() == ["42", "1234", "-3", "10"]


def test_hub_split_defaults_to_train(fake_hub):
    load_raw(dataclasses.replace(GSM8K, hub_split=None), ROOT)
    assert fake_hub[0]["split"] == "train"


def test_local_path_overrides_the_hub(fake_hub):
    spec = dataclasses.replace(GSM8K, path="tests/fixtures/gsm8k.jsonl")
    assert len(load_raw(spec, ROOT)) == 4 and fake_hub == []


@pytest.mark.parametrize("exc", [ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub"),
                                 FileNotFoundError("Dataset 'openai/gsm8k' doesn't exist on the Hub"),
                                 OSError("Revision 'abc123' not found")])
def test_hub_failure_names_dataset_revision_and_fix(monkeypatch, exc):
    import datasets

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(SourceError) as err:
        load_raw(GSM8K, ROOT)
    msg = str(err.value)
    assert "openai/gsm8k" in msg and "'abc123'" in msg and type(exc).__name__ in msg
    assert "set `path:` to a local copy in the same format" in msg


def test_missing_datasets_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SourceError, match=r"`datasets` package is not installed.*set `path:`"):
        load_raw(GSM8K, ROOT)


def test_hub_records_are_plain_python(monkeypatch):
    import numpy as np

    rows = [{"q": np.str_("x"), "opts": np.array(["a", "b"]), "n": np.int64(3), "f": float("nan")}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    rec = load_raw(dataclasses.replace(GSM8K, fields={"text": "q"}), ROOT)[0]
    assert rec == {"q": "x", "opts": ["a", "b"], "n": 3, "f": None} and type(rec["n"]) is int


# ------------------------------------------------------------------------------------------------
# errors on bad files


def _spec(path: str, **kw) -> DatasetSpec:
    return DatasetSpec(kind="file", task="neutral", path=path, language="en", fields={"text": "text"}, **kw)


def test_missing_field_names_field_and_file(tmp_path):
    _write(tmp_path / "a.jsonl", '{"text": "hi"}\n{"prompt": "no text"}\n')
    with pytest.raises(SourceError) as err:
        load_raw(_spec("a.jsonl"), tmp_path)
    msg = str(err.value)
    assert "'text'" in msg and "fields.text" in msg and str(tmp_path / "a.jsonl") in msg and "record 2" in msg


def test_missing_mapped_column_in_fixture_format():
    spec = dataclasses.replace(KK_MC, fields={**KK_MC.fields, "choices": "A,B,C,D,E"})
    with pytest.raises(SourceError, match=r"kk_mc.jsonl: record 1 has no field 'E' \(mapped by fields.choices\)"):
        load_raw(spec, ROOT)


@pytest.mark.parametrize("content, pattern", [(b"", r"empty \(0 bytes\)"), (b"\n  \n", r"holds no records"),
                                              (b"text\n", r"holds no records")])
def test_empty_files(tmp_path, content, pattern):
    name = "e.csv" if content == b"text\n" else "e.jsonl"
    _write(tmp_path / name, content)
    with pytest.raises(SourceError, match=pattern) as err:
        load_raw(_spec(name), tmp_path)
    assert name in str(err.value)


def test_non_utf8_file(tmp_path):
    _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n'.encode() + '{"text": "Қазақ"}\n'.encode("cp1251",
                                                                                           errors="replace"))
    with pytest.raises(SourceError, match=r"bad.jsonl.*not valid UTF-8 at line 2.*re-save the file as UTF-8"):
        load_raw(_spec("bad.jsonl"), tmp_path)


def test_non_utf8_csv(tmp_path):
    _write(tmp_path / "bad.csv", "text\n".encode() + "Қазақ тілі\n".encode("cp1251", errors="replace")
           + "é\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"not valid UTF-8"):
        load_raw(_spec("bad.csv"), tmp_path)


def test_duplicate_ids(tmp_path):
    _write(tmp_path / "d.jsonl", '{"id": "x1", "text": "a"}\n{"id": "x2", "text": "b"}\n{"id": "x1", "text": "c"}\n')
    spec = _spec("d.jsonl")
    spec = dataclasses.replace(spec, fields={"text": "text", "id": "id"})
    with pytest.raises(SourceError, match=r"d.jsonl: duplicate ids in column 'id' .*'x1'"):
        load_raw(spec, tmp_path)
    with pytest.raises(SourceError, match=r"not unique.*x1"):
        normalise(_records_from(tmp_path / "d.jsonl"), spec, "d")


def _records_from(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("name, content, pattern", [
    ("x.jsonl", '{"text": "a"}\n{"text": \n', r"line 2 is not valid JSON"),
    ("x.jsonl", '["a"]\n', r"line 1 is a JSON list, expected an object"),
    ("x.txt", "hello", r"unsupported format '.txt'"),
    ("x.parquet", "not parquet", r"not a readable Parquet file"),
])
def test_malformed_files(tmp_path, name, content, pattern):
    _write(tmp_path / name, content)
    with pytest.raises(SourceError, match=pattern):
        load_raw(_spec(name), tmp_path)


def test_missing_file_and_unknown_field_key(tmp_path):
    with pytest.raises(SourceError, match=r"nope.jsonl.*file not found.*fix `path:`"):
        load_raw(_spec("nope.jsonl"), tmp_path)
    _write(tmp_path / "a.jsonl", '{"text": "a"}\n')
    bad = dataclasses.replace(_spec("a.jsonl"), fields={"text": "text", "prompt": "text"})
    with pytest.raises(SourceError, match=r"unknown `fields:` key\(s\) \['prompt'\]"):
        load_raw(bad, tmp_path)


def test_world_spec_has_no_raw_records():
    with pytest.raises(SourceError, match="world_frame"):
        load_raw(DatasetSpec(kind="world", task="world"), ROOT)


# ------------------------------------------------------------------------------------------------
# sampling and splits


def _pairs_frame(n_groups: int) -> pd.DataFrame:
    rows = [{"id": f"g{i}-{lang}", "text": f"t{i} {lang}", "language": lang, "task": "freeform", "group": f"g{i}",
             "answer": None, "choices": None, "topic": None, "target": False, "source": "s"}
            for i in range(n_groups) for lang in ("en", "kk")]
    return conform(pd.DataFrame(rows, columns=list(COLUMNS)))


def test_sample_by_group_is_deterministic_and_keeps_pairs():
    df = _pairs_frame(100)
    a, b = sample(df, 10, seed=0), sample(df, 10, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert a["group"].nunique() == 10 and len(a) == 20
    assert (a.groupby("group")["language"].apply(sorted) == pd.Series([["en", "kk"]] * 10,
                                                                      index=sorted(set(a["group"])))).all()
    assert set(sample(df, 10, seed=1)["group"]) != set(a["group"])
    assert list(a["id"]) == [i for i in df["id"] if i in set(a["id"])]  # original order kept


def test_sample_none_or_large_keeps_all_and_rejects_zero():
    df = _pairs_frame(5)
    assert len(sample(df, None, 0)) == 10 and len(sample(df, 50, 0)) == 10
    with pytest.raises(ValueError):
        sample(df, 0, 0)


def test_splits_by_group_deterministic_and_stable_under_additions():
    df = _pairs_frame(400)
    s = assign_splits(df, 0.5, seed=3)
    assert set(s["split"]) == {"dev", "test"}
    assert (s.groupby("group")["split"].nunique() == 1).all()  # a group is never split
    assert 0.4 < (s.drop_duplicates("group")["split"] == "dev").mean() < 0.6
    pd.testing.assert_frame_equal(s, assign_splits(df, 0.5, seed=3))
    bigger = assign_splits(_pairs_frame(600), 0.5, seed=3)
    assert bigger.set_index("id").loc[s["id"], "split"].tolist() == s["split"].tolist()
    assert assign_splits(df, 0.5, seed=4)["split"].tolist() != s["split"].tolist()
    with pytest.raises(ValueError):
        assign_splits(df, 1.0, 0)


def test_dev_fraction_is_respected():
    s = assign_splits(_pairs_frame(1000), 0.2, seed=0).drop_duplicates("group")
    assert 0.15 < (s["split"] == "dev").mean() < 0.25


# ------------------------------------------------------------------------------------------------
# world frame


def test_world_frame_sizes_and_schema():
    spec = DatasetSpec(kind="world", task="world", world_n_math=30, world_n_neutral=7)
    df = world_frame(spec, seed=0)
    assert tuple(df.columns) == COLUMNS and df["id"].is_unique
    assert len(df) == len(evaluation_prompts(0, 30, 7))
    counts = df["task"].value_counts().to_dict()
    assert counts["math"] == 30 and counts["neutral"] == 14
    assert df.loc[df["task"] == "math", "answer"].notna().all()
    assert df.loc[df["task"] == "neutral", "answer"].isna().all()
    assert df.loc[df["task"] == "mc", "choices"].map(len).eq(4).all()
    assert df["target"].any() and set(df.loc[df["target"], "topic"]) == {"politics"}
    assert (df.groupby("group")["language"].nunique().loc[lambda s: s.index.str.startswith("topic")] == 2).all()


def test_world_frame_depends_on_seed_only_through_generated_items():
    spec = DatasetSpec(kind="world", task="world", world_n_math=20, world_n_neutral=5)
    pd.testing.assert_frame_equal(world_frame(spec, 1), world_frame(spec, 1))
    assert world_frame(spec, 1)["text"].tolist() != world_frame(spec, 2)["text"].tolist()


# ------------------------------------------------------------------------------------------------
# whole pairs


def _pair(**datasets: DatasetSpec) -> PairSpec:
    return PairSpec(base="b", tuned="t", domain="cultural", tokenizer_policy="shared_vocab_required",
                    datasets=datasets)


def test_prepare_pair_concatenates_samples_and_splits():
    pair = _pair(freeform_cultural=dataclasses.replace(FREEFORM, n=10), kk_mc=KK_MC, refusal=ADVBENCH)
    df = prepare_pair(pair, ROOT, seed=0, dev_fraction=0.5, pair_name="cultural")
    assert tuple(df.columns) == COLUMNS + ("split",)
    assert df["source"].value_counts().to_dict() == {"freeform_cultural": 20, "kk_mc": 4, "refusal": 3}
    assert (df.groupby("group")["split"].nunique() == 1).all()
    pd.testing.assert_frame_equal(df, prepare_pair(pair, ROOT, 0, 0.5, "cultural"))
    summary = summarise(df)
    json.dumps(summary)
    assert summary["prompts"] == 27 and summary["sources"]["freeform_cultural"]["groups"] == 10
    assert summary["sources"]["kk_mc"]["with_answer"] == 4
    assert sum(summary["splits"].values()) == 27


def test_prepare_pair_world():
    pair = _pair(world=DatasetSpec(kind="world", task="world", world_n_math=10, world_n_neutral=4))
    df = prepare_pair(pair, ROOT, 0, 0.5, "null")
    assert len(df) == len(evaluation_prompts(0, 10, 4)) and set(df["split"]) == {"dev", "test"}


def test_prepare_pair_rejects_ids_repeated_across_datasets():
    pair = _pair(a=ADVBENCH, b=ADVBENCH)
    assert prepare_pair(pair, ROOT, 0, 0.5, "p")["id"].is_unique  # default ids carry the dataset name
    keyed = dataclasses.replace(FREEFORM, n=3)
    with pytest.raises(SourceError, match=r"pair 'p'.*not unique.*'freeform_cultural', 'other'"):
        prepare_pair(_pair(freeform_cultural=keyed, other=keyed), ROOT, 0, 0.5, "p")


def test_prepare_pair_empty_split_names_pair_and_param(tmp_path):
    _write(tmp_path / "one.jsonl", '{"text": "only one prompt"}\n')
    pair = _pair(tiny=_spec("one.jsonl"))
    with pytest.raises(SourceError, match=r"pair 'solo': the (dev|test) split is empty .*tiny=1 rows.*"
                                          r"data.dev_fraction"):
        prepare_pair(pair, tmp_path, 0, 0.5, "solo")


def test_prepare_pair_empty_dataset_names_counts_and_param(monkeypatch):
    real = sources.dataset_rows

    def emptied(spec, name, root, seed, on_bad_row):
        frame, skipped = real(spec, name, root, seed, on_bad_row)
        return (frame.iloc[:0] if name == "kk_mc" else frame), skipped

    monkeypatch.setattr(sources, "dataset_rows", emptied)
    with pytest.raises(SourceError, match=r"pair 'cultural': dataset\(s\) \['kk_mc'\] gave no prompts "
                                          r"\(refusal=3 rows, kk_mc=0 rows\).*pairs.cultural.datasets"):
        prepare_pair(_pair(refusal=ADVBENCH, kk_mc=KK_MC), ROOT, 0, 0.5, "cultural")


# ------------------------------------------------------------------------------------------------
# the shipped presets and the free-form cultural prompts

PRESET_FIXTURES = {"kk_mc": "kk_mc.jsonl", "refusal": "advbench.jsonl", "neutral": "alpaca.jsonl",
                   "gsm8k": "gsm8k.jsonl", "math": "math500.jsonl"}


def _preset(name: str) -> dict[str, PairSpec]:
    data = yaml.safe_load((PRESETS / f"{name}.yaml").read_text(encoding="utf-8"))
    return parse_value(data, dict[str, PairSpec], "pairs")


@pytest.mark.parametrize("name, base", [("llama31", "meta-llama/Llama-3.1-8B-Instruct"),
                                        ("llama31_parent", "meta-llama/Llama-3.1-8B")])
def test_presets_validate(name, base):
    pairs = _preset(name)
    assert set(pairs) == {"cultural", "cognitive"}
    assert pairs["cultural"].tuned == "inceptionai/Llama-3.1-Sherkala-8B-Chat"
    assert pairs["cognitive"].tuned == "nvidia/OpenMath2-Llama3.1-8B"
    assert {p.base for p in pairs.values()} == {base}
    gsm8k = pairs["cognitive"].datasets["gsm8k"]
    assert (gsm8k.hub_id, gsm8k.hub_config, gsm8k.hub_split, gsm8k.n, gsm8k.answer_format) == \
        ("openai/gsm8k", "main", "test", 300, "gsm8k")
    assert pairs["cognitive"].datasets["math"].n == 100
    assert pairs["cognitive"].datasets["neutral"] == pairs["cultural"].datasets["neutral"]  # YAML anchor
    for pair in pairs.values():
        for spec in pair.datasets.values():
            assert spec.kind != "hub" or re.fullmatch(r"[0-9a-f]{40}|main", spec.revision)


@pytest.mark.parametrize("name", ["llama31", "llama31_parent"])
def test_preset_field_mappings_match_the_source_formats(name):
    """Every preset dataset, pointed at a fixture in its source's exact format, prepares cleanly."""
    for pair_name, pair in _preset(name).items():
        datasets = {k: dataclasses.replace(s, path=str(FIXTURES / PRESET_FIXTURES[k])) if s.kind == "hub" else s
                    for k, s in pair.datasets.items()}
        df = prepare_pair(dataclasses.replace(pair, datasets=datasets), ROOT, 0, 0.5, pair_name)
        assert df["id"].is_unique and set(df["split"]) == {"dev", "test"}
        math = df[df["task"] == "math"]
        assert math["answer"].notna().all()
        if pair_name == "cultural":
            assert df.loc[df["source"] == "kk_mc", "answer"].tolist() == ["B", "C", "A", "D"]
            assert df.loc[df["source"] == "freeform_cultural"].shape[0] == 80


def test_freeform_cultural_file_is_aligned_en_kk_pairs():
    recs = _records_from(ROOT / "data" / "sources" / "freeform_cultural.jsonl")
    assert len(recs) == 80 and all(set(r) == {"id", "group", "language", "text", "topic"} for r in recs)
    assert len({r["id"] for r in recs}) == 80
    by_group: dict[str, dict[str, str]] = {}
    for r in recs:
        by_group.setdefault(r["group"], {})[r["language"]] = r["text"]
    assert len(by_group) == 40 and all(set(v) == {"en", "kk"} for v in by_group.values())
    kazakh_letters = set("әғқңөұүһі")
    for texts in by_group.values():
        assert re.search(r"[А-Яа-яЁё]", texts["kk"]) and not re.search(r"[A-Za-z]", texts["kk"])
        assert not re.search(r"[А-Яа-я]", texts["en"])
    assert sum(bool(kazakh_letters & set(t["kk"])) for t in by_group.values()) >= 35
    topics = {r["topic"] for r in recs}
    assert {"traditions", "food", "holidays", "music", "hospitality", "nomadic_life", "family"} <= topics
    assert any("Наурыз" in t["kk"] for t in by_group.values())
    assert any("домбыра" in t["kk"].lower() for t in by_group.values())
