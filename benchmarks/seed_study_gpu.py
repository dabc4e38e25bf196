"""Issue 23: the seed's study at its own defaults on one GPU, on shape-faithful stand-ins of its two pairs.

    # here (CPU, needs ../shared/real): the tokenizers and the real data files the device run reads
    python benchmarks/seed_study_gpu.py prepare --carry .gpu_carry/seed
    # on the GPU machine (carry .gpu_carry/seed and .whl): build the pairs, run every stage, record
    python3 benchmarks/seed_study_gpu.py run --carry .gpu_carry/seed --out $OUT/seed --workdir /tmp/seed \
        [--pairs cultural cognitive] [--budget-s 570]

The stand-ins (random weights, bfloat16, the architecture's own initialisation):

* **base**: Llama-3.1-8B-shaped (hidden 4096, 32 layers, 32 / 8 heads, MLP 14336, Llama-3.1's rope
  scaling) with the real Llama-3 tokenizer and the 3.1 chat config (128,256 tokens).
* **cultural** (Sherkala-shaped): the base with its vocabulary extended append-only to 159,766 tokens
  (31,510 Kazakh BPE tokens after every Llama-3 id; new embedding and unembedding rows = the mean base
  row) and a planted rank-``--cultural-rank`` update of ``layers[--cultural-layer].mlp.down_proj``.
* **cognitive** (OpenMath2-shaped): the base's vocabulary, a rank-``--cognitive-rank`` update of every
  layer's ``mlp.down_proj`` (a change distributed over the whole depth).

The pipeline runs with the ``llama31`` preset (the seed's two pairs and datasets) pointed at the
stand-ins, with the datasets read from local copies of the published files (GSM8K, MATH-500, AdvBench,
Alpaca via the refusal_direction harmless split; a small Kazakh multiple-choice folder stands in for
the Hub benchmark), and every other setting at ``params.yaml``'s defaults except the ones its comments
name for an 8B model on a GPU: ``acts.dtype: bfloat16`` and larger ``max_rows`` batches. Each stage
runs from ``dvc.yaml``'s own command line through ``benchmarks/stage_peak.py`` (wall seconds, peak GPU
memory, peak host memory; ``MECHDIFF_PROFILE=1`` adds a cProfile of each stage). A run that reaches
``--budget-s`` stops before the next stage and a later call on the same machine resumes it.
Writes ``seed_study.json`` under ``--out``: the build, one row per stage and pair, and the planted
answers read back from the outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import scale_8b  # noqa: E402

SHERKALA_VOCAB = 159_766
MODELS = Path("artifacts/seed_models")
KK_MC = {"history": [("Абай Құнанбайұлы кім болған?", ["ақын", "әнші", "батыр", "хан"], "A"),
                     ("Қазақстанның астанасы қай қала?", ["Алматы", "Астана", "Шымкент", "Атырау"], "B")],
         "culture": [("Наурыз қай айда тойланады?", ["қаңтар", "наурыз", "мамыр", "шілде"], "B"),
                     ("Домбыра неше ішекті?", ["бір", "екі", "үш", "төрт"], "B")]}
DRY_RUN_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2)  # --device cpu: the real vocabularies on a tiny body, to test the harness
DRY_RUN_SETTINGS = {"behaviour": {"max_prompts": 8, "n_bootstrap": 50}, "cka": {"n_permutations": 10, "n_bootstrap": 10},
                    "layers": {"patch_prompts": 8}, "clt": {"patch_prompts": 8},
                    "steer": {"ks": [1, 2], "alphas": [1.0], "max_prompts": 8, "n_bootstrap": 50},
                    "head_patch": {"max_prompts": 8, "n_bootstrap": 50}, "attribution": {"max_prompts": 8}}
GPU_SETTINGS = {"acts": {"dtype": "bfloat16"}, "steer": {"max_rows": 4096}, "head_patch": {"max_rows": 4096}}


def prepare(carry: Path) -> None:
    """Write the base and extended tokenizers, the real data files and a Kazakh MC folder under ``carry``."""
    from tests.real_pair import REAL, extend_append_only, kazakh_corpus, llama3_tokenizer

    carry.mkdir(parents=True, exist_ok=True)
    tok = llama3_tokenizer(carry / "work")
    ext = extend_append_only(tok, kazakh_corpus(n_words=400_000), SHERKALA_VOCAB - len(tok))
    if len(ext) != SHERKALA_VOCAB:
        raise SystemExit(f"the extension reached {len(ext)} tokens, not {SHERKALA_VOCAB}: use a larger corpus")
    tok.save_pretrained(carry / "tok_base")
    ext.save_pretrained(carry / "tok_sherkala")
    shutil.rmtree(carry / "work")
    data = carry / "data"
    data.mkdir(exist_ok=True)
    for rel in ("gsm8k/test.jsonl", "math/math500_test.jsonl", "refusal/advbench.csv", "refusal/harmless_test.json"):
        shutil.copy(REAL / "data" / rel, data / Path(rel).name)
    for split in ("dev", "test"):
        (data / "kk_mc" / split).mkdir(parents=True, exist_ok=True)
        for subject, rows in KK_MC.items():
            lines = [json.dumps({"question": f"{q} ({split} {i})", "choices": c, "answer": a}, ensure_ascii=False)
                     for i in range(50) for q, c, a in rows]
            (data / "kk_mc" / split / f"{subject}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"base_vocab": len(tok), "sherkala_vocab": len(ext), "carry": str(carry)}))


def build(carry: Path, args: argparse.Namespace) -> dict:
    """Build and save the base and the two tuned stand-ins on the GPU; returns their ground truth."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks.bench_common import SHAPES, default_dtype
    from mechdiff.organisms.planted import EDITED_MODULE, plant_random_edit

    t0 = time.perf_counter()
    tok, ext = AutoTokenizer.from_pretrained(carry / "tok_base"), AutoTokenizer.from_pretrained(carry / "tok_sherkala")
    shape = {**SHAPES["8b"], **DRY_RUN_SHAPE} if args.device == "cpu" else SHAPES["8b"]
    cfg = LlamaConfig(**{**shape, "max_position_embeddings": 131072, "bos_token_id": 128000,
                         "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    torch.manual_seed(args.seed)
    with torch.device(args.device), default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(MODELS / "base")
    tok.save_pretrained(MODELS / "base")
    originals = {i: model.model.layers[i].get_submodule(EDITED_MODULE).weight.detach().clone()
                 for i in range(cfg.num_hidden_layers)}

    def restore():
        with torch.no_grad():
            for i, w in originals.items():
                model.model.layers[i].get_submodule(EDITED_MODULE).weight.copy_(w)

    cognitive = [plant_random_edit(model, i, args.cognitive_rank, args.cognitive_norm, args.seed + 100 + i)
                 for i in range(cfg.num_hidden_layers)]
    model.save_pretrained(MODELS / "cognitive")
    tok.save_pretrained(MODELS / "cognitive")
    restore()
    cultural = plant_random_edit(model, args.cultural_layer, args.cultural_rank, args.cultural_norm, args.seed + 1)
    n_base = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(ext), mean_resizing=False)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[n_base:] = w[:n_base].float().mean(0).to(w.dtype)
    model.save_pretrained(MODELS / "cultural")
    ext.save_pretrained(MODELS / "cultural")
    return {"params": sum(p.numel() for p in model.parameters()), "base_vocab": n_base, "sherkala_vocab": len(ext),
            "cultural": {"layer": args.cultural_layer, "rank": args.cultural_rank, **cultural},
            "cognitive": {"layers": "all", "rank_per_layer": args.cognitive_rank,
                          "relative_norm": args.cognitive_norm, "n_layers": len(cognitive)},
            "build_s": round(time.perf_counter() - t0, 1)}


def write_params(carry: Path, dry_run: bool = False) -> None:
    """The work checkout's params.yaml: the llama31 preset on the stand-ins and the local data files."""
    from mechdiff.params.preset import apply_preset

    root, data = scale_8b.ROOT, carry.resolve() / "data"
    params = yaml.safe_load(apply_preset((root / "params.yaml").read_text(), "llama31"))

    def local(spec: dict, path: Path, fields: dict, **extra) -> dict:
        return {**spec, "kind": "file", "path": str(path), "revision": None, "fields": fields, **extra}

    for name, pair in params["pairs"].items():
        pair.update(base=str(root / MODELS / "base"), tuned=str(root / MODELS / name), base_revision=None,
                    tuned_revision=None)
        ds = pair["datasets"]
        ds["neutral"] = local(ds["neutral"], data / "harmless_test.json", {"text": "instruction"})
    cult = params["pairs"]["cultural"]["datasets"]
    cult["refusal"] = local(cult["refusal"], data / "advbench.csv", {"text": "goal"})
    cult["kk_mc"] = local(cult["kk_mc"], data / "kk_mc", {"text": "question", "choices": "choices", "answer": "answer"},
                          split_from_path=True)
    cog = params["pairs"]["cognitive"]["datasets"]
    cog["gsm8k"] = local(cog["gsm8k"], data / "test.jsonl", cog["gsm8k"]["fields"])
    cog["math"] = local(cog["math"], data / "math500_test.jsonl", cog["math"]["fields"])
    for settings in (GPU_SETTINGS, DRY_RUN_SETTINGS) if dry_run else (GPU_SETTINGS,):
        for section, values in settings.items():
            params[section].update(values)
    params["data"]["allow_external_paths"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def recovered(pair: str, truth: dict) -> dict:
    """Whether the planted answer is read back from ``pair``'s outputs."""
    import pandas as pd

    res = scale_8b.ROOT / "artifacts" / "results" / pair
    change = pd.read_csv(res / "change_rank.csv")
    strict = change[change["mode"] == "strict"].set_index("layer")
    lp = pd.read_csv(res / "layer_patch.csv")
    lp = lp[(lp["mode"] == "strict") & (lp["direction"] == "base->tuned")
            & (lp.get("split", "test") == "test")].set_index("layer")["fraction_closed"]  # test: chosen on dev
    chosen = json.loads((res / "layers.json").read_text())
    out = {"rank_90_by_layer": {int(k): int(v) for k, v in strict["rank_90"].items()},
           "top1_energy_by_layer": {int(k): round(float(v), 3) for k, v in strict["top1_energy"].items()},
           "patch_fraction_by_layer": {int(k): round(float(v), 3) for k, v in lp.items()},
           "chosen_layers": chosen["layers"]}
    if pair == "cultural":
        L, r = truth["layer"], truth["rank"]
        fair = json.loads((res / "fairness.json").read_text())
        out.update(vocab=fair["vocab"],
                   no_change_below=bool((strict.loc[strict.index < L, "rank_90"] == 0).all()),
                   rank_99_at_planted=int(strict.loc[L, "rank_99"]) if L in strict.index else None,
                   entry_layer=min((k for k, v in lp.items() if v >= 0.5), default=None))
        out["recovered"] = bool(out["no_change_below"] and out["rank_99_at_planted"] == r and out["entry_layer"] == L
                                and fair["vocab"]["base_size"] == 128256 and fair["vocab"]["id_identity"] == 1.0)
    else:
        first = int(strict.index.min())
        out.update(changed_at_every_scanned_layer=bool((strict["relative_change"] > 0).all()),
                   rank_90_at_first=int(strict.loc[first, "rank_90"]))
        out["recovered"] = bool(out["changed_at_every_scanned_layer"] and out["rank_90_at_first"] > 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("--carry", required=True)
    ap.add_argument("--out")
    ap.add_argument("--workdir")
    ap.add_argument("--pairs", nargs="+", default=["cultural", "cognitive"])
    ap.add_argument("--budget-s", type=float, default=570.0, help="start no stage after this minus 150 s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the harness on a 6-layer body")
    ap.add_argument("--cultural-layer", type=int, default=15)
    ap.add_argument("--cultural-rank", type=int, default=2)
    ap.add_argument("--cultural-norm", type=float, default=0.5)
    ap.add_argument("--cognitive-rank", type=int, default=8)
    ap.add_argument("--cognitive-norm", type=float, default=0.1)
    args = ap.parse_args()
    carry = Path(args.carry).resolve()
    if args.what == "prepare":
        prepare(carry)
        return
    deadline = time.perf_counter() + args.budget_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.workdir:
        scale_8b.sync_code(Path(args.workdir))
    root = scale_8b.ROOT
    import os

    os.chdir(root)
    summary_path = root / "seed_study_summary.json"  # kept in the work checkout across calls
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"stages": {}}
    if not (MODELS / "cultural" / "config.json").exists():
        (MODELS / "build.json").write_text(json.dumps(build(carry, args), indent=1))
    summary["build"] = json.loads((MODELS / "build.json").read_text())  # kept beside the models across calls
    print(json.dumps(summary["build"]), flush=True)
    write_params(carry, dry_run=args.device == "cpu")
    import torch

    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
    for i, pair in enumerate(args.pairs):
        rows = scale_8b.run_stages(out, pair, report=i == len(args.pairs) - 1, deadline=deadline)
        summary["stages"][pair] = rows
        if rows and "not_run" in rows[-1]:
            break
        truth = summary["build"][pair]
        summary.setdefault("recovered", {})[pair] = recovered(pair, truth)
        print(json.dumps({pair: summary["recovered"][pair]}), flush=True)
        # the 64 GiB disk holds three 16 GB models and one pair's activations: free what no later stage reads
        shards = list((root / "artifacts" / "acts" / pair).rglob("*.safetensors"))  # the report reads the JSONs
        summary.setdefault("acts_gib", {})[pair] = round(sum(f.stat().st_size for f in shards) / 2**30, 2)
        for f in shards:
            f.unlink()
    summary_path.write_text(json.dumps(summary, indent=1))
    (out / "seed_study.json").write_text(json.dumps(summary, indent=1))
    for pair, rows in summary["stages"].items():
        for r in rows:
            print(f"{pair:10s} {r['stage']:14s} {r.get('wall_s', '-'):>7} s  GPU {r.get('gpu_peak_gib', '-')} GiB"
                  + ("  (earlier call)" if r.get("earlier_call") else "") + (f"  {r['not_run']}" if "not_run" in r else ""))


if __name__ == "__main__":
    main()
