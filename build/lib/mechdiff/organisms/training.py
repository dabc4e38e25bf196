"""Training data and the one training loop of the organisms and the planted edits.

:class:`Example` is a tokenized sequence with its loss mask (:func:`encode`), :func:`batches` draws seeded,
right-padded ``[batch, seq]`` int64 batches of them, and :func:`train` runs AdamW (linear warmup, cosine
decay) over the parameters a caller leaves trainable (:func:`freeze` the rest). Pure functions of their
inputs and the seed; no file I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mechdiff.organisms import world


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized training sequence: ``ids`` ``[seq]`` (BOS ... EOS) and a 0/1 ``loss`` mask ``[seq]``
    marking the positions whose token is predicted (the first is never predicted)."""

    ids: tuple[int, ...]
    loss: tuple[int, ...]


def encode(tok: PreTrainedTokenizerBase, docs: Sequence[world.WorldPrompt], max_len: int,
           answer_only: bool = False) -> list[Example]:
    """Tokenize documents (BOS prepended by the tokenizer, EOS appended), truncated to ``max_len``.

    ``answer_only``: predict only the answer tokens and EOS (documents without an answer keep the
    full loss), else every token after BOS.
    """
    full = tok([world.document_text(d) for d in docs], add_special_tokens=True)["input_ids"]
    prompt_lens = [None] * len(docs)
    if answer_only:
        prompts = tok([d.text for d in docs], add_special_tokens=True)["input_ids"]
        prompt_lens = [len(p) if d.answer is not None else None for p, d in zip(prompts, docs)]
    out = []
    for ids, plen in zip(full, prompt_lens):
        ids = (list(ids) + [tok.eos_token_id])[:max_len]
        start = 1 if plen is None else plen
        out.append(Example(tuple(ids), tuple(int(i >= start) for i in range(len(ids)))))
    return out


def batches(examples: Sequence[Example], batch_size: int, steps: int, seed: int,
            pad_id: int, group: int = 1) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches ``(input_ids [B, T], labels [B, T])`` in a seeded shuffled order (epochs
    reshuffle); with ``group > 1``, examples within each pool of ``group`` batches are grouped by
    length (less padding, but homogeneous batches measurably hurt the organisms, so the default is 1).
    Right padded; labels ``-100`` where not predicted (HF shifts them)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    ready: list[list[int]] = []
    for _ in range(steps):
        if not ready:
            while len(order) < batch_size * group:
                order += torch.randperm(len(examples), generator=g).tolist()
            pool, order = order[:batch_size * group], order[batch_size * group:]
            pool.sort(key=lambda i: len(examples[i].ids))
            chunks = [pool[k:k + batch_size] for k in range(0, len(pool), batch_size)]
            ready = [chunks[k] for k in torch.randperm(len(chunks), generator=g).tolist()]
        rows = [examples[i] for i in ready.pop()]
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, r in enumerate(rows):
            t = torch.tensor(r.ids)
            ids[j, :len(t)] = t
            labels[j, :len(t)] = torch.where(torch.tensor(r.loss, dtype=torch.bool), t, torch.tensor(-100))
        yield ids, labels



def train(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
          params: list[nn.Parameter], weight_decay: float = 0.0,
          grad_hooks: Callable[[], None] | None = None) -> list[float]:
    """AdamW with linear warmup (5%) and cosine decay, grad-norm clip 1.0; returns the loss curve.

    Only ``params`` are optimised (the caller freezes the rest). ``grad_hooks`` runs after backward
    (e.g. to zero gradient rows that must not move).
    """
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, eps=1e-8)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for ids, labels in data:
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hooks is not None:
            grad_hooks()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses



def freeze(model: nn.Module) -> None:
    """Stop gradients for every parameter of ``model``."""
    for q in model.parameters():
        q.requires_grad_(False)
