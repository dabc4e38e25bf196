"""Bad input at the stage boundary: one line naming the problem and the fix, exit 2, no traceback,
and no output file left behind."""

from __future__ import annotations

import pytest
import yaml

from tests.small_project import stage


def _params(tmp_path, params_text, edit) -> str:
    data = yaml.safe_load(params_text)
    data["data"]["allow_external_paths"] = True  # the data files of these tests live in tmp_path
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


# ------------------------------------------------------------------------------------------------
# The bad-params matrix: each case stops the stage with one line naming the key (or file) and the fix,
# exit status 2, and the outputs of the last good run stay byte-identical.

def _text_edit(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return edit


def _yaml_edit(fn):
    def edit(text: str) -> str:
        data = yaml.safe_load(text)
        fn(data)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return edit


BAD_PARAMS = {
    # the cases
    "alpha_inf": (_text_edit("alphas: [0.5, 1.0, 2.0, 3.0]", "alphas: [1.0, .inf]"), "'steer.alphas[1]'"),
    "seed_negative": (_text_edit("\nseed: 0", "\nseed: -1"), "'seed': expected a seed"),
    "seed_huge": (_text_edit("\nseed: 0", "\nseed: 99999999999999999999999"), "'seed': expected a seed"),
    "batch_size_zero": (_yaml_edit(lambda d: d["organisms"].update(batch_size=0)), "'organisms.batch_size'"),
    "device_typo": (_yaml_edit(lambda d: d["acts"].update(device="cudafoo")), "'acts.device'"),
    "duplicate_key": (_text_edit("\nseed: 0", "\nseed: 0\nseed: 1"), "duplicate key 'seed'"),
    "null_pair_name": (_text_edit('  "null":', "  null:"), 'quote it: "null":'),
    "bool_pair_name": (_text_edit('  "null":', "  yes:"), "quote it"),
    "yaml_syntax": (_text_edit("\ndata:\n", "\ndata\n"), "not valid YAML at line"),
    # and more
    "dev_fraction_out_of_range": (_yaml_edit(lambda d: d["data"].update(dev_fraction=1.5)), "'data.dev_fraction'"),
    "misspelt_section": (_yaml_edit(lambda d: d.update(steers=d["steer"])), "'steers': unknown key"),
    "on_bad_row_unknown": (_yaml_edit(lambda d: d["data"].update(on_bad_row="ignore")), "'data.on_bad_row'"),
    "text_for_number": (_yaml_edit(lambda d: d["cka"].update(n_permutations="100")), "'cka.n_permutations'"),
    "nan_threshold": (_text_edit("max_ppl_increase: 0.05", "max_ppl_increase: .nan"), "'steer.max_ppl_increase'"),
    "negative_count": (_yaml_edit(lambda d: d["cka"].update(n_bootstrap=-5)), "'cka.n_bootstrap'"),
    "bool_for_int": (_yaml_edit(lambda d: d["behaviour"].update(batch_size=True)), "'behaviour.batch_size'"),
    "zero_threads": (_yaml_edit(lambda d: d["organisms"].update(threads=0)), "'organisms.threads'"),
    "empty_pairs": (_yaml_edit(lambda d: d.update(pairs={})), "'pairs'"),
    "pair_name_with_dash": (_yaml_edit(lambda d: d["pairs"].update({"my-pair": d["pairs"]["null"]})), "my-pair"),
    "external_path_flag_not_bool": (_yaml_edit(lambda d: d["data"].update(allow_external_paths="yes please")),
                                    "'data.allow_external_paths'"),
    "unknown_domain": (_yaml_edit(lambda d: d["pairs"]["cultural"].update(domain="culture")), "domain"),
}


@pytest.fixture()
def good_run(tmp_path, params_text):
    params = tmp_path / "params.yaml"
    params.write_text(params_text, encoding="utf-8")
    assert _prepare(tmp_path, str(params)).returncode == 0
    outputs = {f: f.read_bytes() for f in (tmp_path / "out.parquet", tmp_path / "out.json")}
    return params, outputs


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_matrix(case, tmp_path, params_text, good_run):
    params, outputs = good_run
    edit, fragment = BAD_PARAMS[case]
    params.write_text(edit(params_text), encoding="utf-8")
    p = _prepare(tmp_path, str(params))
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert fragment in p.stderr and "Traceback" not in p.stderr
    assert {f: f.read_bytes() for f in outputs} == outputs


def test_params_saved_as_latin1_is_one_line(tmp_path, params_text, good_run):
    params, outputs = good_run
    params.write_bytes(params_text.replace("# mechdiff parameters", "# paramètres", 1).encode("latin-1"))
    p = _prepare(tmp_path, str(params))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not UTF-8 text (byte 0xe8 on line 1)" in p.stderr
    assert {f: f.read_bytes() for f in outputs} == outputs


def test_a_stage_with_a_misspelt_pair_writes_nothing(tmp_path, params_text, good_run):
    params, _ = good_run
    p = stage("cka", "--pair", "cultral", "--acts", str(tmp_path / "acts"), "--table", str(tmp_path / "c.csv"),
              "--metrics", str(tmp_path / "c.json"), "--fig", str(tmp_path / "c.png"),
              "--change-rank", str(tmp_path / "r.csv"), "--params", str(params), check=False)
    assert p.returncode == 2 and "pair 'cultral' is not in" in p.stderr
    assert not any((tmp_path / f).exists() for f in ("c.csv", "c.json", "c.png", "r.csv"))


def test_cuda_asked_for_on_a_machine_without_it_is_one_line():
    from mechdiff.models.load import ModelLoadError, pair_devices

    with pytest.raises(ModelLoadError, match=r"'acts\.device' is 'cuda' but this machine has no CUDA device"):
        pair_devices("cuda", 0)
    with pytest.raises(ModelLoadError, match="has 2 CUDA devices"):
        pair_devices("cuda:2", 2)
    assert pair_devices("cuda:1", 2) == ("cuda:1", "cuda:1")


def test_a_home_relative_model_path_is_expanded(params_text):
    from pathlib import Path

    from mechdiff.params.config import load_params

    params = load_params(params_text.replace("tuned: artifacts/models/cultural", "tuned: ~/models/x", 1))
    assert params.pairs["cultural"].tuned == str(Path.home() / "models" / "x")


# ------------------------------------------------------------------------------------------------
# incompatible pairs stop at filter_shared (before collect_acts), naming both models; pickle weights


@pytest.mark.parametrize("change, fragment", [({"hidden_size": 64, "intermediate_size": 128}, "hidden_size: 32 vs 64"),
                                              ({"num_hidden_layers": 8}, "num_hidden_layers: 4 vs 8")])
def test_an_incompatible_pair_stops_at_filter_shared_naming_both_models(tmp_path, change, fragment):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.small_project import build

    params = build(tmp_path)
    tuned_dir = tmp_path / "models" / "tuned"
    cfg = LlamaConfig.from_pretrained(tuned_dir)
    for k, v in change.items():
        setattr(cfg, k, v)
    LlamaForCausalLM(cfg).save_pretrained(tuned_dir)
    p = stage("filter_shared", "--pair", "small", "--prepared", str(tmp_path / "data" / "prepared.parquet"),
              "--out", str(tmp_path / "filtered"), "--report", str(tmp_path / "fairness.json"),
              "--params", str(params), check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert fragment in p.stderr and str(tmp_path / "models" / "base") in p.stderr and str(tuned_dir) in p.stderr
    assert not (tmp_path / "filtered").exists() and not (tmp_path / "fairness.json").exists()


def test_pickle_only_weights_are_refused_unless_params_allow_them(tmp_path):
    import torch

    from mechdiff.models.load import ModelLoadError, load_model
    from tests.tiny import tiny_llama

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only as pytorch_model\.bin .* fairness\.allow_pickle_weights: true"):
        load_model(str(tmp_path))
    loaded = load_model(str(tmp_path), allow_pickle=True)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
