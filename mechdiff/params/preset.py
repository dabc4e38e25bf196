"""Switch the ``pairs:`` section of ``params.yaml`` to a shipped preset.

    python -m mechdiff.params.preset llama31          # Llama-3.1-8B-Instruct vs Sherkala / OpenMath2
    python -m mechdiff.params.preset llama31_parent   # the same fine-tunes vs their true parent Llama-3.1-8B
    python -m mechdiff.params.preset smol             # SmolLM2-135M-Instruct vs a copy with a planted edit (CPU)
    python -m mechdiff.params.preset organisms        # back to the embedded default
    python -m mechdiff.params.preset --list

The ``pairs:`` block is replaced, and the few settings a preset needs (:data:`SETTINGS`; e.g. ``smol``
builds its pair with ``planted.source: smollm2`` and sweeps less) are set; every other preset puts those
keys back to :data:`BASELINE`, so switching back restores the file. Every other line of ``params.yaml`` (and
its comments) is kept. The result is validated against the schema before anything is written, and the
file is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from mechdiff.params.config import PairSpec, ParamsError, load_params
from mechdiff.params.parse import parse_value

# Settings outside `pairs:` that a preset changes, as dotted keys. Every other preset puts each of these
# keys back to its value in BASELINE (the shipped params.yaml's; tests/test_preset.py checks they agree).
BASELINE: dict[str, object] = {
    "planted.source": None, "organisms.build": True, "fairness.modes": ["strict", "aligned", "base_ids"],
    "fairness.n_sampled_positions": 8, "behaviour.max_prompts": 256, "layers.scan_stride": 1,
    "layers.patch_prompts": 128, "cka.n_permutations": 100, "cka.n_bootstrap": 100, "clt.n_positions": 10000,
    "clt.min_positions": 8000, "clt.patch_prompts": 64, "steer.ks": [1, 2, 3, 4, 6, 8],
    "steer.alphas": [0.5, 1.0, 2.0, 3.0], "steer.max_prompts": 64, "steer.all_layers": True,
    "head_patch.max_prompts": 64, "head_patch.n_random": 20, "attribution.max_prompts": 128,
}
SETTINGS: dict[str, dict[str, object]] = {
    # real models: no pair uses the embedded organisms, so build_models trains nothing; the seed's 8-10k
    # positions per layer for the map (clt.n_positions) need about 24 sampled positions per prompt with the
    # preset's ~500 prompts per pair (8 give ~4.5k, fewer than Llama-3.1-8B's 4,096 dimensions once 20% are held out)
    # (and the seed's scan of every 2nd of their 32 layers, refined around the entry)
    "llama31": {"organisms.build": False, "fairness.n_sampled_positions": 24, "layers.scan_stride": 2},
    "llama31_parent": {"organisms.build": False, "fairness.n_sampled_positions": 24, "layers.scan_stride": 2},
    # a 135M-parameter model on a 2-core CPU: one comparison mode (both models share one tokenizer, so
    # the aligned and base_ids modes are copies of strict) and smaller sweeps
    "smol": {"planted.source": "smollm2", "organisms.build": False, "fairness.modes": ["strict"], "behaviour.max_prompts": 64,
             "layers.scan_stride": 2,
             "layers.patch_prompts": 32, "cka.n_permutations": 20, "cka.n_bootstrap": 20,
             "clt.n_positions": 4000, "clt.min_positions": 1000, "clt.patch_prompts": 16,
             "steer.ks": [1, 2, 4], "steer.alphas": [1.0, 2.0], "steer.max_prompts": 16, "steer.all_layers": False,
             "head_patch.max_prompts": 16, "head_patch.n_random": 5, "attribution.max_prompts": 16},
}


def available() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name[:-5] for p in resources.files("mechdiff.params.presets").iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name`` (a mapping of pair name -> pair spec)."""
    if name not in available():
        raise ParamsError(f"unknown preset {name!r}; available presets: {', '.join(available())}")
    return resources.files("mechdiff.params.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def pairs_block(lines: list[str]) -> tuple[int, int]:
    """(index of the top-level ``pairs:`` line, index one past its block's last non-blank line)."""
    if "pairs:" not in lines:
        raise ParamsError("params.yaml has no top-level 'pairs:' line")
    start = lines.index("pairs:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "#"))),
               len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return start, end


def apply_preset(params_text: str, preset: str) -> str:
    """Return ``params_text`` with its top-level ``pairs:`` block replaced by the preset's pairs."""
    body = preset_text(preset)
    parse_value(yaml.safe_load(body), dict[str, PairSpec], f"preset {preset}: pairs")
    lines = params_text.splitlines()
    start, end = pairs_block(lines)
    body_lines = body.splitlines()
    while body_lines and body_lines[0].startswith("#"):  # the preset's own header comment
        body_lines.pop(0)
    block = ["  " + ln if ln.strip() else "" for ln in body_lines]
    out = "\n".join(lines[: start + 1] + block + lines[end:]) + "\n"
    for key, value in BASELINE.items():
        out = set_value(out, key, SETTINGS.get(preset, {}).get(key, value))
    load_params(out, f"params.yaml with preset {preset}")
    return out


def _flow(value: object) -> str:
    """``value`` as a one-line YAML flow scalar or list, strings unquoted where YAML reads them back."""
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str) and yaml.safe_load(value) == value and "," not in value:
        return value
    return json.dumps(value)


def set_value(params_text: str, dotted: str, value: object) -> str:
    """``params_text`` with the value of ``section.key`` replaced by ``value`` (one line of YAML),
    keeping the line's comment; unchanged when it already parses to ``value``."""
    section, key = dotted.split(".")
    if yaml.safe_load(params_text).get(section, {}).get(key, object()) == value:
        return params_text
    lines = params_text.splitlines()
    header = re.compile(rf"^{re.escape(section)}:(\s+#.*)?$")
    start = next(i for i, line in enumerate(lines) if header.match(line))
    pattern = re.compile(rf"^(  {re.escape(key)}:\s*)(.*?)(\s+#.*)?$")
    for i in range(start + 1, len(lines)):
        if lines[i] and not lines[i].startswith((" ", "#")):
            break
        m = pattern.match(lines[i])
        if m:
            lines[i] = m.group(1) + _flow(value) + (m.group(3) or "")
            return "\n".join(lines) + "\n"
    raise ParamsError(f"params.yaml has no '{key}:' line under '{section}:' to set for the preset")


def write_params(path: Path, text: str) -> None:
    """Replace the params file at ``path`` with ``text`` atomically, keeping its mode (mkstemp creates 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".params.", suffix=".tmp")
    os.chmod(tmp, path.stat().st_mode & 0o7777)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list or not args.preset:
        print("\n".join(available()))
        return 0
    path = Path(args.params)
    try:
        new = apply_preset(path.read_text(encoding="utf-8"), args.preset)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_params(path, new)
    print(f"{path}: pairs set to preset {args.preset!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
