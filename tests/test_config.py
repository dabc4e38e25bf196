"""params.yaml schema: defaults of the seed, and one clear message per kind of mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mechdiff.params.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _with(params_text: str, edit) -> dict:
    data = yaml.safe_load(params_text)
    edit(data)
    return data


def test_default_params_hold_the_seed_defaults(params_text):
    p = load_params(params_text)
    assert set(p.pairs) == {"cultural", "cognitive", "null"}
    assert p.pairs["null"].base == p.pairs["null"].tuned
    assert p.layers.scan_stride == 1 and p.layers.fallback == [22, 26]
    assert p.clt.lambdas[0] == 1e-6 and p.clt.lambdas[-1] == 1e-1 and p.clt.heldout_fraction == 0.2
    assert 8000 <= p.clt.min_positions <= p.clt.n_positions <= 10000
    assert p.steer.ks == [1, 2, 3, 4, 6, 8] and p.steer.alphas == [0.5, 1.0, 2.0, 3.0]
    assert p.steer.max_neutral_drop_pp == 5.0 and p.steer.max_ppl_increase == 0.05
    assert (p.churn.z, p.churn.math_nats, p.churn.refusal_pp) == (2.0, 0.5, 5.0)
    assert p.success.map_r2_min == 0.3 and p.success.target_effect_min == 0.10
    assert p.fairness.mask_logits and p.fairness.post_embedding_only and not p.fairness.trust_remote_code
    assert p.data.on_bad_row == "skip"


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d["steer"].update(alphs=[1.0]), r"params key 'steer\.alphs': unknown key \(did you mean 'steer\.alphas'\?\)"),
    (lambda d: d.update(stere={}), r"params key 'stere': unknown key \(did you mean 'steer'\?\)"),
    (lambda d: d["clt"].update(lambdas=[1e-3, -1.0]), r"params key 'clt\.lambdas': expected positive ridge penalties"),
    (lambda d: d["clt"].update(lambdas=[]), r"params key 'clt\.lambdas': expected a non-empty list"),
    (lambda d: d["clt"].update(cv_folds="five"), r"params key 'clt\.cv_folds': expected an integer, got 'five'"),
    (lambda d: d["steer"].update(ks=[1, 2.5]), r"params key 'steer\.ks\[1\]': expected an integer, got 2\.5"),
    (lambda d: d["fairness"].update(mask_logits="yes"), r"params key 'fairness\.mask_logits': expected true/false"),
    (lambda d: d["pairs"]["cultural"].update(domain="culture"),
     r"params key 'pairs\.cultural\.domain': expected one of 'cultural', 'cognitive', 'null'"),
    (lambda d: d["pairs"]["cultural"].pop("tuned"), r"params key 'pairs\.cultural\.tuned': missing"),
    (lambda d: d["organisms"].update(policy_layers=[99]), r"params key 'organisms\.policy_layers': expected layer"),
    (lambda d: d["layers"].update(scan_stride=0), r"params key 'layers\.scan_stride': expected an integer >= 1"),
    (lambda d: d["data"].update(on_bad_row="ignore"),
     r"params key 'data\.on_bad_row': expected one of 'skip', 'error', got 'ignore'"),
    (lambda d: d["head_patch"].update(fdr=1.0), r"params key 'head_patch\.fdr': expected a false discovery rate in "
                                                r"\(0, 1\) .*got 1\.0"),
    (lambda d: d["head_patch"].update(fdr=0), r"params key 'head_patch\.fdr': expected a false discovery rate"),
    (lambda d: d["head_patch"].update(z=2.0), r"params key 'head_patch\.z': unknown key"),  # replaced by fdr
])
def test_bad_params_name_the_key(params_text, edit, pattern):
    with pytest.raises(ParamsError) as err:
        parse_params(_with(params_text, edit), "my/params.yaml")
    msg = str(err.value)
    assert msg.startswith("my/params.yaml: "), msg
    assert re.search(pattern, msg), msg
    assert "\n" not in msg


def test_hub_dataset_needs_a_pinned_revision(params_text):
    def edit(d):
        d["pairs"]["cognitive"]["datasets"] = {"gsm8k": {"kind": "hub", "task": "math", "hub_id": "openai/gsm8k",
                                                         "fields": {"text": "question"}}}
    with pytest.raises(ParamsError, match=r"pairs\.cognitive\.datasets\.gsm8k\.revision': expected a non-empty"):
        parse_params(_with(params_text, edit))


def test_yaml_syntax_error_names_file():
    with pytest.raises(ParamsError, match="x.yaml: not valid YAML"):
        load_params("seed: [1,\n", "x.yaml")


def test_organisms_build_false_refuses_a_pair_that_uses_them():
    from mechdiff.params.rules import uses_organism

    text = (ROOT / "params.yaml").read_text()
    off = text.replace("  build: true ", "  build: false", 1)
    assert off != text
    with pytest.raises(ParamsError, match=r"pairs\.cultural\.base.*organisms\.build: true"):
        load_params(off)
    assert uses_organism("artifacts/models/cognitive") and uses_organism("/x/artifacts/models/base/")
    assert not uses_organism("artifacts/models/planted/base") and not uses_organism("meta-llama/Llama-3.1-8B")


def test_real_model_presets_train_no_organism():
    from mechdiff.params.preset import apply_preset

    text = (ROOT / "params.yaml").read_text()
    for name in ("llama31", "llama31_parent", "smol"):
        assert load_params(apply_preset(text, name)).organisms.build is False, name
    assert load_params(apply_preset(text, "organisms")).organisms.build is True


def test_policy_heads_must_be_distinct_heads_of_the_organism():
    from mechdiff.params.config import OrganismParams, ParamsError
    from mechdiff.params.rules import validate

    ok = OrganismParams(n_heads=8, n_kv_heads=2, policy_modules=[], policy_heads=[2, 5])
    validate(ok, "organisms")
    for bad, msg in ((dict(policy_heads=[2, 8]), "policy_heads"), (dict(policy_heads=[2, 2]), "policy_heads"),
                     (dict(policy_heads=[]), "policy_modules"),
                     (dict(policy_modules=["self_attn.o_proj"]), "no q_proj / o_proj")):
        with pytest.raises(ParamsError, match=msg):
            validate(OrganismParams(**{**dict(n_heads=8, n_kv_heads=2, policy_modules=[], policy_heads=[2, 5]), **bad}),
                     "organisms")


def test_constraints_table_names_real_sections_and_fields():
    """params_rules.RULES is keyed by section class name: a typo there would silently drop a section's rules."""
    import dataclasses

    from mechdiff.params import config
    from mechdiff.params.rules import RULES, Items, Pattern, Range, Rule

    sections = {name: cls for name, cls in vars(config).items() if dataclasses.is_dataclass(cls)}
    assert set(RULES) <= set(sections)
    for name, constraints in RULES.items():
        fields = {f.name for f in dataclasses.fields(sections[name])}
        for c in constraints:
            if isinstance(c, Range):
                assert set((c.fields,) if isinstance(c.fields, str) else c.fields) <= fields, (name, c)
            if isinstance(c, (Items, Pattern)):
                assert c.field in fields, (name, c)
            if isinstance(c, Rule):
                assert c.got is None or c.got in fields, (name, c)
            if isinstance(c, (Range, Items)):
                assert {b for b in (c.gt, c.ge, c.lt, c.le) if isinstance(b, str)} <= fields, (name, c)
