"""RQ3 selection (the steer_select stage's science): controls, side-effect limits, the minimal k on dev held
to the test split, the language and format transfer at the chosen setting, and the effect-vs-k curve.

Rows are the result-table rows of :func:`mechdiff.rq3.steer_sweep.run_layer` (one per setting, split, model and
probe). Control (P29): ``steer.n_random`` random subspaces of equal rank per (layer, k) run as settings of
the same pass; a fitted setting is above noise only when its bootstrap lower bound beats the 95th
percentile of their effects (:func:`mark_controls`). k and alpha are chosen on dev, reported on test
(:func:`select`, P30); side effects: the perplexity increase on neutral text and an accuracy drop
(:func:`side_ok`). Nothing here runs a model, so a changed success threshold reruns no model.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONTROL_QUANTILE", "REPORT_COLUMNS", "choose", "curve_rows", "mark_controls", "reached", "select",
           "side_ok", "transfer_summary"]


#: the quantile of the random draws' effects a fitted subspace must beat (P29)
CONTROL_QUANTILE = 0.95


def mark_controls(rows: list[dict], q: float = CONTROL_QUANTILE) -> list[dict]:
    """Add ``control_effect`` (the ``q`` quantile of the random draws' effects at the same direction, site,
    k, alpha, split and language, so an effect a random subspace of equal rank reaches is noise),
    ``n_control`` (the draws behind it) and ``above_noise`` (fitted rows whose bootstrap lower bound
    exceeds 0 and that control; without draws, 0 alone)."""
    key = ("direction", "site", "k", "alpha", "split", "language")
    draws: dict[tuple, list[float]] = {}
    for r in rows:
        if r["subspace"] == "random":
            draws.setdefault(tuple(r.get(c) for c in key), []).append(r["effect"])
    for r in rows:
        e = np.asarray(draws.get(tuple(r.get(c) for c in key), []), dtype=float)
        e = e[np.isfinite(e)]
        c = float(np.quantile(e, q)) if e.size else float("nan")
        r["control_effect"], r["n_control"] = c, int(e.size)
        r["above_noise"] = bool(r["subspace"] == "fitted" and r["effect_lo"] > max(0.0, c if c == c else 0.0))
    return rows


SIDE_EFFECT_ACCURACY = {"ablate_tuned": "neutral_drop_pp", "steer_base": "mc_drop_pp"}


def side_ok(row: dict, max_drop_pp: float, max_ppl_increase: float) -> bool:
    """Side effects within limits: the perplexity increase on neutral text, and an accuracy drop -- for an
    ablation the pooled neutral accuracy (MC items and the non-target questions), for steering the MC
    accuracy only, because on non-target *questions* a steered base shows the induced behaviour itself
    (its spread is reported as selectivity: ``qa_drop_pp``, ``false_refusal_increase``).

    The drop is measured on few items (on a handful of MC items one flip is 17-25 points, against a limit of
    5), so it blocks when its 95% paired item-bootstrap interval lies above the limit (``<name>_drop_lo``;
    tables without the interval: the point). A NaN measure (e.g. no MC items) does not block."""
    name = SIDE_EFFECT_ACCURACY.get(row["direction"], "neutral_drop_pp")
    lo = row.get(name.replace("_pp", "_lo"))
    drop = row[name] if lo is None or lo != lo else lo
    return not drop > max_drop_pp and not row["ppl_increase"] > max_ppl_increase


def reached(row: dict, target_min: float, max_drop_pp: float, max_ppl_increase: float) -> bool:
    """The effect reaches ``target_min``, stands above its random control (``above_noise``: the bootstrap lower
    bound exceeds 0 and the random draws' quantile, :func:`mark_controls`; tables without it: not required)
    and its side effects are within limits."""
    return bool(row["effect"] >= target_min and row.get("above_noise", True)
                and side_ok(row, max_drop_pp, max_ppl_increase))


def choose(dev: list[dict], target_min: float, max_drop_pp: float, max_ppl_increase: float) -> dict | None:
    """The minimal-k setting among dev rows of one direction and site (fitted subspace): the smallest k
    reaching ``target_min`` with side effects in limits, at the alpha with the largest effect there
    (ties: the smaller alpha). None when no k reaches it."""
    ok = [r for r in dev if reached(r, target_min, max_drop_pp, max_ppl_increase)]
    if not ok:
        return None
    k = min(r["k"] for r in ok)
    return max((r for r in ok if r["k"] == k), key=lambda r: (r["effect"], -r["alpha"]))


#: the columns a chosen setting reports on dev and test (:func:`select`)
REPORT_COLUMNS = ("k", "alpha", "rate", "soft", "effect", "effect_lo", "effect_hi", "soft_effect", "fraction_of_gap",
                  "neutral_acc", "neutral_drop_pp", "neutral_drop_lo", "neutral_drop_hi", "mc_drop_pp", "mc_drop_lo",
                  "mc_drop_hi", "qa_drop_pp", "ppl_increase", "false_refusal_increase", "control_effect", "above_noise")


def _on_test(best: dict, test: list[dict], ctrl: list[dict], target_min: float, max_drop_pp: float,
             max_ppl_increase: float) -> dict:
    """A dev-chosen setting (``best``) and the same (k, alpha) on test, fitted (``test``) and random
    (``ctrl``): the reported columns of each (``random_test``: the draw with the largest test effect, with
    ``n_draws`` and every draw's ``draw_effects``) and ``test_reached`` (the test row meets the same target
    with side effects in limits)."""
    def same(xs):
        return [x for x in xs if (x["k"], x["alpha"]) == (best["k"], best["alpha"])]

    t, c = same(test), same(ctrl)
    top = max(c, key=lambda x: x["effect"]) if c else None
    return {"dev": {c_: best[c_] for c_ in REPORT_COLUMNS},
            "test": {c_: t[0][c_] for c_ in REPORT_COLUMNS} if t else None,
            "random_test": {**{c_: top.get(c_) for c_ in REPORT_COLUMNS}, "n_draws": len(c),
                            "draw_effects": [x["effect"] for x in c]} if c else None,
            "test_reached": bool(t and reached(t[0], target_min, max_drop_pp, max_ppl_increase))}


def select(rows: list[dict], target_min: float, max_drop_pp: float, max_ppl_increase: float) -> dict:
    """Choose on dev, report on test, per direction and site; and the headline ``minimal_k``: the
    smallest k whose fitted subspace both removes the behaviour from the tuned model (ablation at the
    layer) and induces it in the base (some alpha), each on dev with side effects in limits -- a
    steerable handle, not only a part that can be broken. None if no swept k does both.

    The dev choice is then held to the test split, never re-chosen there: ``handle`` is the minimal k's
    setting in both directions (at that k, the alpha with the largest dev effect) with its test and
    random-control rows; ``test_confirmed`` is True when both directions reach the target on test with
    side effects in limits (None without a dev choice), and ``confirmed_minimal_k`` is the minimal k
    when confirmed, else None. Only a confirmed k is evidence of a low-rank handle
    (:func:`mechdiff.verdict.criteria`)."""
    rows = [r for r in rows if r.get("probe", "main") == "main"]
    limits = (target_min, max_drop_pp, max_ppl_increase)

    def pick(r, split, subspace="fitted"):
        return [x for x in rows if x["direction"] == r[0] and x["site"] == r[1] and x["split"] == split
                and x["subspace"] == subspace]

    out, reach = {}, {}
    for direction, site in sorted({(r["direction"], r["site"]) for r in rows if r["direction"] != "clean"}):
        dev = pick((direction, site), "dev")
        reach[(direction, site)] = {r["k"] for r in dev if reached(r, *limits)}
        best = choose(dev, *limits)
        entry = {"minimal_k": None if best is None else best["k"], "alpha": None if best is None else best["alpha"],
                 "max_dev_effect": max((r["effect"] for r in dev), default=float("nan"))}
        if best is not None:
            entry.update(_on_test(best, pick((direction, site), "test"), pick((direction, site), "test", "random"),
                                  *limits))
        out[f"{direction}@{site}"] = entry
    both = reach.get(("ablate_tuned", "layer"), set()) & reach.get(("steer_base", "layer"), set())
    k = min(both) if both else None
    out["minimal_k"] = k
    out["handle"] = None
    if k is not None:
        handle = {"k": k}
        for direction in ("ablate_tuned", "steer_base"):
            key = (direction, "layer")
            best = choose([r for r in pick(key, "dev") if r["k"] == k], *limits)
            handle[f"{direction}@layer"] = {"alpha": best["alpha"], **_on_test(
                best, pick(key, "test"), pick(key, "test", "random"), *limits)}
        handle["test_confirmed"] = all(handle[f"{d}@layer"]["test_reached"] for d in ("ablate_tuned", "steer_base"))
        out["handle"] = handle
    out["test_confirmed"] = None if k is None else out["handle"]["test_confirmed"]
    out["confirmed_minimal_k"] = k if out["test_confirmed"] else None
    return out


def transfer_summary(rows: list[dict], layer: int, choice: dict, notes: dict) -> dict:
    """At the chosen (k, alpha) of each direction: the language transfer (``retained[a->b]`` = effect of
    the a-fitted subspace on b / effect of the b-fitted one on b) and the other-format effect (against
    the same setting's test effect in the primary format)."""
    out = {}
    for name in ("ablate_tuned", "steer_base"):
        pick = choice.get(f"{name}@layer") or {}
        if pick.get("minimal_k") is None:
            out[name] = {"status": "not reached on dev; nothing to transfer"}
            continue
        k, a = pick["minimal_k"], pick["alpha"]
        sel = [r for r in rows if r["layer"] == layer and r["direction"] == name and r["k"] == k and r["alpha"] == a]
        lang = {(r["subspace"][4:], r["language"]): r["effect"] for r in sel if r.get("probe") == "language"}
        fmt = [r for r in sel if str(r.get("probe", "")).startswith("format")]
        out[name] = {"k": k, "alpha": a,
                     "language": {"status": notes.get("language") or "ok",
                                  "effect": {f"{f}->{e}": v for (f, e), v in lang.items()},
                                  "retained": {f"{f}->{e}": v / lang[(e, e)] if abs(lang.get((e, e), 0.0)) > 1e-9
                                               else float("nan") for (f, e), v in lang.items() if f != e}},
                     "format": {"status": notes.get("format") or "ok",
                                **({"template": fmt[0]["probe"][7:], "effect": fmt[0]["effect"],
                                    "primary_test_effect": (pick.get("test") or {}).get("effect")} if fmt else {})}}
    return out


def curve_rows(rows: list[dict], max_drop_pp: float, max_ppl_increase: float) -> list[dict]:
    """Effect vs k on test, for plots: per layer, direction, site, subspace and k, the test row at the alpha
    chosen on dev for that k (the largest dev effect with side effects in limits, else the largest dev
    effect), with ``side_ok`` on test. The random draws (each with its own dev alpha) are pooled into one
    row per k: ``effect`` and the side effects their mean, ``effect_lo`` / ``effect_hi`` the lowest draw
    and the :data:`CONTROL_QUANTILE` quantile of the draws (the control the fitted subspace must beat),
    ``n_draws`` their number (1 for fitted rows)."""
    out, pooled = [], {}
    rows = [r for r in rows if r.get("probe", "main") == "main"]
    keys = sorted({(r["layer"], r["direction"], r["site"], r["subspace"], r["k"], r.get("draw", 0)) for r in rows
                   if r["direction"] != "clean"})
    for key in keys:
        def match(r, split):
            return (r["layer"], r["direction"], r["site"], r["subspace"], r["k"], r.get("draw", 0), r["split"]) == \
                (*key, split)
        dev = [r for r in rows if match(r, "dev")]
        ok = [r for r in dev if side_ok(r, max_drop_pp, max_ppl_increase)] or dev
        alpha = max(ok, key=lambda r: (r["effect"], -r["alpha"]))["alpha"]
        for r in (r for r in rows if match(r, "test") and r["alpha"] == alpha):
            row = {c: r[c] for c in ("layer", "direction", "site", "subspace", "k", "alpha", "effect", "effect_lo",
                                     "effect_hi", "fraction_of_gap", "neutral_drop_pp", "ppl_increase")} \
                | {"side_drop_pp": r[SIDE_EFFECT_ACCURACY[key[1]]], "side_ok": side_ok(r, max_drop_pp, max_ppl_increase),
                   "n_draws": 1}
            if key[3] == "random":
                pooled.setdefault(key[:5], []).append(row)
            else:
                out.append(row)
    for draws in pooled.values():
        e = np.array([d["effect"] for d in draws], dtype=float)
        mean = {c: float(np.mean([d[c] for d in draws])) for c in ("alpha", "fraction_of_gap", "neutral_drop_pp",
                                                                    "ppl_increase", "side_drop_pp")}
        out.append({**draws[0], **mean, "effect": float(e.mean()), "effect_lo": float(e.min()),
                    "effect_hi": float(np.quantile(e, CONTROL_QUANTILE)),
                    "side_ok": all(d["side_ok"] for d in draws), "n_draws": len(draws)})
    return out
