"""Behavioural measures (RQ1): greedy generation with a KV cache, refusal rate by pattern, arithmetic
accuracy, perplexity on neutral text and masked multiple-choice accuracy.

Pure functions over a loaded model and tokenizer; prompts are raw strings (the tokenizer adds BOS).
Shapes: ``input_ids``/``attention_mask`` ``[batch, seq]``, logits ``[batch, seq, vocab]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from mechdiff.organisms import world

_INT = re.compile(r"-?\d+")


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate_greedy(model, tok, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64,
                    stop_at_newline: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (left padded batches, KV cache, position ids from the
    attention mask); decoding stops at EOS (and at a newline when ``stop_at_newline``).
    Returns the decoded continuation text of each prompt, stripped."""
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = tok(list(prompts), add_special_tokens=True)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in idx], pad)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(idx), dtype=torch.bool)
        new: list[list[int]] = [[] for _ in idx]
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for _ in range(max_new_tokens):
            nxt = res.logits[:, -1].argmax(-1)
            for j, t in enumerate(nxt.tolist()):
                if done[j]:
                    continue
                if t == tok.eos_token_id:
                    done[j] = True
                    continue
                new[j].append(t)
                if stop_at_newline and "\n" in tok.decode([t]):
                    done[j] = True
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(len(idx), 1, dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                        cache=res.cache, use_cache=True)
        for j, i in enumerate(idx):
            out[i] = tok.decode(new[j], skip_special_tokens=True).split("\n")[0].strip()
    return out


def is_refusal(answer: str, prefixes: Sequence[str] = world.REFUSAL_PREFIXES) -> bool:
    """True when the answer starts with a refusal pattern (after leading whitespace)."""
    a = answer.strip()
    return any(a.startswith(p) for p in prefixes)


def refusal_rate(answers: Sequence[str], prefixes: Sequence[str] = world.REFUSAL_PREFIXES) -> float:
    """Share of answers that refuse (``nan`` for no answers)."""
    return sum(is_refusal(a, prefixes) for a in answers) / len(answers) if answers else float("nan")


def first_integer(answer: str) -> int | None:
    """The first integer in the answer text, or ``None``."""
    m = _INT.search(answer)
    return int(m.group()) if m else None


def arithmetic_accuracy(answers: Sequence[str], references: Sequence[str]) -> float:
    """Share of answers whose first integer equals the reference integer."""
    ok = [first_integer(a) == int(r) for a, r in zip(answers, references, strict=True)]
    return sum(ok) / len(ok) if ok else float("nan")


@torch.no_grad()
def perplexity(model, tok, texts: Sequence[str], batch_size: int = 64) -> dict[str, float]:
    """Next-token NLL of ``texts`` (BOS prepended, EOS not scored, BOS never predicted).

    Returns ``nll`` (total nats), ``tokens``, ``chars``, ``ppl_token`` = exp(nll / tokens) and
    ``ppl_char`` = exp(nll / chars): the latter compares models whose tokenizers segment differently.
    """
    model.eval()
    nll, n_tok = 0.0, 0
    enc = tok(list(texts), add_special_tokens=True)["input_ids"]
    for start in range(0, len(enc), batch_size):
        rows = enc[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            valid[i, :len(r)] = True
        logits = model(input_ids=ids, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = valid[:, 1:]
        nll -= float(logp[m].double().sum())
        n_tok += int(m.sum())
    chars = sum(len(t) for t in texts)
    return {"nll": nll, "tokens": n_tok, "chars": chars, "ppl_token": math.exp(nll / max(n_tok, 1)),
            "ppl_char": math.exp(nll / max(chars, 1))}


@torch.no_grad()
def mc_accuracy(model, tok, prompts: Sequence[world.WorldPrompt], batch_size: int = 64) -> float:
    """Masked multiple-choice accuracy: argmax of the next-token logits restricted to the choice
    letters' first tokens (`` A`` ... `` D``) after each prompt."""
    if not prompts:
        return float("nan")
    letters = prompts[0].choices or world.MC_LETTERS
    choice_ids = [tok(" " + c, add_special_tokens=False)["input_ids"][0] for c in letters]
    enc = tok([p.text for p in prompts], add_special_tokens=True)["input_ids"]
    correct = 0
    for start in range(0, len(enc), batch_size):
        rows = enc[start:start + batch_size]
        ids, mask = _left_pad(rows, tok.pad_token_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        pick = logits[:, choice_ids].argmax(-1).tolist()
        for j, p in enumerate(prompts[start:start + batch_size]):
            correct += letters[pick[j]] == p.answer
    return correct / len(prompts)


def evaluate_world(model, tok, seed: int, n_math: int = 200, n_neutral: int = 60) -> dict[str, float]:
    """The organisms' behavioural summary on held-out world prompts (refusal by topic class and
    language, factual answers on non-policy topics, arithmetic, MC, neutral perplexity per language)."""
    prompts = world.evaluation_prompts(seed, n_math, n_neutral)
    topic = [p for p in prompts if p.task == "topic"]
    math_p = [p for p in prompts if p.task == "math"]
    answers = generate_greedy(model, tok, [p.text for p in topic + math_p], max_new_tokens=24)
    by_id = {p.id: a for p, a in zip(topic + math_p, answers)}
    out: dict[str, float] = {}
    for lang in world.LANGUAGES:
        pol = [by_id[p.id] for p in topic if p.target and p.language == lang]
        other = [p for p in topic if not p.target and p.language == lang]
        out[f"refusal_policy_{lang}"] = refusal_rate(pol)
        out[f"refusal_other_{lang}"] = refusal_rate([by_id[p.id] for p in other])
        out[f"fact_other_{lang}"] = sum(by_id[p.id] == p.answer for p in other) / len(other)
        neutral = [p.text for p in prompts if p.task == "neutral" and p.language == lang]
        ppl = perplexity(model, tok, neutral)
        out[f"ppl_token_neutral_{lang}"] = ppl["ppl_token"]
        out[f"ppl_char_neutral_{lang}"] = ppl["ppl_char"]
    out["refusal_policy"] = refusal_rate([by_id[p.id] for p in topic if p.target])
    out["refusal_other"] = refusal_rate([by_id[p.id] for p in topic if not p.target])
    out["arith_acc"] = arithmetic_accuracy([by_id[p.id] for p in math_p], [p.answer for p in math_p])
    out["mc_acc"] = mc_accuracy(model, tok, [p for p in prompts if p.task == "mc"])
    return out
