"""Add, remove or list the model pairs of ``params.yaml`` without touching the rest of the file.

    python -m mechdiff.params.pair add mine --base path/or/hub-id --tuned path/or/hub-id [--like cultural] [--target cognitive]
    python -m mechdiff.params.pair add mine --base DIR --tuned DIR --target-prompts FILE [--contrast-prompts FILE] \
        [--measure refusal|answer|logprob|match] [--text STRING] [--only]
    python -m mechdiff.params.pair remove mine
    python -m mechdiff.params.pair list

``add`` appends a commented block for the pair at the end of the ``pairs:`` section. Without
``--target-prompts`` its datasets, domain and built-in target are copied from the pair named by ``--like``
(the first pair by default). With ``--target-prompts`` the pair gets a target of its own
(:mod:`mechdiff.data.target`): the prompts of that file (one JSON object with a ``text`` field per line, or any
format of :mod:`mechdiff.data.prepare_data`) form the target class, those of ``--contrast-prompts`` the contrast
class, and ``--measure`` (``match`` by default, with ``--text``) is what the causal stages measure; the
domain is ``custom``. ``--only`` removes every other pair (a report on this pair alone). It sets ``organisms.build`` to
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

from mechdiff.params.config import ParamsError, load_params
from mechdiff.params.preset import pairs_block, set_value, write_params
from mechdiff.params.rules import uses_organism


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


def prompt_file_dataset(path: str, language: str, target: bool, answers: bool = False) -> dict:
    """The dataset spec of a user's prompt file: ``kind: file``, free-form prompts read from its ``text``
    field (and, with ``answers``, each prompt's reference or continuation from its ``answer`` field), in
    ``language``, flagged ``target`` for the target class."""
    fields = {"text": "text", **({"answer": "answer"} if answers else {})}
    return {"kind": "file", "task": "freeform", "path": path, "language": language, "fields": fields,
            **({"answer_format": "plain"} if answers else {}), "target": target}


def custom_target(target_prompts: str, contrast_prompts: str | None, measure: str, text: str | None,
                  language: str = "en") -> tuple[dict, dict]:
    """``(datasets, target)`` param blocks of a pair whose target class is the prompt file ``target_prompts``
    and whose contrast class is ``contrast_prompts`` (None: the pair's other questions), measured by
    ``measure`` (:mod:`mechdiff.data.target`; ``text``: the continuation of logprob / match)."""
    answers = measure == "answer" or (measure in ("logprob", "match") and text is None)
    datasets = {"target_prompts": prompt_file_dataset(target_prompts, language, True, answers)}
    if contrast_prompts:
        datasets["contrast_prompts"] = prompt_file_dataset(contrast_prompts, language, False)
    target = {"measure": measure, "prompts": ["target_prompts"],
              "contrast": ["contrast_prompts"] if contrast_prompts else None, "text": text}
    return datasets, target


def add_pair(params_text: str, name: str, base: str, tuned: str, like: str | None = None,
             base_revision: str | None = None, tuned_revision: str | None = None,
             target: tuple[dict, dict] | str | None = None, only: bool = False) -> str:
    """``params_text`` with pair ``name`` appended: datasets, domain, target and policy copied from ``like``,
    or with ``target`` = ``(datasets, target)`` (:func:`custom_target`) a target of its own (domain
    ``custom``); ``target`` = a built-in name (``cultural``, ``cognitive``) replaces ``like``'s target.
    ``only``: every other pair is removed."""
    data = yaml.safe_load(params_text)
    pairs = data.get("pairs") or {}
    if name in pairs:
        raise ParamsError(f"pair {name!r} is already in params.yaml; remove it first (python -m mechdiff.params.pair remove "
                          f"{name}) or pick another name")
    like = like or next(iter(pairs), None)
    if like not in pairs:
        raise ParamsError(f"--like {like!r} is not a pair in params.yaml (pairs: {sorted(pairs)})")
    spec = {"description": f"{base} vs {tuned}", "base": base, "tuned": tuned, "base_revision": base_revision,
            "tuned_revision": tuned_revision}
    if target is None or isinstance(target, str):
        like_target = target or pairs[like].get("target") or (
            "cognitive" if pairs[like]["domain"] == "cognitive" else "cultural")
        spec.update(domain=pairs[like]["domain"], target=like_target,
                    tokenizer_policy=pairs[like].get("tokenizer_policy", "shared_vocab_recommended"),
                    datasets=pairs[like]["datasets"])
        head = f"datasets, domain and target as pair {like!r}; edit them"
    else:
        spec.update(domain="custom", target=target[1], tokenizer_policy="shared_vocab_recommended", datasets=target[0])
        head = ("target: the prompts of target_prompts against contrast_prompts, judged by target.measure; "
                "README: Diff your own fine-tune")
    body = yaml.safe_dump({name: spec}, sort_keys=False, allow_unicode=True, width=110).splitlines()
    block = [f"  # added by: python -m mechdiff.params.pair add {name} ({head})"]
    block += ["  " + ln for ln in body]
    lines = params_text.splitlines()
    _, end = pairs_block(lines)
    out = "\n".join(lines[:end] + block + lines[end:]) + "\n"
    if only:
        for other in pairs:
            out = _drop_block(out, other)
    out = _with_organisms_flag(out)
    load_params(out, f"params.yaml with pair {name}")
    return out


def _drop_block(params_text: str, name: str) -> str:
    """``params_text`` without pair ``name``'s block and the comment lines right above it (anchors it defines
    that another pair uses move there)."""
    lines = params_text.splitlines()
    span = _pair_span(lines, name)
    if span is None:
        raise ParamsError(f"pair {name!r} is not in params.yaml (pairs: {sorted(yaml.safe_load(params_text)['pairs'])})")
    i, stop = span
    while i > 0 and lines[i - 1].lstrip().startswith("#") and lines[i - 1].startswith("  "):
        i -= 1
    rest = _move_anchors(lines[i:stop], lines[:i] + lines[stop:])
    return "\n".join(rest) + "\n"


def remove_pair(params_text: str, name: str) -> str:
    """``params_text`` without pair ``name`` (its block and the comment lines right above it)."""
    out = _drop_block(params_text, name)
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
    add.add_argument("--like", help="copy datasets, domain and target from this pair (default: the first pair)")
    add.add_argument("--target", choices=["cultural", "cognitive"],
                     help="a built-in target for the datasets copied from --like (default: --like's target)")
    add.add_argument("--target-prompts", help="prompt file of the target class (JSON lines with a 'text' field): "
                     "gives the pair a target of its own (domain custom)")
    add.add_argument("--contrast-prompts", help="prompt file of the contrast class (same format)")
    add.add_argument("--measure", default="match", choices=["refusal", "answer", "logprob", "match"],
                     help="the behaviour the causal stages measure on the target prompts (default: match)")
    add.add_argument("--text", help="logprob / match: the continuation to score or find in the greedy answer "
                     "(default: each prompt's 'answer' field)")
    add.add_argument("--language", default="en", help="language code of the prompt files (default: en)")
    add.add_argument("--only", action="store_true", help="remove every other pair (a report on this pair alone)")
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
                target = p.target if isinstance(p.target, str) else f"{p.target.measure} on {p.target.prompts}"
                print(f"{name}: {p.base} -> {p.tuned} ({p.domain}; target {target})")
            return 0
        if args.cmd == "add":
            if (args.contrast_prompts or args.text) and not args.target_prompts:
                raise ParamsError("--contrast-prompts and --text define a target of its own and need --target-prompts "
                                  "(the prompt file of the target class)")
            if args.target and args.target_prompts:
                raise ParamsError("--target picks a built-in target, --target-prompts defines one of your own; give "
                                  "one of them")
            target = (custom_target(args.target_prompts, args.contrast_prompts, args.measure, args.text, args.language)
                      if args.target_prompts else args.target)
            new = add_pair(text, args.name, args.base, args.tuned, args.like, args.base_revision, args.tuned_revision,
                           target, args.only)
        else:
            new = remove_pair(text, args.name)
    except (ParamsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_params(path, new)
    print(f"{path}: pair {args.name!r} {'added' if args.cmd == 'add' else 'removed'}")
    if args.cmd == "add":
        if not args.no_preflight:
            from mechdiff.models import preflight

            if preflight.main(["--params", str(path), "--pair", args.name]) != 0:
                print(f"pre-flight found problems (above); fix them, or remove the pair: python -m mechdiff.params.pair "
                      f"remove {args.name}", file=sys.stderr)
                return 1
        print(f"next: dvc repro report   (or only this pair: dvc repro --glob '*@{args.name}')" if not args.only
              else "next: dvc repro   (then open report/report.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
