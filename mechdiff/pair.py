"""Add, remove or list the model pairs of ``params.yaml`` without touching the rest of the file.

    python -m mechdiff.pair add mine --base path/or/hub-id --tuned path/or/hub-id [--like cultural]
    python -m mechdiff.pair remove mine
    python -m mechdiff.pair list

``add`` appends a commented block for the pair at the end of the ``pairs:`` section (its datasets and
domain copied from the pair named by ``--like``, the first pair by default), sets ``organisms.build`` to
whether any pair still uses the embedded organisms (so ``dvc repro`` trains them only when needed),
validates the whole file before writing it (atomically, keeping its mode and every comment), then runs
the pre-flight for the new pair (ids resolve, architectures compatible, disk, GPU memory; skip with
``--no-preflight``) and prints the ``dvc repro`` command of that pair. ``remove`` deletes the block.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from mechdiff.config import ParamsError, load_params, uses_organism
from mechdiff.preset import pairs_block, set_value, write_params


def _key_of(line: str) -> str | None:
    """The pair name a ``pairs:`` block line opens (``  name:`` at two spaces), else None."""
    if not line.startswith("  ") or line.startswith("   ") or line.lstrip().startswith("#"):
        return None
    try:
        parsed = yaml.safe_load(line.strip())
    except yaml.YAMLError:
        return None
    return str(next(iter(parsed))) if isinstance(parsed, dict) and len(parsed) == 1 else None


def _pair_span(lines: list[str], name: str) -> tuple[int, int] | None:
    """Line span of pair ``name`` inside the ``pairs:`` block (its key line to the next pair's), or None."""
    start, end = pairs_block(lines)
    keys = [(i, _key_of(lines[i])) for i in range(start + 1, end) if _key_of(lines[i]) is not None]
    for k, (i, key) in enumerate(keys):
        if key == name:
            stop = keys[k + 1][0] if k + 1 < len(keys) else end
            while stop > i + 1 and (not lines[stop - 1].strip() or lines[stop - 1].lstrip().startswith("#")):
                stop -= 1
            return i, stop
    return None


def _move_anchors(removed: list[str], rest: list[str]) -> list[str]:
    """``rest`` with every YAML anchor defined in the ``removed`` lines and still used in ``rest`` moved to
    its first use: ``key: *name`` becomes ``key: &name`` followed by the anchored block (same indentation)."""
    rest = list(rest)
    for k, line in enumerate(removed):
        m = re.match(r"^(\s*)([^#\s][^:]*):\s*&([\w-]+)\s*(#.*)?$", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(3)
        body = []
        for nxt in removed[k + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        use = next((j for j, r in enumerate(rest) if re.search(rf":\s*\*{re.escape(name)}\s*(#.*)?$", r)), None)
        if use is None:
            continue
        if len(rest[use]) - len(rest[use].lstrip()) != indent:
            raise ParamsError(f"the removed pair defines the YAML anchor &{name} that another pair uses at another "
                              "depth; copy that block into the other pair first")
        rest[use] = re.sub(rf"\*{re.escape(name)}", f"&{name}", rest[use], count=1)
        rest[use + 1:use + 1] = body
    return rest


def _with_organisms_flag(text: str) -> str:
    """``text`` with ``organisms.build`` true exactly when some pair uses an embedded organism."""
    pairs = yaml.safe_load(text)["pairs"]
    used = any(uses_organism(str(p.get(side, ""))) for p in pairs.values() for side in ("base", "tuned"))
    return set_value(text, "organisms.build", used)


def add_pair(params_text: str, name: str, base: str, tuned: str, like: str | None = None,
             base_revision: str | None = None, tuned_revision: str | None = None) -> str:
    """``params_text`` with pair ``name`` appended (datasets, domain and policy copied from ``like``)."""
    data = yaml.safe_load(params_text)
    pairs = data.get("pairs") or {}
    if name in pairs:
        raise ParamsError(f"pair {name!r} is already in params.yaml; remove it first (python -m mechdiff.pair remove "
                          f"{name}) or pick another name")
    like = like or next(iter(pairs), None)
    if like not in pairs:
        raise ParamsError(f"--like {like!r} is not a pair in params.yaml (pairs: {sorted(pairs)})")
    spec = {"description": f"{base} vs {tuned}", "base": base, "tuned": tuned, "base_revision": base_revision,
            "tuned_revision": tuned_revision, "domain": pairs[like]["domain"],
            "tokenizer_policy": pairs[like].get("tokenizer_policy", "shared_vocab_recommended"),
            "datasets": pairs[like]["datasets"]}
    body = yaml.safe_dump({name: spec}, sort_keys=False, allow_unicode=True, width=110).splitlines()
    block = [f"  # added by: python -m mechdiff.pair add {name} (datasets and domain as pair {like!r}; edit them)"]
    block += ["  " + ln for ln in body]
    lines = params_text.splitlines()
    _, end = pairs_block(lines)
    out = "\n".join(lines[:end] + block + lines[end:]) + "\n"
    out = _with_organisms_flag(out)
    load_params(out, f"params.yaml with pair {name}")
    return out


def remove_pair(params_text: str, name: str) -> str:
    """``params_text`` without pair ``name`` (its block and the comment lines right above it)."""
    lines = params_text.splitlines()
    span = _pair_span(lines, name)
    if span is None:
        raise ParamsError(f"pair {name!r} is not in params.yaml (pairs: {sorted(yaml.safe_load(params_text)['pairs'])})")
    i, stop = span
    while i > 0 and lines[i - 1].lstrip().startswith("#") and lines[i - 1].startswith("  "):
        i -= 1
    rest = _move_anchors(lines[i:stop], lines[:i] + lines[stop:])
    out = "\n".join(rest) + "\n"
    if not yaml.safe_load(out).get("pairs"):
        raise ParamsError(f"pair {name!r} is the only pair; add another before removing it")
    out = _with_organisms_flag(out)
    load_params(out, f"params.yaml without pair {name}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="append a pair")
    add.add_argument("name")
    add.add_argument("--base", required=True, help="Hub id or local directory of the base model")
    add.add_argument("--tuned", required=True, help="Hub id or local directory of the fine-tuned model")
    add.add_argument("--base-revision")
    add.add_argument("--tuned-revision")
    add.add_argument("--like", help="copy datasets and domain from this pair (default: the first pair)")
    add.add_argument("--no-preflight", action="store_true")
    rm = sub.add_parser("remove", help="delete a pair")
    rm.add_argument("name")
    sub.add_parser("list", help="print the pairs")
    args = ap.parse_args(argv)
    path = Path(args.params)
    try:
        text = path.read_text(encoding="utf-8")
        if args.cmd == "list":
            for name, p in load_params(text, str(path)).pairs.items():
                print(f"{name}: {p.base} -> {p.tuned} ({p.domain})")
            return 0
        new = (add_pair(text, args.name, args.base, args.tuned, args.like, args.base_revision, args.tuned_revision)
               if args.cmd == "add" else remove_pair(text, args.name))
    except (ParamsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_params(path, new)
    print(f"{path}: pair {args.name!r} {'added' if args.cmd == 'add' else 'removed'}")
    if args.cmd == "add":
        if not args.no_preflight:
            from mechdiff import preflight

            if preflight.main(["--params", str(path), "--pair", args.name]) != 0:
                print(f"pre-flight found problems (above); fix them, or remove the pair: python -m mechdiff.pair "
                      f"remove {args.name}", file=sys.stderr)
                return 1
        print(f"next: dvc repro report   (or only this pair: dvc repro --glob '*@{args.name}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
