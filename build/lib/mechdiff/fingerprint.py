"""Fingerprints: what an artifact was computed from, stored with it and checked by every reader.

A fingerprint is a flat ``dict[str, str]`` (model id and revision or local weight hash, tokenizer
hash, rendered-template hash, dtype, attention implementation, sites, positions hash, library
versions). :func:`check_fingerprint` compares the fields that define the computation and names every
one that differs, so a stale cache is never read silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from mechdiff.errors import MechdiffError

# Versions are recorded for provenance but do not invalidate by themselves.
PROVENANCE_ONLY = ("versions",)


class StaleCacheError(MechdiffError):
    """Stored activations do not match the models, tokenizers or params of this run."""


def digest(obj) -> str:
    """A short stable hash of a JSON-serialisable object (sorted keys) or of bytes/str."""
    if isinstance(obj, str):
        data = obj.encode("utf-8")
    elif isinstance(obj, bytes | bytearray):
        data = bytes(obj)
    else:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers."""
    import tokenizers
    import torch
    import transformers

    import mechdiff

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "mechdiff": mechdiff.__version__}


def check_fingerprint(expected: Mapping[str, object], found: Mapping[str, object], what: str) -> None:
    """Raise :class:`StaleCacheError` listing every defining field where ``found`` != ``expected``."""
    keys = sorted((set(expected) | set(found)) - set(PROVENANCE_ONLY))
    diffs = [f"{k}: stored {found.get(k)!r}, expected {expected.get(k)!r}" for k in keys
             if expected.get(k) != found.get(k)]
    if diffs:
        raise StaleCacheError(f"{what} was computed from different inputs ({'; '.join(diffs)}); "
                              "rerun the stage that produced it (dvc repro) instead of reusing it")
