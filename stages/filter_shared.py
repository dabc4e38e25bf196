"""Stage filter_shared: the cross-tokenizer fairness contract for one pair.

    python -m stages.filter_shared --pair cultural --prepared data/prepared/cultural.parquet \
        --out data/filtered/cultural --report artifacts/results/cultural/fairness.json

Writes ``<out>/prompts.parquet`` (prompts with both models' ids and compared positions per mode),
``<out>/id_map.safetensors`` (``base_ids``/``tuned_ids`` of the shared vocabulary) and the
``fairness.json`` metrics (vocab sizes, % increase, id identity, special tokens, segmentation
identity and retention per language and mode, probability mass lost to the logit mask).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from safetensors.torch import save_file

from mechdiff.filter_shared import fairness_report, filter_prompts, masked_mass_at_last, require_prompts
from mechdiff.models import load_model, load_tokenizer, pair_devices
from mechdiff.sources import conform
from mechdiff.vocab import compare_vocabularies
from stages.common import atomic_dir, atomic_write_json, load_pair_params, run_stage

MASS_PROMPTS_PER_LANGUAGE = 64


def masked_mass(pair, fairness, frame, vocab, acts) -> dict:
    """Mean probability mass each model loses to the shared-id mask at the last token, per language.
    The models load one at a time, in ``acts.dtype`` on the device ``acts.device`` gives them."""
    out = {}
    devices = pair_devices(acts.device, torch.cuda.device_count())
    for k, (side, model_id, rev, col, allowed) in enumerate((
            ("base", pair.base, pair.base_revision, "base_input_ids", vocab.base_ids),
            ("tuned", pair.tuned, pair.tuned_revision, "tuned_input_ids", vocab.tuned_ids))):
        model = load_model(model_id, rev, dtype=getattr(torch, acts.dtype), device=devices[k],
                           trust_remote_code=fairness.trust_remote_code)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        for lang, sub in frame.groupby("language", sort=True):
            ids = [list(x) for x in sub[col].head(MASS_PROMPTS_PER_LANGUAGE)]
            lost = masked_mass_at_last(model, ids, allowed, pad)
            out.setdefault(str(lang), {})[side] = float(lost.mean()) if len(lost) else 0.0
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name in ("--pair", "--prepared", "--out", "--report"):
        ap.add_argument(name, required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_pair_params(args.params, args.pair)
    pair, fairness = params.pairs[args.pair], params.fairness
    torch.manual_seed(params.seed)

    tok_base = load_tokenizer(pair.base, pair.base_revision, fairness.trust_remote_code)
    tok_tuned = load_tokenizer(pair.tuned, pair.tuned_revision, fairness.trust_remote_code)
    vocab = compare_vocabularies(tok_base, tok_tuned)
    prepared = conform(pd.read_parquet(args.prepared))
    kept, alignments = filter_prompts(prepared, tok_base, tok_tuned, fairness, vocab)
    report = fairness_report(vocab, prepared, alignments, fairness, masked={})
    require_prompts(report["segmentation"], fairness.primary_mode, args.pair)
    report["masked_mass"] = masked_mass(pair, fairness, kept, vocab, params.acts)
    report["n_prompts_in"], report["n_prompts_out"] = len(prepared), len(kept)

    with atomic_dir(args.out) as tmp:
        kept.to_parquet(tmp / "prompts.parquet", index=False)
        save_file({"base_ids": torch.as_tensor(vocab.base_ids), "tuned_ids": torch.as_tensor(vocab.tuned_ids)},
                  str(tmp / "id_map.safetensors"))
    atomic_write_json(args.report, report)
    seg = report["segmentation"]["all"]
    print(f"filter_shared@{args.pair}: {len(kept)}/{len(prepared)} prompts; segmentation identity "
          f"{seg['segmentation_identity_rate']:.1%}; vocab {vocab.base_size} -> {vocab.tuned_size} "
          f"(+{vocab.pct_increase:.1f}%)")


if __name__ == "__main__":
    run_stage(main)
