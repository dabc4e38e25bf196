"""Presets: the real Llama-3.1 pairs are one command away, and switching back restores the default."""

from __future__ import annotations

import pytest

from mechdiff.params.config import ParamsError, load_params
from mechdiff.params.preset import apply_preset, available, main


def test_organisms_preset_round_trips_params_exactly(params_text):
    assert apply_preset(params_text, "organisms") == params_text


@pytest.mark.parametrize("name", ["llama31", "llama31_parent"])
def test_real_presets_validate_and_keep_other_sections(params_text, name):
    assert name in available()
    new = apply_preset(params_text, name)
    p, default = load_params(new), load_params(params_text)
    assert p.steer == default.steer and p.clt == default.clt
    tuned = {pair.tuned for pair in p.pairs.values()}
    assert {"inceptionai/Llama-3.1-Sherkala-8B-Chat", "nvidia/OpenMath2-Llama3.1-8B"} <= tuned
    expected_base = "meta-llama/Llama-3.1-8B" if name == "llama31_parent" else "meta-llama/Llama-3.1-8B-Instruct"
    assert {pair.base for pair in p.pairs.values()} == {expected_base}
    assert apply_preset(new, "organisms") == params_text


def test_unknown_preset_is_named(params_text):
    with pytest.raises(ParamsError, match=r"unknown preset 'llama4'; available presets: .*llama31"):
        apply_preset(params_text, "llama4")


def test_cli_switches_the_file(tmp_path, params_text):
    f = tmp_path / "params.yaml"
    f.write_text(params_text)
    assert main(["llama31", "--params", str(f)]) == 0
    assert "Sherkala" in f.read_text()
    assert main(["nope", "--params", str(f)]) == 2


def test_smol_preset_sets_its_model_source_and_every_other_preset_clears_it(params_text):
    new = apply_preset(params_text, "smol")
    p = load_params(new)
    assert p.planted.source == "smollm2" and list(p.pairs) == ["smol"]
    assert (p.pairs["smol"].base, p.pairs["smol"].tuned) == ("artifacts/models/planted/base",
                                                             "artifacts/models/planted/tuned")
    assert p.steer.ks == [1, 2, 4] and p.fairness.modes == ["strict"]  # CPU-sized sweeps for a 135M model
    assert apply_preset(new, "organisms") == params_text  # back to the default, byte for byte
    assert load_params(apply_preset(new, "llama31")).planted.source is None
