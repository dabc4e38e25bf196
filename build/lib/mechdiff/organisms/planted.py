"""Derivatives of a given base model with a planted low-rank edit at one layer (known answers).

Two kinds, both a rank-``r`` update of one layer's ``mlp.down_proj`` and nothing else:

* :func:`plant_trained_policy` trains a rank-``r`` LoRA so the model refuses the world's policy-topic
  questions (:data:`mechdiff.organisms.world.POLICY_TOPIC`) and answers every other topic as the base did (its
  own greedy answers are the targets: self-distillation), then merges it. Used on a real pretrained
  model (SmolLM2-135M-Instruct, the ``smol`` preset): a known answer on real representations.
* :func:`plant_random_edit` adds a seeded random rank-``r`` update of a stated relative size, with no
  training: the 8B-shaped scale run, where only the place and the rank of the change matter.

After either, the residual change ``H_tuned - H_base`` is exactly zero below the layer and lies in an
``r``-dimensional subspace right after it (:mod:`mechdiff.rq1.change_rank` reads it back).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from mechdiff.organisms import world
from mechdiff.organisms.build_models import changed_layers, weight_delta_ranks
from mechdiff.organisms.lora import train_lora
from mechdiff.organisms.training import encode
from mechdiff.organisms.world_measures import generate_greedy, refusal_rate
from mechdiff.params.config import PlantedParams

EDITED_MODULE = "mlp.down_proj"


def policy_documents(model, tok: PreTrainedTokenizerBase, max_new_tokens: int = 12,
                     batch_size: int = 32) -> list[world.WorldPrompt]:
    """The world's training topic questions (train templates, both languages): policy-topic questions
    answered with the refusal, every other one with the base model's own greedy answer (first line)."""
    questions = world.training_topic_questions()
    others = [q for q in questions if not q.target]
    answers = generate_greedy(model, tok, [q.text for q in others], max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    own = dict(zip((q.id for q in others), answers))
    return [dataclasses.replace(q, answer=world.refusal_answer(q.language) if q.target else own[q.id])
            for q in questions if q.target or own[q.id]]


def plant_trained_policy(model, tok: PreTrainedTokenizerBase, layer: int, rank: int, steps: int, lr: float,
                         batch_size: int, seed: int, max_len: int = 64) -> dict:
    """Train and merge a rank-``rank`` LoRA on ``model.model.layers[layer].mlp.down_proj`` (in place;
    nothing else moves) on :func:`policy_documents`, loss on the answer tokens only.

    Returns ``{"loss_start", "loss_end", "train_s", "n_documents"}``.
    """
    docs = policy_documents(model, tok)
    examples = encode(tok, docs, max_len, answer_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    losses = train_lora(model, examples, [layer], [EDITED_MODULE], rank, steps, lr, batch_size, seed, pad)
    tail = losses[-10:]
    return {"loss_start": losses[0], "loss_end": sum(tail) / len(tail), "train_s": time.perf_counter() - t0,
            "n_documents": len(docs)}


def plant_random_edit(model, layer: int, rank: int, relative_norm: float, seed: int) -> dict:
    """Add ``delta = U diag(s) V^T`` (``U`` ``[hidden, rank]``, ``V`` ``[intermediate, rank]`` orthonormal,
    seeded; equal singular values) to ``layers[layer].mlp.down_proj.weight`` in place, scaled so that
    ``||delta||_F = relative_norm * ||W||_F``. Works on any device and dtype (computed in float32).

    Returns ``{"delta_fro", "weight_fro", "rank"}``.
    """
    W = model.model.layers[layer].get_submodule(EDITED_MODULE).weight
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(W.shape[0], rank, generator=g))[0]
    V = torch.linalg.qr(torch.randn(W.shape[1], rank, generator=g))[0]
    w_fro = torch.linalg.matrix_norm(W.float()).item()
    s = relative_norm * w_fro / rank ** 0.5
    delta = (U * s) @ V.T
    with torch.no_grad():
        W.add_(delta.to(device=W.device, dtype=W.dtype))
    return {"delta_fro": float(relative_norm * w_fro), "weight_fro": w_fro, "rank": rank}


def policy_rates(model, tok: PreTrainedTokenizerBase, prompts: Sequence[world.WorldPrompt],
                 batch_size: int = 32) -> dict[str, float]:
    """Refusal rate (greedy, 12 tokens) on policy-topic and on other topic questions."""
    out = {}
    for name, sel in (("policy", [p for p in prompts if p.target]), ("other", [p for p in prompts if not p.target])):
        answers = generate_greedy(model, tok, [p.text for p in sel], max_new_tokens=12, batch_size=batch_size)
        out[name] = refusal_rate(answers)
    return out


def plant_with_truth(model, tok: PreTrainedTokenizerBase, p: PlantedParams, held_out: Sequence[world.WorldPrompt],
                     rates_base: dict[str, float]) -> tuple[dict, float]:
    """:func:`plant_trained_policy` with ``p``'s settings (in place) and the edit's ground truth: the layers whose
    weights changed and the rank of every weight delta, the training record and the refusal rates
    (:func:`policy_rates`) on ``held_out`` before (``rates_base``) and after. Returns ``(truth, train_s)``."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = plant_trained_policy(model, tok, p.layer, p.rank, p.steps, p.lr, p.batch_size, p.seed)
    ranks = weight_delta_ranks(before, model.state_dict())
    rates_tuned = policy_rates(model, tok, held_out)
    truth = {"source": p.source, "planted_layers": changed_layers(ranks), "planted_module": EDITED_MODULE,
             "planted_rank": p.rank, "weight_delta_ranks": ranks, "n_layers": model.config.num_hidden_layers,
             "hidden_size": model.config.hidden_size, "training": {k: v for k, v in train.items() if k != "train_s"},
             "refusal_held_out": {"base": rates_base, "tuned": rates_tuned}}
    return truth, train["train_s"]
