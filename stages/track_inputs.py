"""Stage track_inputs: fingerprints of the inputs a pair reads from outside the pipeline, so DVC sees them.

    python -m stages.track_inputs --pair cultural --sources artifacts/results/cultural/sources.json
    python -m stages.track_inputs --pair cultural --models artifacts/results/cultural/models.json

Two DVC stages run this script: ``track_inputs@<pair>`` (``--sources``: the dataset files) and
``track_models@<pair>`` (``--models``: the model directories; it alone depends on ``build_models``' output,
so preparing data never waits for the organisms' training).

DVC tracks a path only when ``dvc.yaml`` names it, and a pair's dataset files (a folder, a glob, an
absolute path, a local copy of a Hub dataset) and local model directories are params, not paths DVC
knows. This stage runs on every ``dvc repro`` (``always_changed``, about a second) and writes their
digests: ``prepare_data`` depends on ``sources.json`` and every stage that loads the models on
``models.json``, so editing a dataset file or rebuilding a model directory in place reruns exactly the
stages that read it, and an unchanged input (the same bytes) reruns nothing. A pair's chat-template
override (inline or a file) is fingerprinted with its model, so editing it reruns every render.

Digests: a file up to 64 MiB is hashed whole (sha256); a larger one (model weights) by its size and 64
evenly spaced 64 KiB blocks, which any retraining or re-save changes, in a fraction of a second per
file. Hub datasets and models are fingerprinted by id and pinned revision (a param already). The models
``build_models`` writes (the organisms, the planted pair) are digested like any local directory:
``track_models`` depends on ``artifacts/models`` (so it runs after the build) and the model stages depend
only on ``models.json``, so rebuilding the organisms reruns the pairs that use them and no other pair.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mechdiff.data.source_files import local_files
from mechdiff.params.config import PairSpec, built_by_build_models
from stages.common import (ROOT, atomic_write_json, file_digest, load_pair_params, resolve_path, run_stage,
                           stage_parser)


def source_digests(pair: PairSpec, allow_outside: bool = False, root: Path = ROOT) -> dict[str, dict[str, str]]:
    """``{dataset: {file name: digest}}`` for local files, ``{dataset: {"hub": id@revision}}`` for the Hub,
    ``{dataset: {"world": ...}}`` for the built-in world."""
    out: dict[str, dict[str, str]] = {}
    for name, spec in sorted(pair.datasets.items()):
        if spec.path:
            resolve_path(spec.path, root, allow_outside, "data.allow_external_paths")
            files, _ = local_files(spec.path, root, f"pairs dataset {name!r}")
            out[name] = {rel: file_digest(p) for rel, p in files}
        elif spec.kind == "hub":
            out[name] = {"hub": f"{spec.hub_id}@{spec.revision}"}
        else:
            out[name] = {"world": "built in (mechdiff/organisms/world.py, a code dependency of prepare_data)"}
    return out


def model_digest(model_id: str, revision: str | None, root: Path = ROOT) -> dict[str, str]:
    """``{file: digest}`` of a local model directory's files (one written by ``build_models`` says so under
    ``built_by``), or how the model is otherwise tracked."""
    built = {"built_by": "build_models (artifacts/models)"} if built_by_build_models(model_id, root) else {}
    path = Path(model_id).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        return built or {"hub": f"{model_id}@{revision}"}
    return {**built, **{f.relative_to(path).as_posix(): file_digest(f) for f in sorted(path.rglob("*"))
                        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)}}


def main() -> None:
    ap = stage_parser(__doc__, "--pair", raw_doc=True)
    ap.add_argument("--sources", help="write the digests of the pair's dataset files here")
    ap.add_argument("--models", help="write the digests of the pair's model directories here")
    args = ap.parse_args()
    if not (args.sources or args.models):
        ap.error("give --sources, --models or both")
    params = load_pair_params(args.params, args.pair)
    pair = params.pairs[args.pair]
    if args.sources:
        sources = source_digests(pair, params.data.allow_external_paths)
        atomic_write_json(args.sources, sources)
        print(f"track_inputs@{args.pair}: {sum(len(v) for v in sources.values())} dataset entries fingerprinted")
    if args.models:
        templates = pair.chat_templates()  # an override (inline or a file) changes every render
        models = {side: {**model_digest(model_id, rev), "chat_template_override": (
            None if tmpl is None else "sha256:" + hashlib.sha256(tmpl.encode()).hexdigest())}
            for side, model_id, rev, tmpl in (("base", pair.base, pair.base_revision, templates[0]),
                                              ("tuned", pair.tuned, pair.tuned_revision, templates[1]))}
        atomic_write_json(args.models, models)
        print(f"track_models@{args.pair}: {sum(len(v) for v in models.values())} model entries fingerprinted")


if __name__ == "__main__":
    run_stage(main)
