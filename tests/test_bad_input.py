"""Bad input at the stage boundary: one line naming the problem and the fix, exit 2, no traceback,
and no output file left behind."""

from __future__ import annotations

import yaml

from tests.small_project import stage


def _params(tmp_path, params_text, edit) -> str:
    data = yaml.safe_load(params_text)
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _prepare(tmp_path, params, pair="cultural"):
    return stage("prepare_data", "--pair", pair, "--out", str(tmp_path / "out.parquet"),
                 "--summary", str(tmp_path / "out.json"), "--params", params, check=False)


def _assert_clean_failure(p, tmp_path, *fragments):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ")
    for f in fragments:
        assert f in p.stderr, p.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_misspelt_params_key(tmp_path, params_text):
    params = _params(tmp_path, params_text, lambda d: d["data"].update(dev_fraciton=0.3))
    _assert_clean_failure(_prepare(tmp_path, params), tmp_path, "params.yaml",
                          "params key 'data.dev_fraciton': unknown key (did you mean 'data.dev_fraction'?)")


def test_data_file_missing_a_field_names_field_and_file(tmp_path, params_text):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"id": "a", "lang": "en", "prompt": "hello"}\n', encoding="utf-8")
    spec = {"kind": "file", "task": "freeform", "path": str(src), "fields": {"text": "text", "language": "lang"}}
    params = _params(tmp_path, params_text, lambda d: d["pairs"]["cultural"].update(datasets={"mine": spec}))
    _assert_clean_failure(_prepare(tmp_path, params), tmp_path, "text", str(src))


def test_empty_and_non_utf8_data_files(tmp_path, params_text):
    src = tmp_path / "prompts.jsonl"
    spec = {"kind": "file", "task": "freeform", "path": str(src), "language": "en", "fields": {"text": "text"}}
    params = _params(tmp_path, params_text, lambda d: d["pairs"]["cultural"].update(datasets={"mine": spec}))
    src.write_bytes(b"")
    _assert_clean_failure(_prepare(tmp_path, params), tmp_path, str(src), "empty")
    src.write_bytes(b'{"text": "caf\xe9"}\n')
    _assert_clean_failure(_prepare(tmp_path, params), tmp_path, str(src), "UTF-8")


def test_unknown_pair(tmp_path, params_text):
    params = _params(tmp_path, params_text, lambda d: None)
    _assert_clean_failure(_prepare(tmp_path, params, pair="cultral"), tmp_path,
                          "pair 'cultral' is not in", "pairs: ['cognitive', 'cultural', 'null']")
