"""Benchmark: the steering sweep with its random-subspace controls measured on the target prompts only
(``mechdiff.rq3.steer_sweep.evaluate_with_controls``) against every measure for every setting (``evaluate``).

Both sides run the same settings (clean, the fitted subspace at every k and alpha, ``--n-random`` random
draws of each) on the same prompts of the built cultural organism pair (``data/filtered/cultural`` and
``artifacts/models``, as ``dvc repro`` leaves them), for the base model (steering) and the tuned model
(ablation), interleaved ``--repeats`` times. The careful baseline is the stage as it was: one batched pass
per measure and chunk of settings, prefix reuse included; only what the controls are measured on differs.

Prints one JSON object: environment, settings, every repeat's seconds, medians, the ratio
``all measures / controls on target`` and the largest differences on the measures both compute (0 for the
greedy judgements; float noise for the log-probabilities).

Usage::

    python benchmarks/bench_controls.py --max-prompts 16 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_common as bc  # noqa: E402
from mechdiff.data.prompt_schema import conform  # noqa: E402
from mechdiff.data.target import as_target  # noqa: E402
from mechdiff.fairness.tokenizer_load import load_tokenizer  # noqa: E402
from mechdiff.models.load import load_model  # noqa: E402
from mechdiff.rq3 import steer_fit  # noqa: E402
from mechdiff.rq3 import steer_measures as sm  # noqa: E402
from mechdiff.rq3 import steer_sweep as st  # noqa: E402
from stages.common import load_stage_params, read_table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-prompts", type=int, default=16, help="prompts per part and split (steer.max_prompts)")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--n-random", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_stage_params(ROOT / "params.yaml")
    pair, p = params.pairs["cultural"], params.steer
    toks = (load_tokenizer(str(ROOT / pair.base)), load_tokenizer(str(ROOT / pair.tuned)))
    models = (load_model(str(ROOT / pair.base)), load_model(str(ROOT / pair.tuned)))
    frame = conform(read_table(ROOT / "data" / "filtered" / "cultural" / "prompts.parquet"))
    parts = st.cap_parts(as_target("refusal").parts(frame), args.max_prompts, params.seed)
    dev = {k: v[v["split"] == "dev"] for k, v in parts.items()}
    sub, _ = steer_fit.fit_subspace(*models, toks, dev, args.layer, ["strict", "base_ids", "aligned"], "refusal",
                                    p.contrast, max(p.ks), 50, params.seed)
    tuned_s, base_s = st.build_settings(sub, args.layer, models[1].config.num_hidden_layers, p.ks, p.alphas, p.mode,
                                        p.all_layers, params.seed, args.n_random)
    cases = []
    for model, tok, col, settings in ((models[0], toks[0], "base_input_ids", base_s),
                                      (models[1], toks[1], "tuned_input_ids", tuned_s)):
        rows = sm.prompt_rows(parts, tok, col, "refusal")
        cases.append((model, tok, rows, settings, sm.n_new_tokens(rows)))

    def every_measure():
        return [sm.evaluate(m, t, r, [iv for _, iv in s], "refusal", n, p.max_rows) for m, t, r, s, n in cases]

    def controls_on_target():
        return [st.evaluate_with_controls(m, t, r, s, "refusal", n, p.max_rows) for m, t, r, s, n in cases]

    secs = bc.round_robin({"every_measure": every_measure, "controls_on_target": controls_on_target}, "cpu",
                          warmup=0, repeats=args.repeats, log=bc.log)
    full, fast = every_measure(), controls_on_target()
    diff = {"hard_mismatches": int(sum((a["hard"] != b["hard"]).sum() for a, b in zip(full, fast))),
            "soft_max_abs": float(max(np.abs(a["soft"] - b["soft"]).max() for a, b in zip(full, fast)))}
    med = {k: bc.median(v) for k, v in secs.items()}
    out = {"benchmark": "bench_controls", **bc.env_info("cpu"), "threads": torch.get_num_threads(),
           "settings": {"base": len(base_s), "tuned": len(tuned_s), "n_random": args.n_random, "ks": list(p.ks),
                        "alphas": list(p.alphas), "max_prompts": args.max_prompts, "layer": args.layer},
           "seconds": secs, "median_s": med, "ratio_every_over_controls": med["every_measure"] / med["controls_on_target"],
           "differences": diff}
    return bc.emit(out, "cpu", args.out)


if __name__ == "__main__":
    main()
