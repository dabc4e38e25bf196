"""collect_acts: which layers and positions are captured, in which batches, for both models of a pair.

A *plan* lists, for one comparison mode, every captured position as a row of the index table:
``prompt`` (row of the filtered prompt table), ``kind`` (``last`` = last content token, ``sampled``),
``base_pos`` and ``tuned_pos`` (token index in each model's own input). Both models are captured at
exactly these aligned positions, so row ``i`` of the base and tuned activation matrices describe the
same text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from mechdiff.alignment import sample_pairs
from mechdiff.architecture import site_name
from mechdiff.capture import capture
from mechdiff.errors import MechdiffError
from mechdiff.rendering import pad_batch


def scan_layers(n_layers: int, stride: int) -> list[int]:
    """Block indices scanned every ``stride`` layers, ending at the last block: 1, 3, 5, 7 for 8 layers
    and stride 2 (the seed's layers 2, 4, 6, ... counted from 1)."""
    if stride < 1:
        raise MechdiffError(f"layers.scan_stride must be >= 1, got {stride}")
    return list(range(stride - 1, n_layers, stride))


def input_ids_for(row: dict, mode: str) -> tuple[list[int], list[int]]:
    """(base ids, tuned ids) fed in ``mode``: in ``base_ids`` mode both models read the base ids."""
    base = list(row["base_input_ids"])
    return base, (base if mode == "base_ids" else list(row["tuned_input_ids"]))


def position_plan(prompts: pd.DataFrame, mode: str, n_sampled: int, seed: int) -> pd.DataFrame:
    """Index table of the captured positions in ``mode`` (prompts not kept in the mode are skipped).

    Sampled positions are drawn per prompt with a seed derived from ``seed`` and the prompt row, so
    the plan does not depend on batching.
    """
    rows = []
    for i, row in enumerate(prompts.to_dict("records")):
        if not row[f"kept_{mode}"]:
            continue
        pairs = np.stack([np.asarray(row[f"pos_base_{mode}"]), np.asarray(row[f"pos_tuned_{mode}"])], 1)
        chosen = sample_pairs(pairs.astype(np.int64), n_sampled, seed * 1_000_003 + i)
        for j, (b, t) in enumerate(chosen):
            rows.append({"prompt": i, "id": row["id"], "kind": "last" if j == len(chosen) - 1 else "sampled",
                         "base_pos": int(b), "tuned_pos": int(t), "language": row["language"],
                         "task": row["task"], "split": row.get("split")})
    return pd.DataFrame(rows, columns=["prompt", "id", "kind", "base_pos", "tuned_pos", "language", "task", "split"])


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), limiting padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def capture_plan_batch(model, ids: Sequence[Sequence[int]], positions: Sequence[np.ndarray], layers: Sequence[int],
                       pad_id: int) -> dict[int, torch.Tensor]:
    """Residuals after each block in ``layers`` at the given positions of each sequence.

    ``ids``: token ids per prompt; ``positions[k]``: (n_k,) token indices of prompt k. Returns
    ``{layer: (sum n_k, d)}`` host tensors in prompt order (right padding, so indices are unpadded).
    """
    device = next(model.parameters()).device
    input_ids, mask = pad_batch(ids, pad_id, "right")
    sel = torch.cat([torch.stack([torch.full((len(p),), k), torch.as_tensor(p, dtype=torch.long)], 1)
                     for k, p in enumerate(positions)])
    sites = [site_name(layer) for layer in layers]
    acts = capture(model, input_ids.to(device), mask.to(device), sites, sel)
    return {layer: acts[site_name(layer)] for layer in layers}


def iter_shards(plan: pd.DataFrame, prompts: pd.DataFrame, mode: str, shard_prompts: int,
                batch_size: int) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield ``(shard_index, batches)``: shards are consecutive chunks of ``shard_prompts`` prompts,
    each split into length-sorted batches of prompt rows."""
    prompt_rows = sorted(plan["prompt"].unique())
    for s, start in enumerate(range(0, len(prompt_rows), shard_prompts)):
        chunk = prompt_rows[start:start + shard_prompts]
        lengths = [len(input_ids_for(prompts.iloc[r], mode)[1]) for r in chunk]
        yield s, [[chunk[i] for i in b] for b in length_sorted_batches(lengths, batch_size)]


def check_finite(t: torch.Tensor, what: str, ids: Sequence[str]) -> None:
    """Raise a clear error naming the site and the first prompt whose activations hold NaN or Inf."""
    bad = ~torch.isfinite(t).all(dim=-1)
    if bad.any():
        raise MechdiffError(f"non-finite activations (NaN or Inf) at {what} for prompt {ids[int(bad.nonzero()[0])]!r}; "
                            "use float32 or bfloat16 instead of float16, or check the model weights")
