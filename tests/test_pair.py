"""`python -m mechdiff.params.pair`: add and remove a pair without touching the rest of params.yaml."""

from __future__ import annotations

import pytest
import yaml

from mechdiff.params.config import ParamsError, load_params
from mechdiff.params.pair import add_pair, main, remove_pair
from tests.small_project import ROOT

TEXT = (ROOT / "params.yaml").read_text(encoding="utf-8")


def test_add_then_remove_gives_back_the_same_file_comments_included():
    added = add_pair(TEXT, "mine", "/models/base", "/models/tuned", like="cognitive")
    pair = load_params(added).pairs["mine"]
    assert (pair.base, pair.tuned, pair.domain) == ("/models/base", "/models/tuned", "cognitive")
    assert added.startswith(TEXT.split("\nseed:")[0])  # the header and its comments are untouched
    assert remove_pair(added, "mine") == TEXT


def test_the_organisms_are_built_only_while_a_pair_uses_them():
    text = add_pair(TEXT, "mine", "/models/base", "/models/tuned")
    assert load_params(text).organisms.build is True
    for name in ("cultural", "cognitive", "null"):
        text = remove_pair(text, name)
    params = load_params(text)
    assert list(params.pairs) == ["mine"] and params.organisms.build is False
    assert "# torch intra-op threads" in text  # the organisms section keeps its comments


def test_mistakes_are_one_clear_error():
    with pytest.raises(ParamsError, match="already in params.yaml"):
        add_pair(TEXT, "cultural", "a", "b")
    with pytest.raises(ParamsError, match="--like 'nope' is not a pair"):
        add_pair(TEXT, "mine", "a", "b", like="nope")
    with pytest.raises(ParamsError, match="'nope' is not in params.yaml"):
        remove_pair(TEXT, "nope")
    with pytest.raises(ParamsError, match=r"pairs\.my-pair"):
        add_pair(TEXT, "my-pair", "a", "b")


def test_the_command_writes_runs_the_preflight_and_names_the_next_step(tmp_path, capsys):
    from tests.small_project import build

    params = tmp_path / "params.yaml"
    params.write_text(TEXT, encoding="utf-8")
    build(tmp_path / "proj")  # two small saved models: base and a copy with a planted edit
    models = tmp_path / "proj" / "models"
    assert main(["--params", str(params), "add", "mine", "--base", str(models / "base"),
                 "--tuned", str(models / "tuned")]) == 0
    out = capsys.readouterr().out
    assert "[ok] mine: architecture" in out and "dvc repro --glob '*@mine'" in out
    assert yaml.safe_load(params.read_text())["pairs"]["mine"]["tuned"] == str(models / "tuned")
    assert main(["--params", str(params), "add", "mine", "--base", "x", "--tuned", "y"]) == 2
    assert main(["--params", str(params), "remove", "mine"]) == 0
    assert params.read_text(encoding="utf-8") == TEXT
