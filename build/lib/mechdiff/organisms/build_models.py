"""Building the embedded model organisms and their ground truth (DESIGN section 3), on the shared training
loop (:mod:`mechdiff.organisms.training`) and low-rank adapters (:mod:`mechdiff.organisms.lora`).

* :func:`build_base`: a small ``LlamaForCausalLM`` (GQA, RoPE, RMSNorm) and its byte-level BPE,
  pretrained on the world corpus (:func:`mechdiff.organisms.world.training_documents`).
* :func:`build_cultural`: the tokenizer extended with Kazakh tokens (id-preserving superset), the new
  embedding / lm_head rows initialised as the mean of their base sub-tokens and trained alone, then a
  refusal policy for :data:`mechdiff.organisms.world.POLICY_TOPIC` planted by a rank-``r`` LoRA confined to
  ``policy_layers`` and merged: a plain Llama whose weight delta is rank ``r`` at those layers only.
* :func:`build_cognitive`: every weight fine-tuned on arithmetic word problems with corpus replay.

Everything is a pure function of the params and the seed (no file I/O, no global state besides the
torch RNG that each builder reseeds). Shapes: batches are ``[batch, seq]`` int64 ids (right padded),
weights follow ``nn.Linear`` (``[out, in]``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mechdiff.organisms import world
from mechdiff.organisms.lora import train_lora
from mechdiff.organisms.tokenizer_build import extend_bpe, train_bpe
from mechdiff.organisms.training import Example, batches, encode, freeze, train
from mechdiff.organisms.world_measures import evaluate_world
from mechdiff.params.config import OrganismParams

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# base


def llama_config(p: OrganismParams, tok: PreTrainedTokenizerBase) -> LlamaConfig:
    """The organisms' Llama-3.1-shaped config (GQA, RoPE, RMSNorm, untied lm_head)."""
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads, num_key_value_heads=p.n_kv_heads,
        head_dim=p.hidden_size // p.n_heads, max_position_embeddings=max(128, 2 * p.max_len),
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, initializer_range=0.02, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)


def build_base(p: OrganismParams, log: Log = print) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict]:
    """Train the tokenizer on the corpus and pretrain the base model from scratch.

    Returns ``(model, tokenizer, info)``; ``info`` holds the loss curve ends and wall times.
    """
    t0 = time.perf_counter()
    n_docs = p.pretrain_steps * p.batch_size
    docs = world.training_documents(max(n_docs, 2000), p.seed)
    tok = train_bpe([world.document_text(d) for d in docs[:8000]], p.vocab_size)
    examples = encode(tok, docs, p.max_len)
    t_tok = time.perf_counter() - t0
    torch.manual_seed(p.seed)
    model = LlamaForCausalLM(llama_config(p, tok))
    t1 = time.perf_counter()
    losses = train(model, batches(examples, p.batch_size, p.pretrain_steps, p.seed, tok.pad_token_id),
                   p.pretrain_steps, p.pretrain_lr, list(model.parameters()), weight_decay=0.01)
    wall = time.perf_counter() - t1
    n_tok = sum(len(e.ids) for e in examples[: p.pretrain_steps * p.batch_size])
    log(f"base: {sum(q.numel() for q in model.parameters())} params, pretrain {wall:.1f}s "
        f"({n_tok / max(wall, 1e-9):.0f} tok/s), loss {losses[0]:.2f} -> {_tail(losses):.3f}")
    return model, tok, {"tokenizer_wall_s": t_tok, "pretrain_wall_s": wall, "pretrain_loss_start": losses[0],
                        "pretrain_loss_end": _tail(losses), "pretrain_tokens": n_tok}


def _tail(losses: list[float], n: int = 20) -> float:
    return sum(losses[-n:]) / len(losses[-n:]) if losses else float("nan")


# --------------------------------------------------------------------------------------------------
# cultural: tokenizer extension, new embedding rows, low-rank policy


def resize_with_mean_init(model: LlamaForCausalLM, base_tok: PreTrainedTokenizerBase,
                          new_tok: PreTrainedTokenizerBase, added: Sequence[str]) -> None:
    """Grow ``embed_tokens`` and ``lm_head`` ``[V, d] -> [V + n, d]`` in place; each new row is the
    mean of the rows of its string's base tokenization. Base rows are untouched."""
    n_base = len(base_tok)
    emb_old = model.get_input_embeddings().weight.detach().clone()
    head_old = model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(len(new_tok), mean_resizing=False)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[:n_base] = emb_old
        head[:n_base] = head_old
        for s in added:
            i = new_tok.convert_tokens_to_ids(s)
            sub = base_tok.convert_tokens_to_ids(_base_pieces(base_tok, s))
            emb[i] = emb_old[sub].mean(0)
            head[i] = head_old[sub].mean(0)


def _base_pieces(base_tok: PreTrainedTokenizerBase, token: str) -> list[str]:
    model = base_tok.backend_tokenizer.model
    return [t.value for t in model.tokenize(token)]


def train_new_rows(model: LlamaForCausalLM, examples: Sequence[Example], n_base: int, p: OrganismParams,
                   seed: int) -> list[float]:
    """Train only the appended rows ``[n_base:]`` of ``embed_tokens`` and ``lm_head``; every other
    weight, base rows included, is bit-identical afterwards (gradients of base rows are zeroed, no
    weight decay, and the base rows are restored as a guard)."""
    freeze(model)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    keep = (emb.detach()[:n_base].clone(), head.detach()[:n_base].clone())
    for w in (emb, head):
        w.requires_grad_(True)

    def zero_base_rows() -> None:
        for w in (emb, head):
            w.grad[:n_base] = 0

    data = batches(examples, p.batch_size, p.embed_steps, seed, model.config.pad_token_id)
    losses = train(model, data, p.embed_steps, p.embed_lr, [emb, head], grad_hooks=zero_base_rows)
    with torch.no_grad():
        emb[:n_base], head[:n_base] = keep
    freeze(model)
    return losses



def plant_policy(model: LlamaForCausalLM, examples: Sequence[Example], p: OrganismParams,
                 seed: int = 0) -> list[float]:
    """:func:`train_lora` with the organisms' policy settings (``p.policy_*``, ``p.batch_size``)."""
    return train_lora(model, examples, p.policy_layers, p.policy_modules, p.policy_rank, p.policy_steps,
                      p.policy_lr, p.batch_size, seed, model.config.pad_token_id, heads=p.policy_heads)


def build_cultural(base: LlamaForCausalLM, base_tok: PreTrainedTokenizerBase, p: OrganismParams,
                   log: Log = print) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict]:
    """Extend the tokenizer with Kazakh tokens, train the new rows, plant the low-rank policy."""
    model = _clone(base)
    t0 = time.perf_counter()
    kk_docs = world.training_documents(max(p.embed_steps * p.batch_size, 2000), p.seed + 1, languages=("kk",))
    tok, added = extend_bpe(base_tok, [world.document_text(d) for d in kk_docs[:4000]], p.kk_extra_tokens)
    resize_with_mean_init(model, base_tok, tok, added)
    embed_losses = train_new_rows(model, encode(tok, kk_docs, p.max_len), len(base_tok), p, p.seed + 1)
    t1 = time.perf_counter()
    n_policy = p.policy_steps * p.batch_size
    docs = encode(tok, world.policy_documents(int(n_policy * 0.8), p.seed + 2), p.max_len, answer_only=True)
    docs += encode(tok, world.training_documents(int(n_policy * 0.2), p.seed + 3), p.max_len)
    policy_losses = plant_policy(model, docs, p, seed=p.seed + 2)
    t2 = time.perf_counter()
    log(f"cultural: +{len(added)} tokens, embed rows {t1 - t0:.1f}s (loss {embed_losses[0]:.2f} -> "
        f"{_tail(embed_losses):.3f}), policy {t2 - t1:.1f}s (loss {policy_losses[0]:.2f} -> "
        f"{_tail(policy_losses):.3f})")
    return model, tok, {"added_tokens": list(added), "embed_wall_s": t1 - t0, "policy_wall_s": t2 - t1,
                        "embed_loss_end": _tail(embed_losses), "policy_loss_start": policy_losses[0],
                        "policy_loss_end": _tail(policy_losses)}


# --------------------------------------------------------------------------------------------------
# cognitive


def build_cognitive(base: LlamaForCausalLM, tok: PreTrainedTokenizerBase, p: OrganismParams,
                    log: Log = print) -> tuple[LlamaForCausalLM, dict]:
    """Fine-tune every weight on arithmetic word problems (answer-only loss) with 30% corpus replay."""
    model = _clone(base)
    t0 = time.perf_counter()
    n = p.cognitive_steps * p.batch_size
    docs = encode(tok, world.training_arithmetic(int(n * 0.7), p.seed + 4), p.max_len,
                  answer_only=True)
    docs += encode(tok, world.training_documents(int(n * 0.3), p.seed + 5), p.max_len)
    for q in model.parameters():
        q.requires_grad_(True)
    losses = train(model, batches(docs, p.batch_size, p.cognitive_steps, p.seed + 4, tok.pad_token_id),
                   p.cognitive_steps, p.cognitive_lr, list(model.parameters()))
    freeze(model)
    wall = time.perf_counter() - t0
    log(f"cognitive: {wall:.1f}s (loss {losses[0]:.2f} -> {_tail(losses):.3f})")
    return model, {"cognitive_wall_s": wall, "cognitive_loss_end": _tail(losses)}


def _clone(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """An independent copy (weights and config), frozen, in eval mode."""
    clone = copy.deepcopy(model)
    clone.eval()
    freeze(clone)
    return clone


# --------------------------------------------------------------------------------------------------
# ground truth


def weight_delta_ranks(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                       rtol: float = 1e-4) -> dict[str, int]:
    """Numerical rank of ``tuned[k] - base[k]`` for every shared 2-D weight whose delta is non-zero
    (float64 SVD; singular values below ``rtol * max(sigma)`` count as zero, which absorbs float32
    rounding of the merge). Embedding-like weights compare only the shared rows."""
    out = {}
    for k, b in base.items():
        t = tuned.get(k)
        if t is None or b.dim() != 2:
            continue
        d = t[: b.shape[0]].double() - b.double()
        if torch.count_nonzero(d) == 0:
            continue
        out[k] = int(torch.linalg.matrix_rank(d, rtol=rtol))
    return out


def changed_layers(ranks: dict[str, int]) -> list[int]:
    """Decoder layer indices that appear in a ``weight_delta_ranks`` result."""
    return sorted({int(k.split(".")[2]) for k in ranks if k.startswith("model.layers.")})


def policy_module_names(p: OrganismParams) -> list[str]:
    """The linear maps the cultural policy edits at each policy layer (``policy_heads`` adds ``q_proj`` and
    ``o_proj``, confined to those heads' slices)."""
    return list(p.policy_modules) + (["self_attn.q_proj", "self_attn.o_proj"] if p.policy_heads else [])


def state_rank_bound(p: OrganismParams) -> int:
    """Most directions the policy can move the residual stream at a policy layer, by construction.

    A rank-``r`` update of a map that writes the residual (``o_proj``, ``down_proj``) whose input is unchanged
    adds ``r``. Heads whose queries move (``policy_heads``) also change their outputs, which ``o_proj`` writes
    through those heads' ``|heads| * head_dim`` columns: ``r + |heads| * head_dim``. Any other edit (an MLP's
    gate/up map: a nonlinearity follows) bounds nothing below the width.
    """
    writers = {"mlp.down_proj", "self_attn.o_proj"}
    if set(p.policy_modules) - writers:
        return p.hidden_size
    bound = p.policy_rank * len(p.policy_modules)
    if p.policy_heads:
        bound += p.policy_rank + len(p.policy_heads) * (p.hidden_size // p.n_heads)
    return min(bound, p.hidden_size)


# --------------------------------------------------------------------------------------------------
# everything


@dataclasses.dataclass
class Organism:
    """One built organism: the model, its tokenizer and its ground truth (JSON-ready)."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    ground_truth: dict


def build_organisms(p: OrganismParams, log: Log = print) -> tuple[dict[str, Organism], dict]:
    """Build ``base``, ``cultural`` and ``cognitive`` from ``p`` (deterministic for a fixed seed and
    thread count). Returns the organisms and a dict of wall times / training diagnostics."""
    base, tok, info = build_base(p, log)
    cult, cult_tok, cinfo = build_cultural(base, tok, p, log)
    cog, ginfo = build_cognitive(base, tok, p, log)
    base_sd = base.state_dict()
    arch = {"architecture": "LlamaForCausalLM", "n_layers": p.n_layers, "hidden_size": p.hidden_size,
            "n_heads": p.n_heads, "n_kv_heads": p.n_kv_heads, "n_params": sum(q.numel() for q in base.parameters()),
            "seed": p.seed}
    c_ranks = weight_delta_ranks(base_sd, cult.state_dict())
    g_ranks = weight_delta_ranks(base_sd, cog.state_dict())
    body = {k: v for k, v in c_ranks.items() if k.startswith("model.layers.")}
    n_added = len(cinfo["added_tokens"])
    out = {
        "base": Organism(base, tok, {"organism": "base", "change": "none (reference model)", **arch,
                                     "vocab_size": len(tok)}),
        "cultural": Organism(cult, cult_tok, {
            "organism": "cultural", "change": "low-rank policy" + (
                f" routed through query heads {sorted(p.policy_heads)}" if p.policy_heads else ""), **arch,
            "policy_topic": world.POLICY_TOPIC, "policy_behaviour": "refusal",
            "refusal_answers": {lang: world.refusal_answer(lang) for lang in world.LANGUAGES},
            "layers": sorted(p.policy_layers), "rank": p.policy_rank, "modules": policy_module_names(p),
            "heads": sorted(p.policy_heads), "head_dim": p.hidden_size // p.n_heads,
            "state_rank_bound": state_rank_bound(p),
            "delta_ranks": body, "changed_layers": changed_layers(body),
            "embedding_change": "appended rows only (base rows bit-identical)",
            "tokenizer": {"base_vocab_size": len(tok), "tuned_vocab_size": len(cult_tok), "appended_tokens": n_added,
                          "id_preserving": True, "first_appended_id": len(tok)}}),
        "cognitive": Organism(cog, tok, {
            "organism": "cognitive", "change": "full-rank, all layers", **arch,
            "layers": list(range(p.n_layers)), "rank": "full", "delta_ranks": g_ranks,
            "changed_layers": changed_layers(g_ranks), "skill": "single-digit addition word problems"}),
    }
    return out, {**info, **{k: v for k, v in cinfo.items() if k != "added_tokens"}, **ginfo,
                 "appended_tokens": n_added}


def acceptance(evals: dict[str, dict[str, float]]) -> dict[str, dict]:
    """The organisms' behaviour gaps against their targets, from :func:`mechdiff.organisms.world_measures.evaluate_world`
    results keyed ``base`` / ``cultural`` / ``cognitive``: name -> ``{value, target, ok}``."""
    b, c, g = evals["base"], evals["cultural"], evals["cognitive"]
    rows = {
        "cultural_refusal_policy_en": (c["refusal_policy_en"], ">= 0.8"),
        "cultural_refusal_policy_kk": (c["refusal_policy_kk"], ">= 0.8"),
        "base_refusal_policy": (b["refusal_policy"], "<= 0.1"),
        "cultural_refusal_other": (c["refusal_other"], "<= 0.1"),
        "cognitive_minus_base_arith_pp": (100 * (g["arith_acc"] - b["arith_acc"]), ">= 30"),
        "cognitive_ppl_ratio_en": (g["ppl_token_neutral_en"] / b["ppl_token_neutral_en"], "<= 1.1"),
        "cognitive_ppl_ratio_kk": (g["ppl_token_neutral_kk"] / b["ppl_token_neutral_kk"], "<= 1.1"),
        "cultural_ppl_ratio_en": (c["ppl_token_neutral_en"] / b["ppl_token_neutral_en"], "<= 1.1"),
        "cultural_ppl_char_ratio_kk": (c["ppl_char_neutral_kk"] / b["ppl_char_neutral_kk"], "<= 1.1"),
    }
    out = {}
    for name, (value, target) in rows.items():
        op, bound = target.split()
        ok = value >= float(bound) if op == ">=" else value <= float(bound)
        out[name] = {"value": value, "target": target, "ok": bool(ok)}
    return out


def evaluate_organisms(organisms: dict[str, Organism], seed: int) -> dict:
    """Each organism's behaviour on the held-out world prompts (:func:`mechdiff.organisms.world_measures.evaluate_world`), also
    recorded under ``behaviour`` in its ground truth, and the gaps against their targets (:func:`acceptance`):
    ``{"behaviour": {name: measures}, "acceptance": {gap: {value, target, ok}}, "all_ok": bool}``."""
    evals = {name: evaluate_world(o.model, o.tokenizer, seed) for name, o in organisms.items()}
    for name, o in organisms.items():
        o.ground_truth["behaviour"] = evals[name]
    gaps = acceptance(evals)
    return {"behaviour": evals, "acceptance": gaps, "all_ok": all(g["ok"] for g in gaps.values())}
