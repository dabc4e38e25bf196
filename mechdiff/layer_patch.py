"""RQ1 cross-model layer patching and the choice of layers for RQ2-RQ4.

At scanned layer L, the base model's residual (after block L) is written into the tuned model at the
aligned positions (``base->tuned``), and the tuned residual into the base (``tuned->base``); position 0
(the BOS or attention sink) is never written (:func:`patched_positions`). The
next-token distributions at the last content token are compared over the shared vocabulary:
``gap`` = KL(P_base || P_tuned) and ``remaining`` = KL(P_base || P_patched) for ``base->tuned``;
for ``tuned->base`` both are measured from P_tuned (``gap`` = KL(P_tuned || P_base)), and ``fraction_closed = 1 - remaining / gap`` (``nan`` without a gap).
The KLs are on the shared vocabulary (renormalised there), so each row also carries the probability mass
that masking dropped (:mod:`mechdiff.masking`): ``lost_base``, ``lost_tuned`` (the unpatched models) and
``lost_patched`` (the patched model), each a share of the model's next-token mass in [0, 1].

Optional standardisation (``layers.patch_standardise``): the patched state is moved from the source
model's statistics to the destination's, ``(h - mu_src) / sd_src * sd_dst + mu_dst`` per dimension, with
means and standard deviations from a calibration batch (:func:`calibration_stats`), so a patch between
models whose residual scales differ (e.g. after a long fine-tune) is not judged by a scale mismatch.

The coarse scan is refined to the exact entry by :mod:`mechdiff.layer_refine`. Layers are chosen on
dev prompts only and the patch is reported on test prompts (:func:`split_sample`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mechdiff.architecture import site_name
from mechdiff.capture import capture
from mechdiff.collect import input_ids_for
from mechdiff.masking import shared_kl
from mechdiff.patching import bootstrap_closed, fraction_closed, run_patched
from mechdiff.rendering import pad_batch
from mechdiff.stats import percentile_interval

DIRECTIONS = ("base->tuned", "tuned->base")
#: mass outside the shared vocabulary that the masked KLs drop (fractions of each model's next-token mass)
LOST = ("lost_base", "lost_tuned", "lost_patched")


def row_positions(pairs: Sequence[np.ndarray], col: int) -> torch.Tensor:
    """(n, 2) rows (batch, token) from per-prompt (n_k, 2) pair arrays, column ``col`` (0 base, 1 tuned)."""
    return torch.cat([torch.stack([torch.full((len(p),), k), torch.as_tensor(p[:, col], dtype=torch.long)], 1)
                      for k, p in enumerate(pairs)])


def content_positions(row: Mapping, mode: str) -> np.ndarray:
    """(n_k, 2) compared content positions (base, tuned) of one filtered prompt in ``mode``, last content
    token last; position 0 (the BOS, or the first token: the attention sink) is never included."""
    pairs = np.stack([np.asarray(row[f"pos_base_{mode}"]), np.asarray(row[f"pos_tuned_{mode}"])], 1)
    return pairs[pairs[:, 0] > 0].astype(np.int64)


def patched_positions(row: Mapping, mode: str) -> np.ndarray:
    """(n_k, 2) positions (base, tuned) the layer patch writes in ``mode``: every position after the first
    when both models read the same tokens (``strict``, ``base_ids``), else the aligned content positions
    (:func:`content_positions`). Never position 0, the BOS or attention sink: its state carries no prompt
    content, and writing it would move every later position's attention baseline."""
    base, tuned = input_ids_for(row, mode)
    if mode in ("strict", "base_ids"):
        return np.stack([np.arange(1, len(base)), np.arange(1, len(tuned))], 1).astype(np.int64)
    return content_positions(row, mode)


#: per layer, ((mean, sd) of the base, (mean, sd) of the tuned), each (d,) float64
Stats = dict[int, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]


Batches = Sequence[tuple[tuple[list, list], Sequence[np.ndarray]]]


@torch.no_grad()
def _batch_states(base, tuned, batches: Batches, layers: Sequence[int], pad_ids: tuple[int, int]):
    """Per batch ``(ids, pairs)`` (as in :func:`patch_batch`): ``{layer: (H_base, H_tuned)}``, each
    (sum n_k, d), the residuals after block ``layer`` at the batch's aligned positions, row i paired."""
    for ids, pairs in batches:
        acts = []
        for s, model in enumerate((base, tuned)):
            ids_s, mask = pad_batch(ids[s], pad_ids[s], "right")
            acts.append(capture(model, ids_s, mask, [site_name(x) for x in layers], row_positions(pairs, s)))
        yield {layer: (acts[0][site_name(layer)], acts[1][site_name(layer)]) for layer in layers}


def paired_states(base, tuned, batches: Batches, layers: Sequence[int],
                  pad_ids: tuple[int, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (H_base, H_tuned)}`` (n, d) each over all ``batches`` (rows in batch order, paired)."""
    if not layers:
        return {}
    parts = list(_batch_states(base, tuned, batches, layers, pad_ids))
    return {layer: tuple(torch.cat([p[layer][s] for p in parts]) for s in (0, 1)) for layer in layers}


def calibration_stats(base, tuned, batches: Batches, layers: Sequence[int], pad_ids: tuple[int, int]) -> Stats:
    """Per-dimension mean and standard deviation of each model's residual after each of ``layers`` over
    the compared positions of the calibration ``batches`` (each ``(ids, pairs)`` as in :func:`patch_batch`)."""
    sums: dict = {}
    for states in _batch_states(base, tuned, batches, layers, pad_ids):
        for layer in layers:
            for s in (0, 1):
                h = states[layer][s].double()
                n, s1, s2 = sums.get((layer, s), (0, 0.0, 0.0))
                sums[(layer, s)] = (n + len(h), s1 + h.sum(0), s2 + (h * h).sum(0))
    out = {}
    for layer in layers:
        pair = []
        for s in (0, 1):
            n, s1, s2 = sums[(layer, s)]
            mu = s1 / n
            pair.append((mu, (s2 / n - mu * mu).clamp(min=0).sqrt().clamp(min=1e-8)))
        out[layer] = tuple(pair)
    return out


def restandardise(h: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """``(h - mu_src) / sd_src * sd_dst + mu_dst`` per dimension, in ``h``'s dtype; h (n, d)."""
    (mu_s, sd_s), (mu_d, sd_d) = src, dst
    return ((h.double() - mu_s) / sd_s * sd_d + mu_d).to(h.dtype)


@torch.no_grad()
def patch_batch(base, tuned, ids: tuple[list, list], pairs: Sequence[np.ndarray], layers: Sequence[int],
                id_map, pad_ids: tuple[int, int], stats: Stats | None = None) -> list[dict]:
    """Per prompt, layer and direction: gap, remaining KL (nats) and fraction closed at the last pair, with
    the mass outside the shared vocabulary (``lost_base``, ``lost_tuned``, ``lost_patched``, fractions).

    ``ids`` = (base ids per prompt, tuned ids per prompt); ``pairs[k]`` (n_k, 2) aligned positions
    (base, tuned) of prompt k with the last content token last; ``stats`` (:func:`calibration_stats`)
    restandardises the patched states from the source model's statistics to the destination's.
    """
    models = (base, tuned)
    inputs = [pad_batch(ids[s], pad_ids[s], "right") for s in (0, 1)]
    pos = [row_positions(pairs, s) for s in (0, 1)]
    last = [torch.stack([torch.arange(len(pairs)), torch.as_tensor([p[-1, s] for p in pairs])], 1) for s in (0, 1)]
    sites = [site_name(layer) for layer in layers]
    acts, logits = [], []
    for s in (0, 1):
        a, lg = capture(models[s], *inputs[s], sites, pos[s], return_logits=True)
        acts.append(a)
        logits.append(lg[last_rows(pairs)])
    clean = shared_kl(logits[0], logits[1], id_map, direction="base||tuned")  # KL(P_base || P_tuned), lost mass
    gaps = (clean.kl, shared_kl(logits[0], logits[1], id_map, direction="tuned||base").kl)  # KL(P_tuned || P_base)
    rows = []
    for layer, site in zip(layers, sites):
        for d, (src, dst) in enumerate(((0, 1), (1, 0))):
            state = acts[src][site]
            if stats is not None:
                state = restandardise(state, stats[layer][src], stats[layer][dst])
            patched = run_patched(models[dst], *inputs[dst], site, pos[dst], state, last[dst])
            pair_logits = (logits[0], patched) if dst == 1 else (patched, logits[1])
            direction = "base||tuned" if dst == 1 else "tuned||base"
            out = shared_kl(*pair_logits, id_map, direction=direction)
            remaining, lost_patched = out.kl, (out.lost_tuned if dst == 1 else out.lost_base)
            for k in range(len(pairs)):
                rows.append({"prompt": k, "layer": layer, "direction": DIRECTIONS[d], "gap": float(gaps[d][k]),
                             "remaining": float(remaining[k]), "lost_base": float(clean.lost_base[k]),
                             "lost_tuned": float(clean.lost_tuned[k]), "lost_patched": float(lost_patched[k])})
    return rows


def last_rows(pairs: Sequence[np.ndarray]) -> torch.Tensor:
    """Row index of each prompt's last pair inside the concatenated position list."""
    return torch.as_tensor(np.cumsum([len(p) for p in pairs]) - 1)


def summarise(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Mean gap, remaining KL, fraction of the mean gap closed and mean mass outside the shared vocabulary
    (``lost_*``, where the rows have it), per layer and direction, with the fraction's percentile interval
    over prompts (``fraction_closed_lo`` / ``_hi``, level ``level``; nan without a gap): prompts (``id``,
    else ``prompt``) are resampled with replacement, the same resample for every layer and direction
    (:func:`mechdiff.patching.bootstrap_closed`; prompts in sorted order, so two calls on the same prompts
    at other layers draw the same resamples)."""
    cols = ["gap", "remaining"] + [c for c in LOST if c in rows]
    out = rows.groupby(["direction", "layer"], sort=True)[cols].mean().reset_index()
    out["fraction_closed"] = [fraction_closed(g, r) for g, r in zip(out["gap"], out["remaining"])]
    key = "id" if "id" in rows else "prompt"
    wide = rows.pivot_table(index=key, columns=["direction", "layer"], values=["gap", "remaining"], aggfunc="mean")
    cells = list(zip(out["direction"], out["layer"]))
    gap, rem = wide["gap"][cells].to_numpy(), wide["remaining"][cells].to_numpy()
    if np.isnan(gap).any() or np.isnan(rem).any():
        raise ValueError("layer-patch rows must hold every prompt at every layer and direction (paired prompts)")
    bounds = np.array([percentile_interval(col, level) for col in bootstrap_closed(gap, rem, n_boot, seed).T]).reshape(-1, 2)
    out["fraction_closed_lo"], out["fraction_closed_hi"] = bounds[:, 0], bounds[:, 1]
    return out


def rise_intervals(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per direction and patched layer (in layer order): ``rise``, the fraction of the mean gap closed there
    minus the fraction at the layer patched before (0 before the first), with its paired prompt-bootstrap
    interval ``rise_lo`` / ``rise_hi`` (level ``level``): every layer's fraction is computed on the same
    prompt resamples (:func:`mechdiff.patching.bootstrap_closed`) and the rise is taken per resample. The two
    fractions of neighbouring layers move together over prompts, so the rise's interval is as narrow as the
    prompts allow, where the difference of two marginal intervals would add their widths. ``rows`` are
    per-prompt rows of :func:`patch_batch` (``id`` or ``prompt``, ``direction``, ``layer``, ``gap``,
    ``remaining``), every prompt at every layer."""
    key = "id" if "id" in rows else "prompt"
    out = []
    for direction, d in rows.groupby("direction", sort=True):
        gap = d.pivot_table(index=key, columns="layer", values="gap", aggfunc="mean")
        rem = d.pivot_table(index=key, columns="layer", values="remaining", aggfunc="mean")[gap.columns]
        if gap.isna().any().any() or rem.isna().any().any():
            raise ValueError("layer-patch rows must hold every prompt at every layer (paired prompts)")
        draws = bootstrap_closed(gap.to_numpy(), rem.to_numpy(), n_boot, seed)  # (n_boot, n_layers)
        closed = [fraction_closed(g, r) for g, r in zip(gap.mean(0), rem.mean(0))]
        prev, prev_draws = 0.0, np.zeros(n_boot)
        for j, layer in enumerate(gap.columns):
            lo, hi = percentile_interval(draws[:, j] - prev_draws, level)
            out.append({"direction": direction, "layer": int(layer), "rise": closed[j] - prev, "rise_lo": lo,
                        "rise_hi": hi})
            prev, prev_draws = closed[j], draws[:, j]
    return pd.DataFrame(out, columns=["direction", "layer", "rise", "rise_lo", "rise_hi"])


def split_sample(table: pd.DataFrame, kept: str, split: str, n: int, seed: int) -> pd.DataFrame:
    """At most ``n`` prompts of ``split`` (``dev`` chooses the layers, ``test`` reports them) whose bool
    column ``kept`` is set: a seeded sample in index order, drawn from that split's rows alone, so the other
    split's rows never change it."""
    rows = table[table[kept] & (table["split"] == split)]
    return rows.sample(n=min(n, len(rows)), random_state=seed).sort_index()


def choose_layers(summary: pd.DataFrame, cka: dict[int, float], n_choose: int, threshold: float = 0.5) -> dict:
    """The rule for RQ2-RQ4 layers: the first patched layer whose base->tuned patch closes at least
    ``threshold`` of the gap (where the change has entered), then the layer of lowest CKA not yet chosen.

    Without any gap (a null pair) the lowest-CKA layers are chosen. Returns the layers and the reasons.
    """
    fwd = summary[summary["direction"] == "base->tuned"].sort_values("layer")
    chosen, reasons = [], []
    entered = fwd[fwd["fraction_closed"] >= threshold]
    if len(entered):
        first = entered.iloc[0]
        chosen.append(int(first["layer"]))
        ci = (f" [{first['fraction_closed_lo']:.2f}, {first['fraction_closed_hi']:.2f}]"
              if "fraction_closed_lo" in entered else "")
        reasons.append(f"first layer where the base->tuned patch closes >= {threshold:.0%} of the gap "
                       f"({first['fraction_closed']:.2f}{ci}, 95% prompt-bootstrap interval)" if ci else
                       f"first layer where the base->tuned patch closes >= {threshold:.0%} of the gap")
    for layer in sorted(cka, key=lambda k: (cka[k], k)):
        if len(chosen) >= n_choose:
            break
        if layer not in chosen:
            chosen.append(int(layer))
            reasons.append("lowest debiased CKA among the remaining scanned layers")
    return {"layers": chosen, "reasons": reasons}
