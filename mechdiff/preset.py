"""Switch the ``pairs:`` section of ``params.yaml`` to a shipped preset.

    python -m mechdiff.preset llama31          # Llama-3.1-8B-Instruct vs Sherkala / OpenMath2
    python -m mechdiff.preset llama31_parent   # the same fine-tunes vs their true parent Llama-3.1-8B
    python -m mechdiff.preset smol             # SmolLM2-135M-Instruct vs a copy with a planted edit (CPU)
    python -m mechdiff.preset organisms        # back to the embedded default
    python -m mechdiff.preset --list

The ``pairs:`` block is replaced, and the few settings a preset needs (:data:`SETTINGS`; e.g. ``smol``
builds its pair with ``planted.source: smollm2``) are set; every other preset puts those keys back to
their schema defaults, so switching back restores the file. Every other line of ``params.yaml`` (and
its comments) is kept. The result is validated against the schema before anything is written, and the
file is replaced atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import typing
import sys
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from mechdiff.config import PairSpec, Params, ParamsError, _convert, load_params

# Settings outside `pairs:` that a preset changes, as dotted keys; presets not named here get the
# schema's default for every key that any preset sets.
SETTINGS: dict[str, dict[str, object]] = {
    "smol": {"planted.source": "smollm2"},
}


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
    for key in sorted({k for values in SETTINGS.values() for k in values}):
        out = set_value(out, key, SETTINGS.get(preset, {}).get(key, schema_default(key)))
    load_params(out, f"params.yaml with preset {preset}")
    return out


def schema_default(dotted: str) -> object:
    """The default of ``section.key`` in the params schema (:mod:`mechdiff.config`)."""
    section, key = dotted.split(".")
    cls = typing.get_type_hints(Params)[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def set_value(params_text: str, dotted: str, value: object) -> str:
    """``params_text`` with the value of ``section.key`` replaced by ``value`` (written as JSON, which is
    YAML), keeping the line's comment; unchanged when it already parses to ``value``."""
    section, key = dotted.split(".")
    if yaml.safe_load(params_text).get(section, {}).get(key, object()) == value:
        return params_text
    lines = params_text.splitlines()
    start = lines.index(f"{section}:")
    pattern = re.compile(rf"^(  {re.escape(key)}:\s*)(.*?)(\s+#.*)?$")
    for i in range(start + 1, len(lines)):
        if lines[i] and not lines[i].startswith((" ", "#")):
            break
        m = pattern.match(lines[i])
        if m:
            lines[i] = m.group(1) + json.dumps(value) + (m.group(3) or "")
            return "\n".join(lines) + "\n"
    raise ParamsError(f"params.yaml has no '{key}:' line under '{section}:' to set for the preset")


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
