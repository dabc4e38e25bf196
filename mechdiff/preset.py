"""Switch the ``pairs:`` section of ``params.yaml`` to a shipped preset.

    python -m mechdiff.preset llama31          # Llama-3.1-8B-Instruct vs Sherkala / OpenMath2
    python -m mechdiff.preset llama31_parent   # the same fine-tunes vs their true parent Llama-3.1-8B
    python -m mechdiff.preset organisms        # back to the embedded default
    python -m mechdiff.preset --list

Only the ``pairs:`` block is replaced; every other line of ``params.yaml`` (and its comments) is kept.
The preset is validated against the schema before anything is written, and the file is replaced
atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from mechdiff.config import PairSpec, ParamsError, _convert, load_params


def available() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name[:-5] for p in resources.files("mechdiff.presets").iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name`` (a mapping of pair name -> pair spec)."""
    if name not in available():
        raise ParamsError(f"unknown preset {name!r}; available presets: {', '.join(available())}")
    return resources.files("mechdiff.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def apply_preset(params_text: str, preset: str) -> str:
    """Return ``params_text`` with its top-level ``pairs:`` block replaced by the preset's pairs."""
    body = preset_text(preset)
    _convert(yaml.safe_load(body), dict[str, PairSpec], f"preset {preset}: pairs")
    lines = params_text.splitlines()
    if "pairs:" not in lines:
        raise ParamsError("params.yaml has no top-level 'pairs:' line to replace")
    start = lines.index("pairs:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "#"))),
               len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    body_lines = body.splitlines()
    while body_lines and body_lines[0].startswith("#"):  # the preset's own header comment
        body_lines.pop(0)
    block = ["  " + ln if ln.strip() else "" for ln in body_lines]
    out = "\n".join(lines[: start + 1] + block + lines[end:]) + "\n"
    load_params(out, f"params.yaml with preset {preset}")
    return out


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".params.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)
    print(f"{path}: pairs set to preset {args.preset!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
