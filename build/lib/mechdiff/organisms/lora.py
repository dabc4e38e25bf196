"""Low-rank adapters (LoRA) on a Llama model's linear maps: wrap chosen maps of chosen layers (whole, or confined
to some attention heads' slices), train only the adapters, merge them into the weights.

A merged adapter changes its ``nn.Linear`` weight ``[out, in]`` by ``(alpha / r) B A``, a rank ``<= r`` update
(zero outside the confined rows / columns); every other weight stays bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaForCausalLM

from mechdiff.organisms.training import Example, batches, freeze, train


class LoRALinear(nn.Module):
    """``y = W x + (alpha / r) B A x`` with ``A [r, in]`` (random) and ``B [out, r]`` (zero at start).

    ``rows`` / ``cols`` (index tensors) confine the update to those output rows / input columns of ``W``
    (``A [r, len(cols)]``, ``B [len(rows), r]``): e.g. a set of attention heads' slices of ``q_proj`` (rows)
    or of ``o_proj`` (columns). Every other entry of the merged weight stays bit-identical.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator,
                 rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.rows, self.cols = rows, cols
        n_in = base.in_features if cols is None else len(cols)
        n_out = base.out_features if rows is None else len(rows)
        self.A = nn.Parameter(torch.randn(rank, n_in, generator=generator) / math.sqrt(n_in))
        self.B = nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None and self.cols is None:
            return self.base(x) + self.scale * ((x @ self.A.T) @ self.B.T)
        return nn.functional.linear(x, self.base.weight + self.delta(), self.base.bias)

    def delta(self) -> torch.Tensor:
        """The merged weight update ``[out, in]`` of rank ``<= r`` (zero outside ``rows`` x ``cols``)."""
        small = self.scale * (self.B @ self.A)
        if self.rows is None and self.cols is None:
            return small
        full = small.new_zeros(self.base.weight.shape)
        rows = torch.arange(full.shape[0]) if self.rows is None else self.rows
        cols = torch.arange(full.shape[1]) if self.cols is None else self.cols
        return full.index_put((rows[:, None], cols[None, :]), small)


def head_slices(n_heads: int, head_dim: int, heads: Sequence[int]) -> torch.Tensor:
    """Indices ``[len(heads) * head_dim]`` of the query heads ``heads`` in ``q_proj``'s output rows and in
    ``o_proj``'s input columns (head ``h`` is ``[h * head_dim, (h + 1) * head_dim)``; GQA shares only k/v)."""
    if not heads or any(not 0 <= h < n_heads for h in heads) or len(set(heads)) != len(heads):
        raise ValueError(f"heads must be distinct indices in [0, {n_heads}), got {list(heads)}")
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in sorted(heads)])


def add_head_lora(model: LlamaForCausalLM, layers: Sequence[int], heads: Sequence[int], rank: int, seed: int,
                  alpha: float | None = None) -> list[tuple[str, LoRALinear]]:
    """Rank-``rank`` LoRA adapters confined to the query heads ``heads`` of each layer: ``q_proj``'s rows of
    those heads (where they attend) and ``o_proj``'s columns of those heads (what they write). Every other
    head's query, all keys and values (shared by GQA groups) and everything else stay unchanged."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    idx = head_slices(cfg.num_attention_heads, head_dim, heads)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in layers:
        attn = model.model.layers[i].self_attn
        for attr, kw in (("q_proj", {"rows": idx}), ("o_proj", {"cols": idx})):
            lora = LoRALinear(getattr(attn, attr), rank, alpha if alpha is not None else float(rank), g, **kw)
            setattr(attn, attr, lora)
            out.append((f"model.layers.{i}.self_attn.{attr}", lora))
    return out


def add_lora(model: LlamaForCausalLM, layers: Sequence[int], modules: Sequence[str], rank: int,
             seed: int, alpha: float | None = None) -> list[tuple[str, LoRALinear]]:
    """Wrap ``model.model.layers[i].<module>`` (e.g. ``"mlp.down_proj"``, ``"self_attn.o_proj"``) for each
    layer in LoRA adapters; returns ``[(qualified name, adapter)]``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in layers:
        for name in modules:
            parent_name, attr = name.rsplit(".", 1)
            parent = model.model.layers[i].get_submodule(parent_name)
            lora = LoRALinear(getattr(parent, attr), rank, alpha if alpha is not None else float(rank), g)
            setattr(parent, attr, lora)
            out.append((f"model.layers.{i}.{name}", lora))
    return out


def merge_lora(model: LlamaForCausalLM, adapters: Sequence[tuple[str, LoRALinear]]) -> None:
    """Fold every adapter into its base ``nn.Linear`` (``W += scale B A``) and unwrap it."""
    with torch.no_grad():
        for qual, lora in adapters:
            lora.base.weight += lora.delta()
            parent_name, attr = qual.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, lora.base)


def train_lora(model: LlamaForCausalLM, examples: Sequence[Example], layers: Sequence[int], modules: Sequence[str],
               rank: int, steps: int, lr: float, batch_size: int, seed: int, pad_id: int,
               heads: Sequence[int] = ()) -> list[float]:
    """Train a rank-``rank`` LoRA on ``modules`` of ``layers`` and, with ``heads``, on those query heads' slices
    of ``q_proj`` / ``o_proj`` (:func:`add_head_lora`) (nothing else moves) on ``examples`` and merge it into
    the weights; returns the loss curve."""
    freeze(model)
    adapters = add_lora(model, layers, modules, rank, seed)
    if heads:
        adapters += add_head_lora(model, layers, heads, rank, seed + 1)
    params = [q for _, a in adapters for q in (a.A, a.B)]
    losses = train(model, batches(examples, batch_size, steps, seed, pad_id), steps, lr, params)
    merge_lora(model, adapters)
    freeze(model)
    return losses
