"""Cross-build robustness: rebuild the embedded default from scratch for several organism seeds and torch
thread counts, run the whole pipeline for each, and record every headline number and whether each planted
answer and verdict was recovered (issue 24).

    python benchmarks/bench_builds.py --seeds 0 1 2 --threads 1 2 --jobs 2 --out benchmarks/results/builds.json

Each build is a copy of the project's tracked files (no outputs, no DVC cache) under ``--workdir``, with
``organisms.seed`` and ``organisms.threads`` set in its params.yaml, run with ``dvc repro`` (every stage
runs: nothing is cached there). ``--jobs`` builds run side by side, each with its own thread count
(``OMP_NUM_THREADS``), so give it at most cores / max(threads). The organisms always train on the CPU
(``organisms.threads``); the other stages use a GPU when one is visible (``acts.device: auto``), unless
``--cpu-only``. Prints one JSON line per build and writes
``--out``: the builds, the spread (min, max) of every headline number, and whether every check held.
``--markdown`` prints the table that benchmarks/RESULTS.md carries. ``--rebuild-here`` instead times the full
rebuild (`dvc repro -f`) of this checkout, per stage:

    python benchmarks/bench_builds.py --rebuild-here --out benchmarks/results/cpu_rebuild.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = ("cultural", "cognitive", "null")
#: copied into each build: what `dvc repro` needs from a clean clone, nothing it writes
COPIED = (".dvc/config", ".dvcignore", "dvc.yaml", "params.yaml", "pyproject.toml", "stages", "mechdiff",
          "data/sources", "tests")


def set_block_key(params_text: str, block: str, key: str, value) -> str:
    """``params_text`` with ``<block>.<key>`` set to ``value`` (a top-level block's direct child; the line is
    added at the end of the block when absent). Comments elsewhere are kept."""
    lines = params_text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(block)}:\s*(#.*)?$", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\S", lines[i])), len(lines))
    pat = re.compile(rf"^(\s+){re.escape(key)}:\s*[^#\n]*?(\s*#.*)?$")
    for i in range(start + 1, end):
        m = pat.match(lines[i].rstrip("\n"))
        if m:
            lines[i] = f"{m.group(1)}{key}: {value}{m.group(2) or ''}\n"
            return "".join(lines)
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines.insert(end, f"  {key}: {value}\n")
    return "".join(lines)


def make_build(dest: Path, seed: int, threads: int) -> None:
    """A fresh project copy at ``dest`` with the organisms' seed and thread count set."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for rel in COPIED:
        src = ROOT / rel
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / rel)
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    text = set_block_key(set_block_key(text, "organisms", "seed", seed), "organisms", "threads", threads)
    (dest / "params.yaml").write_text(text, encoding="utf-8")
    # no git here: DVC runs without an SCM, and a copy's cache never mixes with the project's
    config = dest / ".dvc" / "config"
    text = config.read_text(encoding="utf-8") if config.exists() else ""
    no_scm = "[core]\n    no_scm = true\n"
    text = text.replace("[core]\n", no_scm, 1) if "[core]\n" in text else text + no_scm
    config.write_text(text, encoding="utf-8")


def stage_times(log: list[tuple[float, str]], t_end: float) -> dict[str, float]:
    """Seconds per stage from `dvc repro`'s timestamped output lines ("Running stage 'x':")."""
    starts = [(t, m.group(1)) for t, line in log if (m := re.match(r"Running stage '([^']+)'", line))]
    return {name: round((starts[i + 1][0] if i + 1 < len(starts) else t_end) - t, 1)
            for i, (t, name) in enumerate(starts)}


def run_build(dest: Path, threads: int, dvc: list[str], cpu_only: bool, force: bool = False,
              log_path: Path | None = None) -> dict:
    """`dvc repro` (``-f`` with ``force``) in ``dest``; wall time, per-stage times and the tail of the output
    on failure. The timestamped output goes to ``log_path`` (default ``dest/repro.log``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", **({"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {}),
           # the stages' `python` is this interpreter
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    t0 = time.time()
    proc = subprocess.Popen([*dvc, "repro", *(["-f"] if force else [])], cwd=dest, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = [(time.time(), line.rstrip("\n")) for line in proc.stdout]
    rc = proc.wait()
    t_end = time.time()
    (log_path or dest / "repro.log").write_text("\n".join(f"{t - t0:8.1f} {line}" for t, line in log) + "\n")
    return {"rc": rc, "wall_s": round(t_end - t0, 1), "stages_s": stage_times(log, t_end),
            "tail": [line for _, line in log[-15:]] if rc else []}


def read_build(dest: Path) -> dict:
    """The build's headline numbers, verdicts and planted-truth checks."""
    from mechdiff.organisms.planted_truth import check_planted_truth
    from stages.report_io import load_planted_run

    run = load_planted_run(dest)
    verdicts = run["verdicts"]
    headline = json.loads((dest / "report" / "headline.json").read_text())
    checks = check_planted_truth(run["results"], run["truth"], verdicts, run["policy_max_k"])
    build = json.loads((dest / "artifacts" / "results" / "build_models.json").read_text())
    return {"verdicts": {p: verdicts[p]["label"] for p in PAIRS}, "headline": headline, "checks": checks,
            "all_recovered": all(c["ok"] for c in checks.values()),
            "pretrain_loss_start": build["training"]["pretrain_loss_start"],
            "organisms_ok": build["all_ok"]}


def acceptance_tests(dest: Path, threads: int) -> dict:
    """The tests that read a build's outputs (the acceptance tests on its results, and the organism and
    steering tests on its models), run against this build."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DVC_NO_ANALYTICS": "1"}
    files = ["tests/test_results_acceptance.py", "tests/test_organisms.py", "tests/test_steering_organisms.py",
             "tests/test_planted_truth.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          cwd=dest, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return {"rc": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-300:],
            "failed": [line for line in lines if line.startswith("FAILED")]}


def one(seed: int, threads: int, workdir: Path, dvc: list[str], cpu_only: bool) -> dict:
    dest = workdir / f"seed{seed}_threads{threads}"
    make_build(dest, seed, threads)
    row = {"seed": seed, "threads": threads, **run_build(dest, threads, dvc, cpu_only)}
    if row["rc"] == 0:
        try:
            row.update(read_build(dest))
        except Exception as err:  # a result a check cannot read is a finding, not a crash of the record
            row.update({"all_recovered": False, "read_error": f"{type(err).__name__}: {err}"})
        row["acceptance_tests"] = acceptance_tests(dest, threads)
    return row


def spread(rows: list[dict]) -> dict[str, dict]:
    """min and max of every headline number over the builds that ran: ``pair.key -> {min, max, n}``."""
    out: dict[str, dict] = {}
    for row in rows:
        for pair, nums in (row.get("headline") or {}).items():
            for key, v in nums.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    d = out.setdefault(f"{pair}.{key}", {"values": []})
                    d["values"].append(v)
    return {k: {"min": min(d["values"]), "max": max(d["values"]), "n": len(d["values"])} for k, d in sorted(out.items())}


def markdown(report: dict) -> str:
    """The builds table and the spread table, as RESULTS.md carries them."""
    rows = report["builds"]
    names = sorted({n for r in rows for n in r.get("checks", {})})
    out = ["| seed | threads | wall | verdicts (cultural / cognitive / null) | planted checks recovered | acceptance tests |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        v = r.get("verdicts") or {}
        ok = sum(c["ok"] for c in r.get("checks", {}).values())
        failed = [n for n, c in r.get("checks", {}).items() if not c["ok"]]
        out.append(f"| {r['seed']} | {r['threads']} | {r['wall_s']:.0f} s | "
                   + (" / ".join(v.get(p, "?") for p in PAIRS) if r["rc"] == 0 else f"failed (rc {r['rc']})")
                   + f" | {ok} of {len(names)}" + (f" (missed: {', '.join(failed)})" if failed else "")
                   + f" | {(r.get('acceptance_tests') or {}).get('summary', 'not run')} |")
    out += ["", "| headline number | min | max |", "| --- | --- | --- |"]
    for k, d in report["spread"].items():
        out.append(f"| {k} | {d['min']:.4g} | {d['max']:.4g} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--read", type=Path, nargs="*", default=[],
                    help="instead of building: read finished builds (project folders) and print their records")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="builds run side by side")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mechdiff_builds"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--cpu-only", action="store_true", help="hide GPUs: every stage on the CPU, as in CI")
    ap.add_argument("--rebuild-here", action="store_true",
                    help="time `dvc repro -f` (every stage) in this checkout instead: wall and per-stage seconds")
    args = ap.parse_args(argv)
    if args.rebuild_here:  # the full rebuild's wall time and per-stage breakdown, in this checkout
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        log = args.out.with_suffix(".log") if args.out else Path(os.devnull)
        row = run_build(ROOT, threads, [sys.executable, "-m", "dvc"], args.cpu_only, force=True, log_path=log)
        families: dict[str, float] = {}
        for name, secs in row["stages_s"].items():
            families[name.split("@")[0]] = round(families.get(name.split("@")[0], 0.0) + secs, 1)
        record = {"benchmark": "rebuild", "machine": platform.machine(), "cpus": os.cpu_count(),
                  "python": platform.python_version(), **row, "by_stage": families}
        print(json.dumps(record, indent=2, sort_keys=True))
        if args.out:
            args.out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return row["rc"]
    if args.read:
        for dest in args.read:
            print(json.dumps({"build": str(dest), **read_build(dest)}, sort_keys=True))
        return 0
    dvc = [sys.executable, "-m", "dvc"]
    combos = [(s, t) for s in args.seeds for t in args.threads]
    rows: list[dict] = []

    def summary() -> dict:
        done = sorted(rows, key=lambda r: (r["seed"], r["threads"]))
        out = {"benchmark": "builds", "machine": platform.machine(), "cpus": os.cpu_count(), "cpu_only": args.cpu_only,
               "python": platform.python_version(), "jobs": args.jobs, "builds": done, "spread": spread(done),
               "every_build_recovered_everything": len(done) == len(combos) and all(r.get("all_recovered") for r in done)}
        try:
            import torch
            out["torch"] = torch.__version__
        except ImportError:
            pass
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(one, s, t, args.workdir, dvc, args.cpu_only) for s, t in combos]
        for fut in concurrent.futures.as_completed(futures):
            row = fut.result()
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("seed", "threads", "rc", "wall_s", "verdicts", "all_recovered")}),
                  flush=True)
            if args.out:  # after every build, so a run cut short keeps what finished
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(summary(), indent=2, sort_keys=True) + "\n")
    report = summary()
    if args.markdown:
        print(markdown(report))
    return 0 if report["every_build_recovered_everything"] else 1


if __name__ == "__main__":
    sys.exit(main())
