"""Stage filter_shared: the cross-tokenizer fairness contract for one pair.

    python -m stages.filter_shared --pair cultural --prepared data/prepared/cultural.parquet \
        --out data/filtered/cultural --report artifacts/results/cultural/fairness.json

Writes ``<out>/prompts.parquet`` (prompts with both models' ids and compared positions per mode),
``<out>/id_map.safetensors`` (``base_ids``/``tuned_ids`` of the shared vocabulary) and the
``fairness.json`` metrics (vocab sizes, % increase, id identity, special tokens, segmentation
identity and retention per language and mode). Needs only the two tokenizers, no weights: the
probability mass each model loses to the shared-id mask is measured by the behaviour stage, the
first that loads the models.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from mechdiff.data.prompt_schema import conform
from mechdiff.fairness.filter_shared import fairness_report, filter_prompts, require_prompts, too_long
from mechdiff.fairness.tokenizer_load import load_pair_tokenizers, tokenizer_info
from mechdiff.fairness.vocab import compare_vocabularies, enforce_tokenizer_policy
from mechdiff.models.load import check_pair_compatible
from stages.common import (StageError, atomic_dir, atomic_write_json, load_pair_params, read_table, run_stage,
                           stage_parser)


def main() -> None:
    args = stage_parser(__doc__, "--pair", "--prepared", "--out", "--report").parse_args()
    params = load_pair_params(args.params, args.pair)
    pair, fairness = params.pairs[args.pair], params.fairness
    torch.manual_seed(params.seed)

    configs = check_pair_compatible(pair, fairness.trust_remote_code)  # before hours of work on an incompatible pair
    tok_base, tok_tuned = load_pair_tokenizers(pair, fairness.trust_remote_code)  # checked at load
    vocab = compare_vocabularies(tok_base, tok_tuned)
    policy = enforce_tokenizer_policy(vocab, pair.tokenizer_policy, args.pair)
    prepared = conform(read_table(args.prepared))
    contexts = [getattr(c, "max_position_embeddings", None) for c in configs]  # None: unknown
    limit = min([fairness.max_prompt_tokens] + [c for c in contexts if c])
    long = too_long(prepared, tok_base, tok_tuned, fairness, limit)
    if long.any():
        print(f"filter_shared@{args.pair}: skipped {int(long.sum())} of {len(prepared)} prompts longer than {limit} "
              f"tokens (fairness.max_prompt_tokens {fairness.max_prompt_tokens}, model contexts {contexts})",
              file=sys.stderr)
    too_long_ids = prepared.loc[long, "id"].astype(str).tolist()
    prepared = prepared[~long].reset_index(drop=True)
    if prepared.empty:
        raise StageError(f"filter_shared@{args.pair}: every prompt is longer than {limit} tokens; raise "
                         "fairness.max_prompt_tokens (within the models' context) or shorten the prompts")
    kept, alignments = filter_prompts(prepared, tok_base, tok_tuned, fairness, vocab, pair=args.pair)
    report = fairness_report(vocab, prepared, alignments, fairness, policy=policy,
                             tokenizers={"base": tokenizer_info(tok_base), "tuned": tokenizer_info(tok_tuned)})
    require_prompts(report["segmentation"], fairness.primary_mode, args.pair)
    report["n_prompts_in"], report["n_prompts_out"] = len(prepared) + len(too_long_ids), len(kept)
    report["too_long"] = {"limit_tokens": limit, "n_skipped": len(too_long_ids), "ids": too_long_ids[:20]}

    with atomic_dir(args.out) as tmp:
        kept.to_parquet(tmp / "prompts.parquet", index=False)
        save_file({"base_ids": torch.as_tensor(vocab.base_ids), "tuned_ids": torch.as_tensor(vocab.tuned_ids)},
                  str(tmp / "id_map.safetensors"))
    atomic_write_json(args.report, report)
    seg = report["segmentation"]["all"]
    print(f"filter_shared@{args.pair}: {len(kept)}/{len(prepared)} prompts; segmentation identity "
          f"{seg['segmentation_identity_rate']:.1%}; vocab {vocab.base_size} -> {vocab.tuned_size} "
          f"(+{vocab.pct_increase:.1f}%)")
    for warning in policy["warnings"]:
        print(f"filter_shared@{args.pair}: warning: {warning}")


if __name__ == "__main__":
    run_stage(main)
