"""RQ1 cross-model layer patching and the choice of layers for RQ2-RQ4.

At scanned layer L, the base model's residual (after block L) is written into the tuned model at the
aligned positions (``base->tuned``), and the tuned residual into the base (``tuned->base``); position 0
(the BOS or attention sink) is never written (:func:`patched_positions`). The
next-token distributions at the last content token are compared over the shared vocabulary:
``gap`` = KL(P_base || P_tuned) and ``remaining`` = KL(P_base || P_patched) for ``base->tuned``;
for ``tuned->base`` both are measured from P_tuned (``gap`` = KL(P_tuned || P_base)), and ``fraction_closed = 1 - remaining / gap`` (``nan`` without a gap).
The KLs are on the shared vocabulary (renormalised there), so each row also carries the probability mass
that masking dropped (:mod:`mechdiff.fairness.masking`): ``lost_base``, ``lost_tuned`` (the unpatched models) and
``lost_patched`` (the patched model), each a share of the model's next-token mass in [0, 1].

Optional standardisation (``layers.patch_standardise``): the patched state is moved from the source
model's statistics to the destination's, ``(h - mu_src) / sd_src * sd_dst + mu_dst`` per dimension, with
means and standard deviations from a calibration batch (:func:`calibration_stats`), so a patch between
models whose residual scales differ (e.g. after a long fine-tune) is not judged by a scale mismatch.

The coarse scan is refined to the exact entry by :mod:`mechdiff.rq1.layer_refine`, which also chooses the
layers. Layers are chosen on dev prompts only and the patch is reported on test prompts
(:func:`split_sample`); :func:`scan_pair` runs the whole scan of one pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mechdiff.data.rendering import pad_batch
from mechdiff.errors import MechdiffError
from mechdiff.fairness.masking import shared_kl
from mechdiff.models.architecture import site_name
from mechdiff.models.capture import capture
from mechdiff.models.collect_acts import input_ids_for, length_sorted_batches
from mechdiff.models.patching import bootstrap_closed, fraction_closed, run_patched
from mechdiff.rq1.change_rank import change_row
from mechdiff.rq1.layer_refine import refine_scan
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
    (:func:`mechdiff.models.patching.bootstrap_closed`; prompts in sorted order, so two calls on the same prompts
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
    prompt resamples (:func:`mechdiff.models.patching.bootstrap_closed`) and the rise is taken per resample. The two
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


class LayerPatchError(MechdiffError):
    """A layer-patch scan that cannot run on this pair's prompts (no prompt of a split kept in a mode)."""


def patch_batches(records: Sequence[Mapping], mode: str, batch_size: int, pairs_of=patched_positions):
    """Length-sorted batches of filtered prompt rows in ``mode``: ``(records, (base ids, tuned ids), pairs)``,
    ``pairs[k]`` the (n_k, 2) positions ``pairs_of(record, mode)`` (the patched ones by default)."""
    for batch in length_sorted_batches([len(r["base_input_ids"]) for r in records], batch_size):
        recs = [records[i] for i in batch]
        ids = tuple(list(x) for x in zip(*(input_ids_for(r, mode) for r in recs)))
        yield recs, ids, [pairs_of(r, mode) for r in recs]


def scan_pair(models: Sequence, table: pd.DataFrame, id_map: tuple, pads: tuple[int, int], cka: dict[int, float],
              layers: list[int], lp, mode: str, modes: Sequence[str], seed: int, batch_size: int,
              name: str) -> tuple[pd.DataFrame, dict]:
    """The layer-patch scan of one pair: ``(table, chosen)``.

    ``models`` (base, tuned); ``table`` the filtered prompts; ``id_map`` (base ids, tuned ids) of the shared
    vocabulary; ``cka`` ``{layer: debiased CKA}`` of ``mode``; ``layers`` the coarse scan; ``lp`` params
    ``layers``; ``modes`` params ``fairness.modes``. The coarse scan in ``mode`` is refined on dev prompts
    (:func:`mechdiff.rq1.layer_refine.refine_scan`), which chooses the layers; every patched layer is then patched
    again on test prompts (and in ``aligned`` beside the primary mode). ``table`` has :func:`summarise` rows
    per mode, split, direction and layer with ``scan`` (coarse / refined) and the paired rise intervals
    (:func:`rise_intervals`); ``chosen`` the layers with their reasons, the scan and the change rank at each
    entry (:func:`mechdiff.rq1.change_rank.change_row` of both models' states at the dev prompts' content
    positions). ``name``: the pair, for messages.
    """
    def sample(m: str, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        kept = table[table[f"kept_{m}"] & (table["split"] == split)]
        return kept, split_sample(table, f"kept_{m}", split, lp.patch_prompts, seed)

    per_prompt: dict[tuple[str, str], list[pd.DataFrame]] = {}  # (mode, split) -> per-prompt rows of every call

    def patch_mode(m: str, at: list[int], split: str = "dev") -> pd.DataFrame:
        """Patching in comparison mode ``m`` at layers ``at`` on ``split``: summary rows per direction and layer."""
        kept, prompts = sample(m, split)
        if prompts.empty:
            raise LayerPatchError(f"layer_patch@{name}: no {split} prompt kept in mode {m}; move data.dev_fraction")
        stats = None
        if lp.patch_standardise:  # calibration prompts: kept prompts outside the patched sample (else the sample)
            rest = kept[~kept["id"].isin(set(prompts["id"]))]
            calib = (rest if len(rest) else prompts).head(lp.calibration_prompts).to_dict("records")
            stats = calibration_stats(*models, [(ids, pairs) for _, ids, pairs in patch_batches(calib, m, batch_size)],
                                      at, pads)
        rows = []
        for recs, ids, pairs in patch_batches(prompts.to_dict("records"), m, batch_size):
            out = patch_batch(*models, ids, pairs, at, id_map, pads, stats)
            rows += [{**o, "id": recs[o["prompt"]]["id"]} for o in out]
        per_prompt.setdefault((m, split), []).append(pd.DataFrame(rows))
        return summarise(pd.DataFrame(rows), lp.n_bootstrap, seed).assign(mode=m, split=split)

    # coarse scan in the primary mode, then every layer inside the brackets around the entry and the chosen
    # layers, until the layer before each entry was patched (the entry is then exact); dev prompts only
    summary, chosen, entries = refine_scan(lambda at: patch_mode(mode, at), layers, cka, lp.n_choose,
                                           lp.entry_threshold)
    patched = sorted(int(x) for x in summary["layer"].unique())
    refined = [x for x in patched if x not in layers]
    # the primary mode chooses the layers; `aligned` is reported beside it (issue: same curves in both modes)
    extra = [m for m in ("aligned",) if m != mode and m in modes and table[f"kept_{m}"].any()]
    both = pd.concat([summary, patch_mode(mode, patched, "test")] + [patch_mode(m, patched, "test") for m in extra],
                     ignore_index=True)
    both["scan"] = np.where(both["layer"].isin(layers), "coarse", "refined")
    # each layer's rise from the layer patched before it, with a paired interval over the same prompt resamples
    rises = pd.concat([rise_intervals(pd.concat(frames, ignore_index=True), lp.n_bootstrap, seed)
                       .assign(mode=m, split=sp) for (m, sp), frames in per_prompt.items()], ignore_index=True)
    both = both.merge(rises, on=["mode", "split", "direction", "layer"], how="left")
    # the change rank at each entry, from both models' states at the patched prompts' content positions
    dev = sample(mode, "dev")[1].to_dict("records")
    states = paired_states(*models, [(ids, pairs) for _, ids, pairs in
                                     patch_batches(dev, mode, batch_size, content_positions)], entries, pads)
    entry = [{"layer": x, "below": max([y for y in patched if y < x], default=None), **change_row(*states[x])}
             for x in entries]
    chosen = {**chosen, "mode": mode, "chosen_on": "dev", "scan": layers, "stride": lp.scan_stride, "refined": refined,
              "entry": entry}
    return both, chosen
