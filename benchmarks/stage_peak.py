"""Run one stage module in this process and record its peak GPU memory.

    python benchmarks/stage_peak.py PEAK.json stages.collect_acts --pair x ...

With ``MECHDIFF_PROFILE=1`` the stage runs under cProfile (GPU work shows where the host waits for it) and
the top 40 functions by cumulative time go to PEAK_profile.txt. Writes ``{"gpu_peak_gib": max over devices of torch.cuda.max_memory_allocated, "gpu_peak_by_device": [...]}``
to PEAK.json when the stage ends (also on failure), then exits with the stage's status.
"""

import json
import os
import runpy
import sys

import torch


def main() -> int:
    peak_path, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.argv = [module, *args]
    sys.path.insert(0, os.getcwd())  # the repository root, as `python -m` would have it
    code = 0
    profile = None
    if os.environ.get("MECHDIFF_PROFILE"):  # cProfile the stage; top 40 by cumulative time beside PEAK.json
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if profile is not None:
            import io
            import pstats

            profile.disable()
            buf = io.StringIO()
            pstats.Stats(profile, stream=buf).sort_stats("cumulative").print_stats(40)
            with open(peak_path.replace(".json", "_profile.txt"), "w") as f:
                f.write(buf.getvalue())
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        by_dev = [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(n)]
        with open(peak_path, "w") as f:
            json.dump({"gpu_peak_gib": max(by_dev, default=0.0), "gpu_peak_by_device": by_dev}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
