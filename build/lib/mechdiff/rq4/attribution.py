"""RQ4 attribution: how much each attention head contributes to a target scalar, from one backward.

A head is its slice of the ``o_proj`` input (``layers.{i}.attn.o_proj_in``, columns
``[h * head_dim, (h + 1) * head_dim)``; grouped-query-attention safe). Every head of every scanned
layer gets a multiplicative **gate** ``g[l, b, h]`` (float32, a leaf tensor) applied by a forward
pre-hook on ``o_proj``: the hooked activation is upcast to float32, multiplied by its gate and cast
back. With all gates at 1 the forward is unchanged and

    d metric / d g[l, b, h] = sum over positions and head_dim of grad * act    (summed in float32)

is exactly grad x activation of head ``h`` at layer ``l`` for prompt ``b``. One forward and one
``torch.autograd.grad`` give it for all heads, layers and prompts of a batch (no ``retain_grad`` on
views, no per-layer graphs; the graph is freed when the call returns).

Sign convention: ``score`` is the head's first-order *contribution* to the metric, i.e. ``metric(clean)
- metric(head zero-ablated at every position)`` to first order (exact when the metric is linear in the
head's output). The zero-ablation effect is ``-score``.

Integrated gradients (optional) integrate the same gate derivative along ``g = alpha * 1`` for
``alpha`` in (0, 1) (midpoint rule): all scanned heads move from zero ablation to clean together, so
completeness holds: ``sum_{l,h} IG[b, l, h] = metric(g=1) - metric(g=0)`` up to the quadrature error,
which :func:`attribute` reports per prompt.

Target scalars (teacher-forced, float32): the summed log-probability of continuation tokens appended
to the prompt (:func:`continuation_logprob`), on the target class of the pair's target
(:mod:`mechdiff.data.target`): the built-in ``cultural`` target scores the refusal opening of the world
(:data:`mechdiff.organisms.world.REFUSAL_PREFIXES` by language), ``cognitive`` the correct answer, a user target its
measure's continuation. Axes: B batch, T tokens, V vocabulary, L scanned layers, H query heads, D head_dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mechdiff.data.rendering import pad_batch
from mechdiff.data.target import as_target
from mechdiff.errors import MechdiffError
from mechdiff.models.architecture import adapter_for, site_name
from mechdiff.models.collect_acts import length_sorted_batches
from mechdiff.models.hooks import hooks
from mechdiff.models.oom import HalveOnOOM

MetricFn = Callable[[torch.Tensor], torch.Tensor]  # logits (B, T, V) -> metric (B,)


class AttributionError(MechdiffError):
    """Attribution cannot run on these inputs (no target tokens, non-finite gradients)."""


# --------------------------------------------------------------------------------------------------
# target scalar


def select_prompts(prompts: pd.DataFrame, target, mode: str, max_prompts: int, seed: int) -> pd.DataFrame:
    """The target class of the pair's target (:meth:`mechdiff.data.target.Target.parts`) kept in ``mode``; at most
    ``max_prompts``, sampled with ``seed``, table order."""
    t = as_target(target)
    sel = t.parts(prompts[prompts[f"kept_{mode}"].astype(bool)])["target"]
    if sel.empty:
        raise AttributionError(f"no target prompts of the {t.name} target (measure {t.measure}) survive the {mode!r} "
                               "filter; add such a dataset to the pair (or name it in target.prompts) or choose "
                               "another fairness.primary_mode")
    return sel.sample(n=min(max_prompts, len(sel)), random_state=seed).sort_index()


def with_continuation(prompt_ids: Sequence[int], cont_ids: Sequence[int]) -> tuple[list[int], tuple[int, int]]:
    """Prompt ids followed by continuation ids, and the (start, end) token span of the continuation."""
    if not cont_ids:
        raise AttributionError("empty continuation: the target text tokenized to no tokens")
    ids = list(prompt_ids) + list(cont_ids)
    return ids, (len(prompt_ids), len(ids))


def continuation_logprob(logits: torch.Tensor, input_ids: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Summed log-probability (B,) float32 of the tokens in ``spans`` (token ``j`` is scored by the
    logits at ``j - 1``). ``logits`` (B, T, V); only the needed rows are normalised, in float32."""
    rows = torch.cat([torch.full((e - s,), b, dtype=torch.long) for b, (s, e) in enumerate(spans)])
    cols = torch.cat([torch.arange(s, e, dtype=torch.long) for s, e in spans])
    if int(cols.min()) < 1:
        raise AttributionError("a continuation starts at position 0; the prompt must hold at least one token")
    dev = logits.device
    rows, cols = rows.to(dev), cols.to(dev)
    logp = torch.log_softmax(logits[rows, cols - 1].float(), dim=-1)  # (n_tok, V)
    tok = input_ids.to(dev)[rows, cols]
    per_tok = logp.gather(-1, tok[:, None])[:, 0]  # (n_tok,)
    return torch.zeros(len(spans), device=dev, dtype=torch.float32).index_add(0, rows, per_tok)


# --------------------------------------------------------------------------------------------------
# gates and gradients


def gate_o_proj_in_pre_hook(gate: torch.Tensor, n_heads: int):
    """Forward-pre hook multiplying each head's slice of ``o_proj``'s input by ``gate`` (B, H), in float32."""

    def hook(_module, args):
        x = args[0]
        b, t, d = x.shape
        xf = x.float().reshape(b, t, n_heads, d // n_heads)  # (B, T, H, D)
        y = (xf * gate.to(x.device)[:, None, :, None]).reshape(b, t, d).to(x.dtype)
        return (y,) + tuple(args[1:])

    return hook


def _gated_forward(model, input_ids, attention_mask, metric_fn: MetricFn, gates: torch.Tensor,
                   layers: Sequence[int]) -> torch.Tensor:
    adapter = adapter_for(model)
    pre = [(adapter.module(site_name(layer, "attn.o_proj_in")), gate_o_proj_in_pre_hook(gates[i], adapter.n_heads))
           for i, layer in enumerate(layers)]
    with hooks(pre=pre):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return metric_fn(logits)


def head_gradients(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, metric_fn: MetricFn,
                   layers: Sequence[int], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and one backward with every head of ``layers`` gated at ``scale``.

    Returns the metric (B,) and ``d metric / d gate`` (B, L, H), both float32 on the host. At
    ``scale = 1`` the latter is grad x activation per head (module docstring).
    """
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    n = input_ids.shape[0]
    gates = torch.full((len(layers), n, adapter.n_heads), float(scale), dtype=torch.float32, device=device,
                       requires_grad=True)  # (L, B, H) leaf
    with torch.enable_grad():
        metric = _gated_forward(model, input_ids.to(device), attention_mask.to(device), metric_fn, gates, layers)
        (grad,) = torch.autograd.grad(metric.sum(), gates)  # prompts are independent: row b only feeds metric b
    out = grad.detach().permute(1, 0, 2).float().cpu()  # (B, L, H)
    if not torch.isfinite(out).all() or not torch.isfinite(metric).all():
        raise AttributionError("non-finite metric or gradient in attribution; check the model dtype "
                               "(use float32 or bfloat16, not float16) and the prompts")
    return metric.detach().float().cpu(), out


@torch.no_grad()
def gated_metric(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, metric_fn: MetricFn,
                 layers: Sequence[int], scale: float) -> torch.Tensor:
    """The metric (B,) with every head of ``layers`` scaled by ``scale`` (0 = all zero-ablated)."""
    device = next(model.parameters()).device
    gates = torch.full((len(layers), input_ids.shape[0], adapter_for(model).n_heads), float(scale),
                       dtype=torch.float32, device=device)
    return _gated_forward(model, input_ids.to(device), attention_mask.to(device), metric_fn, gates,
                          layers).float().cpu()


def integrated_gradients(model, input_ids, attention_mask, metric_fn: MetricFn, layers: Sequence[int],
                         n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IG per head (B, L, H) from all-heads-zero to clean (midpoint rule, ``n_steps`` forward+backward
    pairs) and the metric with every scanned head zero-ablated (B,), for the completeness check."""
    if n_steps < 1:
        raise AttributionError(f"integrated gradients need n_steps >= 1, got {n_steps}")
    total = None
    for k in range(n_steps):
        _, g = head_gradients(model, input_ids, attention_mask, metric_fn, layers, scale=(k + 0.5) / n_steps)
        total = g if total is None else total + g
    return total / n_steps, gated_metric(model, input_ids, attention_mask, metric_fn, layers, 0.0)


# --------------------------------------------------------------------------------------------------
# prompts -> per-prompt scores


@dataclass(frozen=True)
class Attribution:
    """Per-prompt results of one model, in the order of the prompts given.

    ``metric`` (P,): the clean target scalar; ``score`` (P, L, H): grad x activation; ``ig`` (P, L, H)
    and ``metric_ablated`` (P,) (every scanned head zero-ablated) only with integrated gradients.
    """

    layers: tuple[int, ...]
    metric: np.ndarray
    score: np.ndarray
    ig: np.ndarray | None = None
    metric_ablated: np.ndarray | None = None


def _attribute_batch(model, ids: Sequence[Sequence[int]], spans, pad_id: int, layers, ig_steps: int) -> dict:
    input_ids, mask = pad_batch(ids, pad_id, "right")

    def metric_fn(logits):
        return continuation_logprob(logits, input_ids, spans)

    metric, score = head_gradients(model, input_ids, mask, metric_fn, layers)
    out = {"metric": metric, "score": score}
    if ig_steps:
        out["ig"], out["metric_ablated"] = integrated_gradients(model, input_ids, mask, metric_fn, layers, ig_steps)
    return out


def attribute(model, prompt_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]], pad_id: int,
              layers: Sequence[int], batch_size: int, ig_steps: int = 0) -> Attribution:
    """Head scores of ``model`` for each prompt's continuation log-probability.

    Prompts go in length-sorted, right-padded batches; one forward and one backward per batch give
    every head of every layer in ``layers`` (plus ``ig_steps`` more pairs and one forward for IG).
    An out-of-memory batch is halved and retried. Results come back in the input order.
    """
    pairs = [with_continuation(p, c) for p, c in zip(prompt_ids, cont_ids, strict=True)]
    layers = tuple(int(x) for x in layers)

    def run(idx: list[int]) -> dict:
        return _attribute_batch(model, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], pad_id, layers,
                                ig_steps)

    parts, halve = [], HalveOnOOM(what="attribution batch")
    for batch in length_sorted_batches([len(p[0]) for p in pairs], batch_size):
        parts += halve(run, batch)
    order = np.concatenate([np.asarray(idx) for idx, _ in parts])
    inv = np.argsort(order, kind="stable")

    def gather(key: str) -> np.ndarray | None:
        if key not in parts[0][1]:
            return None
        return torch.cat([res[key] for _, res in parts]).numpy()[inv]

    return Attribution(layers, gather("metric"), gather("score"), gather("ig"), gather("metric_ablated"))


def score_table(ids: Sequence[str], model_name: str, result: Attribution) -> pd.DataFrame:
    """Long table: one row per (prompt, layer, head) with ``id, model, layer, head, score, metric``
    (plus ``score_ig`` and ``metric_ablated`` with integrated gradients)."""
    n, n_layers, n_heads = result.score.shape
    p_idx, l_idx, h_idx = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n_layers), np.arange(n_heads),
                                                         indexing="ij"))
    cols = {"id": np.asarray(ids, dtype=object)[p_idx], "model": model_name,
            "layer": np.asarray(result.layers, dtype=np.int64)[l_idx], "head": h_idx.astype(np.int64),
            "score": result.score.ravel().astype(np.float64), "metric": result.metric[p_idx].astype(np.float64)}
    if result.ig is not None:
        cols["score_ig"] = result.ig.ravel().astype(np.float64)
        cols["metric_ablated"] = result.metric_ablated[p_idx].astype(np.float64)
    return pd.DataFrame(cols)
