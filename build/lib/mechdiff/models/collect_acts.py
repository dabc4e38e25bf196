"""collect_acts: which layers and positions are captured, in which batches, for both models of a pair,
and the capture of one shard.

A *plan* lists, for one comparison mode, every captured position as a row of the index table:
``prompt`` (row of the filtered prompt table), ``kind`` (``last`` = last content token, ``sampled``),
``base_pos`` and ``tuned_pos`` (token index in each model's own input). Both models are captured at
exactly these aligned positions, so row ``i`` of the base and tuned activation matrices describe the
same text. Prompts are captured in shards (:func:`iter_shards`, :func:`capture_shard`), each shard's rows in
the plan's prompt order whatever the batching; with several workers, shard ``s`` belongs to worker
``s mod n`` (:func:`parse_worker`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mechdiff.data.rendering import pad_batch
from mechdiff.errors import MechdiffError
from mechdiff.fairness.alignment import sample_pairs
from mechdiff.models.architecture import site_name
from mechdiff.models.capture import capture

SIDES = ("base", "tuned")


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


def plan_positions(plan: pd.DataFrame) -> dict[int, dict[str, np.ndarray]]:
    """Per prompt row of the filtered table: its plan rows' positions per side (``{side: (n_k,)}``), looked up
    once (per-prompt pandas filtering inside the batch loop cost ~1.4 s per 256-prompt shard on an H100)."""
    return {r: {side: g[f"{side}_pos"].to_numpy() for side in SIDES} for r, g in plan.groupby("prompt", sort=False)}


def capture_shard(models: Mapping, prompts: pd.DataFrame, mode: str, batches: Sequence[Sequence[int]],
                  where: Mapping[int, Mapping[str, np.ndarray]], layers: Sequence[int], pad_ids: Mapping[str, int],
                  halve: Callable[[Callable, Sequence[int]], list]) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of one shard, ``{"<side>.layers.<i>.resid_post": (n_positions, d)}`` in the plan's prompt
    order, and the input tokens both models read. ``batches``: prompt rows per batch (:func:`iter_shards`);
    ``where``: :func:`plan_positions`; ``halve`` runs each batch (:class:`mechdiff.models.oom.HalveOnOOM`: an
    out-of-memory batch is halved and retried). A non-finite activation raises (:func:`check_finite`)."""
    n_tok = 0
    tensors: dict[str, list] = {}
    for batch in batches:
        for side, model in models.items():
            def run(rows, side=side, model=model):
                ids = [input_ids_for(prompts.iloc[r], mode)[side == "tuned"] for r in rows]
                return capture_plan_batch(model, ids, [where[r][side] for r in rows], layers, pad_ids[side])

            for rows, out in halve(run, batch):
                for layer, t in out.items():
                    check_finite(t, f"{side} layers.{layer}.resid_post", [prompts.iloc[r]["id"] for r in rows])
                    tensors.setdefault(f"{side}.layers.{layer}.resid_post", []).append((rows, t))
            n_tok += sum(len(input_ids_for(prompts.iloc[r], mode)[side == "tuned"]) for r in batch)
    chunk = sorted(r for b in batches for r in b)
    order = {r: k for k, r in enumerate(chunk)}
    counts = {r: len(where[r]["base"]) for r in chunk}
    return {name: _in_prompt_order(parts, counts, order) for name, parts in tensors.items()}, n_tok


def _in_prompt_order(parts, counts: dict, order) -> torch.Tensor:
    """Concatenate per-batch tensors (rows grouped by batch; ``counts[r]`` rows for prompt r) into the
    plan's prompt order."""
    rows, keys = [], []
    for batch, t in parts:
        for r, block in zip(batch, torch.split(t, [counts[r] for r in batch])):
            rows.append(block)
            keys.append(order[r])
    return torch.cat([rows[k] for k in sorted(range(len(keys)), key=keys.__getitem__)]).contiguous()


def probe_capture(models: Mapping, prompts: pd.DataFrame, layers: Sequence[int], pad_ids: Mapping[str, int],
                  b: int) -> None:
    """Capture the last token of the ``b`` longest prompts (``base_ids`` mode) with both models: the probe of the
    automatic batch size (:func:`mechdiff.models.batch_size.resolve_batch_size`), which fails when ``b`` does not fit."""
    longest = sorted(range(len(prompts)), key=lambda r: -len(prompts.iloc[r]["base_input_ids"]))
    for side, model in models.items():
        ids = [input_ids_for(prompts.iloc[r], "base_ids")[side == "tuned"] for r in longest[:b]]
        capture_plan_batch(model, ids, [np.array([len(i) - 1]) for i in ids], layers, pad_ids[side])


class LazyModels(Mapping):
    """``{"base": model, "tuned": model}``, loaded by ``load()`` on first access of a model (iterating the
    sides does not load), so a run that finds every shard finished only assembles them."""

    def __init__(self, load: Callable[[], tuple]):
        self._load, self._models = load, None

    def __getitem__(self, side: str):
        if self._models is None:
            self._models = dict(zip(SIDES, self._load()))
        return self._models[side]

    def __iter__(self):
        return iter(SIDES)

    def __len__(self) -> int:
        return 2

    @property
    def loaded(self) -> bool:
        return self._models is not None


class WorkerError(MechdiffError):
    """A ``--worker`` request that cannot be honoured (malformed, or workers that would batch differently)."""


def parse_worker(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)`` (a single run)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise WorkerError(f"--worker {text!r}: expected i/n with 0 <= i < n, e.g. --worker 0/2")
    return i, n
