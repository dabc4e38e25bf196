"""Stage attribution (RQ4): grad x activation per attention head in both models, on the pair's target prompts.

    python -m stages.attribution --pair cultural --filtered data/filtered/cultural \
        --out artifacts/results/cultural/attribution.parquet

The churn stage (``stages/churn.py``) reads these scores, so a churn threshold never reruns a model.
"""

from __future__ import annotations


import pandas as pd
import torch

from mechdiff.data.prompt_schema import conform
from mechdiff.data.target import resolve as resolve_target
from mechdiff.fairness.tokenizer_load import load_tokenizer
from mechdiff.models.collect_acts import input_ids_for, scan_layers
from mechdiff.models.load import load_model, pair_devices
from mechdiff.rq4 import attribution as attr
from stages.common import atomic_write_parquet, load_pair_params, read_table, run_stage, stage_parser


def scores(args, params) -> None:
    """Score every scanned head of both models on the target prompts; writes the per-prompt table."""
    pair, mode, ap, acts = params.pairs[args.pair], params.fairness.primary_mode, params.attribution, params.acts
    target = resolve_target(pair.target)
    prompts = conform(read_table(f"{args.filtered}/prompts.parquet"))
    records = attr.select_prompts(prompts, target, mode, ap.max_prompts, params.seed).to_dict("records")
    sep = " " if params.fairness.template == "raw" else ""  # after a raw "A:" prompt
    texts = [target.continuation(r.get("language"), r.get("answer"), sep) for r in records]
    devices = pair_devices(acts.device, torch.cuda.device_count())  # as every stage places the pair
    sides = (("base", pair.base, pair.base_revision), ("tuned", pair.tuned, pair.tuned_revision))
    tables = []
    for s, (name, mid, rev) in enumerate(sides):
        if s == 1 and (mid, rev) == sides[0][1:]:  # a model against itself: identical scores
            tables.append(tables[0].assign(model="tuned"))
            continue
        torch.manual_seed(params.seed)
        tok = load_tokenizer(*(sides[0][1:] if mode == "base_ids" else (mid, rev)),
                             trust_remote_code=params.fairness.trust_remote_code)
        model = load_model(mid, rev, dtype=getattr(torch, acts.dtype), device=devices[s],
                           trust_remote_code=params.fairness.trust_remote_code,
                           attn_implementation=acts.attn_implementation,
                           allow_pickle=params.fairness.allow_pickle_weights)
        layers = scan_layers(model.config.num_hidden_layers, params.layers.scan_stride)
        cont = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        res = attr.attribute(model, [input_ids_for(r, mode)[s] for r in records], cont, pad, layers, ap.batch_size,
                             ap.ig_steps)
        langs = dict(zip((r["id"] for r in records), (r["language"] for r in records)))
        table = attr.score_table([r["id"] for r in records], name, res)
        tables.append(table.assign(language=table["id"].map(langs)))
        del model
    atomic_write_parquet(args.out, pd.concat(tables, ignore_index=True))
    print(f"attribution@{args.pair}: {len(records)} prompts x {tables[0][['layer', 'head']].drop_duplicates().shape[0]}"
          f" heads, target {target.name} ({target.measure}), mode {mode}")


def main() -> None:
    ap = stage_parser(__doc__, "--pair", "--filtered", "--out", raw_doc=True)
    args = ap.parse_args()
    scores(args, load_pair_params(args.params, args.pair))


if __name__ == "__main__":
    run_stage(main)
