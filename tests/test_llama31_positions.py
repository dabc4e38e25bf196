"""The llama31 preset gives the cross-model map of an 8B pair at least as many positions as dimensions.

Llama-3.1-8B's residual stream has 4,096 dimensions (its published config's ``hidden_size``); a ridge map
fitted on fewer rows is under-determined, and the linear bound read from it says nothing (issue: 3,217 rows
for 4,096 dimensions). Here the cognitive pair of the preset runs its own data path on published files:
the real GSM8K and MATH-500 test sets and the harmless instructions stand in for the Hub copies, the real
Llama-3 tokenizer with the 3.1 config tokenizes them for both models (OpenMath2 keeps the vocabulary), and
the positions ``collect_acts`` would capture (``fairness.n_sampled_positions`` per prompt plus the last)
are split as ``fit_clt`` splits them. Only tokenizers run: no weights are needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.real_pair import REAL

LLAMA31_8B_HIDDEN = 4096  # meta-llama/Llama-3.1-8B config.json: hidden_size
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (REAL / "data" / "gsm8k" / "test.jsonl").exists(),
                                reason=f"the real published files are not at {REAL} (CI has them)")


def test_the_map_of_the_8b_cognitive_pair_gets_more_fit_positions_than_dimensions(tmp_path):
    from mechdiff.fairness.filter_shared import filter_prompts
    from mechdiff.fairness.vocab import compare_vocabularies
    from mechdiff.models.collect_acts import position_plan
    from mechdiff.params.preset import apply_preset
    from mechdiff.rq2.fit_clt import prompt_classes, split_rows
    from stages.common import load_stage_params
    from tests.prompt_sources import prepare_pair
    from tests.real_pair import llama3_tokenizer

    raw = yaml.safe_load(apply_preset((ROOT / "params.yaml").read_text(), "llama31"))
    data = REAL / "data"
    files = {"gsm8k": data / "gsm8k" / "test.jsonl", "math": data / "math" / "math500_test.jsonl",
             "neutral": data / "refusal" / "harmless_test.json"}
    pair = raw["pairs"]["cognitive"]
    for name, spec in pair["datasets"].items():
        assert name in files, f"the preset's cognitive pair has a dataset this test does not stand in for: {name}"
        spec.update(kind="file", path=str(files[name]), revision=None)
        spec.pop("hub_id", None), spec.pop("hub_config", None), spec.pop("hub_split", None)
    pair["datasets"]["neutral"]["fields"] = {"text": "instruction"}
    raw["pairs"] = {"cognitive": pair}
    raw["data"]["allow_external_paths"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_stage_params(tmp_path / "params.yaml")
    spec = params.pairs["cognitive"]
    frame = prepare_pair(spec, root=ROOT, seed=params.data.seed, dev_fraction=params.data.dev_fraction)
    tok = llama3_tokenizer(tmp_path)
    filtered, _ = filter_prompts(frame, tok, tok, params.fairness, compare_vocabularies(tok, tok))
    plan = position_plan(filtered, params.fairness.primary_mode, params.fairness.n_sampled_positions, params.seed)
    ids = plan["id"].astype(str).to_numpy()
    classes = prompt_classes(filtered)
    clt = params.clt
    rows, test = split_rows(ids, clt.n_positions, clt.heldout_fraction, clt.cv_folds, params.seed,
                            strata=[classes.get(i, "unlabelled") for i in ids])
    n_fit = int((~test).sum())
    print(f"\nllama31 cognitive: {filtered[f'kept_{params.fairness.primary_mode}'].sum()} prompts, "
          f"{len(plan)} captured positions, {len(rows)} kept (clt.n_positions {clt.n_positions}), {n_fit} to fit")
    assert clt.min_positions >= LLAMA31_8B_HIDDEN or clt.pca_dim is not None
    assert n_fit >= LLAMA31_8B_HIDDEN or (clt.pca_dim is not None and n_fit > clt.pca_dim)
    assert len(np.unique(ids[rows][~test])) >= clt.cv_folds
