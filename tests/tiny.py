"""Tiny random Llama models built from a config (no downloads), for unit tests."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(n_layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = 64,
               seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama in eval mode, float32, eager-free (SDPA) attention."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def padded_batch(seqs: list[list[int]], side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, max_len) ids and attention mask, padded on ``side``."""
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


class _AppendedHead(torch.nn.Module):
    """``lm_head`` plus ``n`` appended token logits that carry exactly ``mass`` of the softmax at every position."""

    def __init__(self, head: torch.nn.Module, n: int, mass: float):
        super().__init__()
        self.head, self.n = head, n
        self.shift = math.log(mass / ((1.0 - mass) * n))  # n e^shift / (1 + n e^shift) = mass

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(h)
        extra = (z.double().logsumexp(-1, keepdim=True) + self.shift).to(z.dtype)
        return torch.cat([z, extra.expand(*z.shape[:-1], self.n)], -1)


def with_appended_tokens(model: LlamaForCausalLM, n: int, mass: float) -> LlamaForCausalLM:
    """``model`` with an extended vocabulary: ``n`` new tokens (ids ``V .. V+n-1``) that together take ``mass``
    of every next-token distribution, leaving the distribution on the old ids unchanged up to renormalisation."""
    model.lm_head = _AppendedHead(model.lm_head, n, mass)
    return model


def spare_bos(base: LlamaForCausalLM, tuned: LlamaForCausalLM, layer: int, bos_id: int = 1) -> LlamaForCausalLM:
    """Project the edit of ``tuned``'s ``layers[layer].mlp.down_proj`` (against ``base``, identical below) off
    the BOS's input to it, in place: the BOS (every prompt's position 0, which attends only to itself) then
    passes the edited block unchanged, so a patch of every position after it carries the whole change."""
    got = {}
    hook = base.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: got.update(a=args[0][0, 0].double()))  # returns None: the input is left as it is
    with torch.no_grad():
        base(torch.tensor([[bos_id]]))
        hook.remove()
        a = got["a"] / got["a"].norm()
        w_b, w_t = base.model.layers[layer].mlp.down_proj.weight, tuned.model.layers[layer].mlp.down_proj.weight
        delta = (w_t - w_b).double()
        w_t.copy_((w_b.double() + delta - torch.outer(delta @ a, a)).float())
    return tuned
