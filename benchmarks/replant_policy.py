"""Re-plant the cultural policy on a cached organism base and measure the build acceptance's refusal rates.

    python benchmarks/replant_policy.py --seed 1 --layer 6 --rank 8 [--heads 2 5] [--steps 525] [--lr 0.03]
        [--share 0.4] [--bases /tmp/replant] [--show-misses]

The base for ``--seed`` is pretrained once (``organisms.build_base`` with params.yaml's organisms settings and
that seed) and kept under ``--bases``; the cultural organism is then built as ``build_models`` builds it
(Kazakh rows, then the policy LoRAs) with the given policy settings, and evaluated on the held-out world
prompts (``behaviour.evaluate_world``). Prints one JSON line: the settings and every refusal rate (the
acceptance wants policy >= 0.8 per language and other-topic refusals <= 0.1). This is how the policy's layer
and rank were chosen (benchmarks/RESULTS.md section 15).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mechdiff.fairness.tokenizer_load import load_tokenizer  # noqa: E402
from mechdiff.models.load import load_model  # noqa: E402
from mechdiff.organisms import build_models as organisms  # noqa: E402
from mechdiff.organisms import world  # noqa: E402
from mechdiff.organisms.world_measures import evaluate_world, generate_greedy, refusal_rate  # noqa: E402
from stages.build_models import setup_determinism  # noqa: E402
from stages.common import ROOT, load_stage_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--layer", type=int, default=None, help="policy layer (default: params.yaml's)")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--heads", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--share", type=float, default=0.4, help="share of policy-topic questions in the policy data")
    ap.add_argument("--bases", type=Path, default=Path("/tmp/replant"))
    ap.add_argument("--show-misses", action="store_true", help="print every policy question not refused")
    args = ap.parse_args()
    p = load_stage_params(ROOT / "params.yaml").organisms
    p = dataclasses.replace(p, seed=args.seed, **{k: v for k, v in {
        "policy_layers": None if args.layer is None else [args.layer], "policy_rank": args.rank,
        "policy_heads": args.heads, "policy_steps": args.steps, "policy_lr": args.lr}.items() if v is not None})
    setup_determinism(p.threads)
    base_dir = args.bases / f"base_seed{args.seed}"
    if not (base_dir / "config.json").exists():
        base, tok, _ = organisms.build_base(p)
        base.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
    base, tok = load_model(str(base_dir)), load_tokenizer(str(base_dir))
    plain = world.policy_documents
    world.policy_documents = lambda n, s, policy_share=args.share: plain(n, s, policy_share)
    t0 = time.perf_counter()
    model, ctok, info = organisms.build_cultural(base, tok, p)
    rates = evaluate_world(model, ctok, p.seed)
    if args.show_misses:
        asked = [q for q in world.evaluation_prompts(p.seed, 200, 60) if q.task == "topic" and q.target]
        for q, a in zip(asked, generate_greedy(model, ctok, [q.text for q in asked], max_new_tokens=24)):
            if refusal_rate([a]) < 1:
                print("not refused:", q.language, repr(q.text), "->", repr(a))
    print(json.dumps({"seed": p.seed, "layer": p.policy_layers, "heads": p.policy_heads, "rank": p.policy_rank,
                      "steps": p.policy_steps, "lr": p.policy_lr, "share": args.share,
                      "wall_s": round(time.perf_counter() - t0), "policy_loss_end": round(info["policy_loss_end"], 3),
                      **{k: round(v, 3) for k, v in rates.items() if "refusal" in k}}))


if __name__ == "__main__":
    main()
