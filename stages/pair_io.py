"""Loading one pair for a stage: both models, both tokenizers and the filtered prompt table.

Shared by the stages that run models (behaviour, collect_acts, layer_patch, fit_clt, steer_sweep,
head_patch), so each
loads them the same way: through :func:`mechdiff.models.load.load_model` (a local directory is just another
Hugging Face id), with the pair's pinned revisions and ``trust_remote_code`` only when params say so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechdiff.data.prompt_schema import conform
from mechdiff.fairness.tokenizer_load import load_pair_tokenizers
from mechdiff.models.load import load_model, pair_devices
from stages.common import StageError, read_table


def load_models(params, pair) -> tuple:
    """``(base, tuned)`` models of a pair in ``acts.dtype`` with ``acts.attn_implementation``, placed by
    ``acts.device`` (:func:`mechdiff.models.load.pair_devices`: each model on its own GPU when two are present)."""
    acts, trc, pickle = params.acts, params.fairness.trust_remote_code, params.fairness.allow_pickle_weights
    devices = pair_devices(acts.device, torch.cuda.device_count())
    sides = ((pair.base, pair.base_revision), (pair.tuned, pair.tuned_revision))
    return tuple(load_model(m, r, dtype=getattr(torch, acts.dtype), device=d, trust_remote_code=trc,
                            attn_implementation=acts.attn_implementation, allow_pickle=pickle)
                 for (m, r), d in zip(sides, devices))


def load_pair(params, pair_name: str, filtered: str):
    """``(pair params, (base, tuned) models, (base, tuned) tokenizers, filtered prompt frame)``; the
    stage has checked ``pair_name`` (:func:`stages.common.load_pair_params`)."""
    pair = params.pairs[pair_name]
    trc = params.fairness.trust_remote_code
    models = load_models(params, pair)
    toks = load_pair_tokenizers(pair, trc)  # with the pair's chat-template overrides
    path = Path(filtered) / "prompts.parquet"
    if not path.exists():
        raise StageError(f"{path} not found; run `dvc repro filter_shared@{pair_name}` first")
    return pair, models, toks, conform(read_table(path))
