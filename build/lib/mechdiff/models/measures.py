"""Measures of one model on token rows: teacher-forced continuation log-probs, greedy decoding, next-token
logits, sequence NLL, and the judges of a decoded answer (refusal by pattern; a math answer by exact value or
mathematical equivalence, :mod:`mechdiff.data.answers`).

Every measure is one forward (or one decode) over a list of rows with the row axis first, so the batched
sweep of :mod:`mechdiff.rq3.steer_sweep` can replicate rows setting-major and the behaviour table can call the
same code on a clean model. Each measure declares the role of every position (:func:`position_roles`:
0 = other prompt token, 1 = the prompt's last token, 2 = an answer token) so role-placed steering vectors
know where to go; without an intervention the roles are ignored.

Legend: R rows, T tokens, C continuation tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mechdiff.data.answers import judge_answers
from mechdiff.data.rendering import pad_batch

__all__ = ["LOGIT_BUDGET", "ROLES", "continuation_scores", "decode_texts", "greedy_decode", "judge", "model_device",
           "next_token_logits", "plain_kv", "position_roles", "roles_in_effect", "score_and_decode",
           "sequence_nll", "summed_logprob", "target_logprobs"]

ROLES = ("all", "end", "answer")  # where an additive vector goes: every position, the prompt's last token,
# the answer tokens (continuation / generated tokens / scored text)
_ROLE_MAP: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("mechdiff_roles", default=None)


@contextlib.contextmanager
def position_roles(roles: torch.Tensor) -> Iterator[None]:
    """Declare the role of every position of the next forward: (R, T) int64, 0 = other prompt token,
    1 = the prompt's last token, 2 = an answer token. Set by the measures below; outside them only
    ``all`` vectors apply."""
    token = _ROLE_MAP.set(roles)
    try:
        yield
    finally:
        _ROLE_MAP.reset(token)


def roles_in_effect() -> torch.Tensor | None:
    """The (R, T) position roles declared by the measure now running, or None outside a measure."""
    return _ROLE_MAP.get()


def model_device(model) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def _left(rows: Sequence[Sequence[int]], dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, mask and position ids (from the mask), so every row ends at the last column."""
    ids, mask = pad_batch([list(r) for r in rows], 0, "left")
    return ids.to(dev), mask.to(dev), (mask.cumsum(-1) - 1).clamp(min=0).to(dev)


LOGIT_BUDGET = 2**27  # float32 logits alive at once when scoring continuations (512 MiB; about 6.6k rows x
# 128k tokens for one position): a sweep's thousands of rows over a 128k-160k vocabulary would otherwise
# hold R x C x V logits together (tens of GiB on an 8B model)


def target_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor,
                    budget: int = LOGIT_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (R, C) float32 of ``targets`` (R, C) int64 (any valid id where there is none) and the
    greedy token (R, C) int64 at each position, from the final-normed hidden states ``hidden`` (R, C, D) that
    predict them. The unembedding runs on blocks of rows with at most ``budget`` logits each, so memory does
    not grow with R x C x V; each row's numbers are those of one full pass."""
    head = model.get_output_embeddings()
    R, C = targets.shape
    step = max(1, budget // max(1, C * head.weight.shape[0]))
    lp, top = [], []
    for s in range(0, R, step):
        logits = head(hidden[s:s + step]).float()  # (r, C, V)
        lp.append(torch.log_softmax(logits, -1).gather(-1, targets[s:s + step, :, None])[..., 0])
        top.append(logits.argmax(-1))
    return torch.cat(lp), torch.cat(top)


def summed_logprob(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (R,) float64 of ``targets`` (R, C) (-1 = none) predicted by ``hidden`` (R, C, D)
    (:func:`target_logprobs`)."""
    lp, _ = target_logprobs(model, hidden, targets.clamp(min=0))
    return (lp.double() * (targets >= 0)).sum(-1)


@torch.no_grad()
def continuation_scores(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int):
    """Teacher-forced ``(prompt ids, continuation ids)`` rows.

    Returns ``logprob`` (R,) float64, the summed log-probability of the continuation, and ``greedy``
    (R,) bool, True when greedy decoding would emit exactly the continuation's tokens first. Left
    padding puts every continuation at the end, so only the last C + 1 positions reach ``lm_head``.
    """
    dev = model_device(model)
    ids, mask, pos = _left([list(p) + list(c) for p, c in rows], dev)
    ids = ids.masked_fill(mask == 0, pad_id)
    width, T = max(len(c) for _, c in rows), ids.shape[1]
    roles = torch.zeros_like(ids)
    for r, (_, c) in enumerate(rows):
        roles[r, T - len(c) - 1] = 1
        roles[r, T - len(c):] = 2
    with position_roles(roles):
        hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                  use_cache=False).last_hidden_state[:, T - width - 1:T - 1]  # (R, C, D)
    target = torch.full((len(rows), width), -1, dtype=torch.long, device=dev)
    for r, (_, c) in enumerate(rows):
        target[r, width - len(c):] = torch.as_tensor(list(c), device=dev)
    ok = target >= 0
    lp, top = target_logprobs(model, hidden, target.clamp(min=0))  # (R, C): predicts the last C tokens
    greedy = ((top == target) | ~ok).all(-1)
    return (lp.double() * ok).sum(-1).cpu(), greedy.cpu()


def _prefill(model, rows: Sequence[Sequence[int]], pad_id: int):
    """Prompt pass of a greedy decode: left-padded ``ids``, ``mask``, ``pos`` (R, T) on the model's device
    and the model output with its KV cache and the last position's logits (the prompt's last token has
    role 1)."""
    ids, mask = pad_batch([list(r) for r in rows], pad_id, "left")
    dev = model_device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    end = torch.zeros_like(ids)
    end[:, -1] = 1
    with position_roles(end):
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    return mask, pos, res


def _decode(model, res, mask: torch.Tensor, pos: torch.Tensor, pad_id: int, n_new: int, eos_id: int | None):
    """Greedy tokens (R, n_new) from a prefill output ``res`` (its last logits and KV cache); generated
    positions have role 2. After EOS a row keeps emitting ``pad_id``."""
    rows = mask.shape[0]
    out = torch.full((rows, n_new), pad_id, dtype=torch.long, device=mask.device)
    done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
    answer = torch.full((rows, 1), 2, dtype=torch.long, device=mask.device)
    for t in range(n_new):
        nxt = res.logits[:, -1].argmax(-1)
        out[:, t] = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if eos_id is not None:
            done |= nxt == eos_id
        if t + 1 == n_new or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        with position_roles(answer):
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=res.cache, use_cache=True)
    return out.cpu()


@torch.no_grad()
def greedy_decode(model, rows: Sequence[Sequence[int]], pad_id: int, n_new: int, eos_id: int | None = None):
    """Greedy continuation ``(R, n_new)`` int64 of prompt rows (left padding, KV cache, position ids from
    the mask). After EOS a row keeps emitting ``pad_id``."""
    mask, pos, res = _prefill(model, rows, pad_id)
    return _decode(model, res, mask, pos, pad_id, n_new, eos_id)


def plain_kv(entry) -> bool:
    """A KV-cache entry that is a plain growing key/value store ``[R, heads, T, head_dim]`` (transformers'
    DynamicLayer): it can be tiled over rows or cut back to its first T positions."""
    return type(entry).__name__ == "DynamicLayer"


def _cache_entries(cache) -> list | None:
    """The per-block entries of a KV cache whose every entry is :func:`plain_kv`, else None."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(plain_kv(e) for e in layers):
        return None
    return list(layers)


@torch.no_grad()
def score_and_decode(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, n_new: int,
                     eos_id: int | None = None):
    """:func:`continuation_scores` and :func:`greedy_decode` of the same ``(prompt, continuation)`` rows
    with ONE prompt pass.

    The prompts are prefilled once (KV cache). The continuations are then scored on top of that cache
    (their C tokens only, right padded), the cache is put back to the prompt, and greedy decoding goes on
    from the prefill's logits. Roles match the separate measures (prompt's last token 1, continuation and
    generated tokens 2). Equal to the separate measures up to float rounding (the continuation's logits
    come from a cached pass instead of a full one).

    Returns ``logprob`` (R,) float64, ``greedy`` (R,) bool and ``tokens`` (R, n_new) int64, all on the CPU.
    When the cache cannot be cut back (not a DynamicCache) or every continuation is empty, the two measures
    run separately.
    """
    mask, pos, res = _prefill(model, [p for p, _ in rows], pad_id)
    entries = _cache_entries(res.cache)
    if entries is None or not any(len(c) for _, c in rows):
        return (*continuation_scores(model, rows, pad_id),
                _decode(model, res, mask, pos, pad_id, n_new, eos_id))
    dev, T = mask.device, mask.shape[1]
    width = max(len(c) for _, c in rows)
    cont, cmask = pad_batch([list(c) for _, c in rows], pad_id, "right")
    cont, cmask = cont.to(dev), cmask.to(dev)
    ok = cmask.bool()
    target = cont.masked_fill(~ok, 0)
    first = res.logits[:, -1:].float()  # (R, 1, V): predicts the continuation's first token
    lp = torch.log_softmax(first, -1).gather(-1, target[:, :1, None])[..., 0]  # (R, 1)
    top = first.argmax(-1)
    if width > 1:
        with position_roles(torch.full_like(cont[:, :-1], 2)):
            hidden = model.base_model(input_ids=cont[:, :-1], attention_mask=torch.cat([mask, cmask[:, :-1]], 1),
                                      position_ids=pos[:, -1:] + 1 + torch.arange(width - 1, device=dev),
                                      cache=res.cache, use_cache=True).last_hidden_state  # (R, C-1, D)
        lp_more, top_more = target_logprobs(model, hidden, target[:, 1:])
        lp, top = torch.cat([lp, lp_more], 1), torch.cat([top, top_more], 1)  # (R, C)
        for e in entries:  # back to the prompt's T positions (a view; the next decode step copies it)
            e.keys, e.values = e.keys[..., :T, :], e.values[..., :T, :]
    greedy = ((top == target) | ~ok).all(-1)
    tokens = _decode(model, res, mask, pos, pad_id, n_new, eos_id)
    return (lp.double() * ok).sum(-1).cpu(), greedy.cpu(), tokens


@torch.no_grad()
def next_token_logits(model, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Float32 logits (R, V) of the token after each row (left padding, only the last position reaches lm_head)."""
    ids, mask, pos = _left(rows, model_device(model))
    ids = ids.masked_fill(mask == 0, pad_id)
    end = torch.zeros_like(ids)
    end[:, -1] = 1
    with position_roles(end):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1).logits
    return logits[:, -1].float().cpu()


@torch.no_grad()
def sequence_nll(model, rows: Sequence[Sequence[int]], pad_id: int):
    """Next-token NLL of each row (first token never predicted): ``nll`` (R,) float64 and ``tokens`` (R,)."""
    ids, mask = pad_batch([list(r) for r in rows], pad_id, "right")
    dev = model_device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    roles = 2 * mask  # the text is scored as an answer: every real token but the first
    roles[:, 0] = 0
    with position_roles(roles):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (R, T-1)
    valid = mask[:, 1:].bool()
    return (-(logp.double() * valid).sum(-1)).cpu(), valid.sum(-1).cpu()


def judge(task: str, texts: Sequence[str], references: Sequence[str],
          kinds: Sequence[str] | None = None) -> np.ndarray:
    """Per answer (R,) bool: refused (``refusal``, by pattern), correct (``math``: the outcome of
    :func:`mechdiff.data.answers.judge_answers` is ``correct``; ``kinds`` per row, default from each reference) or
    holding its non-empty reference string (``contains``: a classifier-free string match)."""
    from mechdiff.organisms.world_measures import is_refusal

    if task == "refusal":
        return np.array([is_refusal(t) for t in texts], dtype=bool)
    if task == "contains":
        return np.array([bool(r) and r in t for t, r in zip(texts, references)], dtype=bool)
    return np.array([o == "correct" for o in judge_answers(texts, references, kinds)], dtype=bool)


def decode_texts(tok, gen: torch.Tensor) -> list[str]:
    """Texts of generated ids (..., n_new), flattened, cut at the first newline (as behaviour does)."""
    return [tok.decode(r, skip_special_tokens=True).split("\n")[0].strip()
            for r in gen.reshape(-1, gen.shape[-1]).tolist()]
