"""Compare two tokenizers' vocabularies: shared strings, id identity, the id map, special tokens.

Token strings are the raw keys of ``get_vocab()`` (byte-level strings such as ``ĠÐ¿``), never
``decode([id])``: a token that ends mid-UTF-8 character decodes to U+FFFD, so decoded strings collide.
Sizes are ``len(tokenizer)`` (base vocabulary plus added tokens), not ``tokenizer.vocab_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechdiff.errors import MechdiffError

ROLES = ("bos", "eos", "pad", "unk")
POLICY_ROLES = ("bos", "eos", "unk")  # the roles a shared vocabulary must keep (pad is a loader choice)
POLICIES = ("shared_vocab_required", "shared_vocab_recommended")


class TokenizerPolicyError(MechdiffError):
    """A pair's ``tokenizer_policy: shared_vocab_required`` does not hold."""


@dataclass(frozen=True)
class SpecialCheck:
    """One special token in both tokenizers: its string and id in each, and whether both agree."""

    base_token: str | None
    base_id: int | None
    tuned_token: str | None
    tuned_id: int | None

    @property
    def agree(self) -> bool:
        return self.base_token == self.tuned_token and self.base_id == self.tuned_id

    def to_dict(self) -> dict[str, Any]:
        return {"base_token": self.base_token, "base_id": self.base_id, "tuned_token": self.tuned_token,
                "tuned_id": self.tuned_id, "agree": self.agree}


@dataclass(frozen=True)
class VocabReport:
    """What the tuned tokenizer changed relative to the base.

    ``base_ids`` and ``tuned_ids`` are int64 arrays of shape (n_shared,): the id of each shared string
    in each tokenizer, ordered by base id. Index k of both names the same string, so
    ``logits_base[..., base_ids]`` and ``logits_tuned[..., tuned_ids]`` line up position by position.
    """

    base_size: int                      # len(tok_base)
    tuned_size: int                     # len(tok_tuned)
    n_shared: int                       # strings in both vocabularies
    n_base_only: int                    # base strings the tuned tokenizer lost
    n_tuned_only: int                   # tuned strings absent from the base
    n_appended: int                     # tuned-only strings with an id above every base id
    n_same_id: int                      # shared strings with the same id in both
    base_ids: np.ndarray = field(repr=False)   # (n_shared,) int64, ascending
    tuned_ids: np.ndarray = field(repr=False)  # (n_shared,) int64
    specials: dict[str, SpecialCheck] = field(default_factory=dict)  # role -> check (bos, eos, pad, unk)
    template_specials: dict[str, SpecialCheck] = field(default_factory=dict)  # string -> check
    special_mismatches: tuple[str, ...] = ()   # special strings missing in one side or with other ids
    base_special_changes: tuple[str, ...] = ()  # base special strings missing from the tuned vocab or moved

    @property
    def pct_increase(self) -> float:
        """Percentage size increase of the tuned tokenizer over the base."""
        return 100.0 * (self.tuned_size - self.base_size) / self.base_size

    @property
    def id_identity(self) -> float:
        """Share of shared strings carrying the same id in both tokenizers."""
        return self.n_same_id / self.n_shared if self.n_shared else 0.0

    @property
    def ids_identical(self) -> bool:
        """Every shared string has the same id (the id map is the identity)."""
        return self.n_same_id == self.n_shared

    @property
    def id_preserving_superset(self) -> bool:
        """Every base string is in the tuned vocabulary with the same id (base ids are valid tuned ids)."""
        return self.n_base_only == 0 and self.ids_identical

    @property
    def shared_vocab_problems(self) -> tuple[str, ...]:
        """Why the tuned vocabulary is not an id-preserving superset of the base's with identical special
        ids (the ``shared_vocab_*`` tokenizer policies); empty when it is."""
        out = []
        if self.n_base_only:
            out.append(f"{self.n_base_only} base tokens are missing from the tuned vocabulary")
        if self.n_same_id != self.n_shared:
            out.append(f"{self.n_shared - self.n_same_id} of {self.n_shared} shared tokens have another id")
        if self.base_special_changes:
            out.append(f"base special tokens missing or moved: {list(self.base_special_changes[:5])}")
        for role in POLICY_ROLES:
            c = self.specials.get(role)
            if c is not None and c.base_token is not None and not c.agree:
                out.append(f"{role} is {c.base_token!r} (id {c.base_id}) in the base but {c.tuned_token!r} "
                           f"(id {c.tuned_id}) in the tuned tokenizer")
        return tuple(out)

    @property
    def special_tokens_agree(self) -> bool:
        """BOS/EOS/pad/unk and every special token of either chat template: same string, same id."""
        checks = [*self.specials.values(), *self.template_specials.values()]
        return all(c.agree for c in checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the id map itself is left out; save the arrays separately)."""
        return {
            "base_size": self.base_size, "tuned_size": self.tuned_size,
            "pct_increase": self.pct_increase, "n_shared": self.n_shared,
            "n_base_only": self.n_base_only, "n_tuned_only": self.n_tuned_only,
            "n_appended": self.n_appended, "n_same_id": self.n_same_id,
            "id_identity": self.id_identity, "ids_identical": self.ids_identical,
            "id_preserving_superset": self.id_preserving_superset,
            "special_tokens_agree": self.special_tokens_agree,
            "specials": {k: v.to_dict() for k, v in self.specials.items()},
            "template_specials": {k: v.to_dict() for k, v in self.template_specials.items()},
            "special_mismatches": list(self.special_mismatches),
            "base_special_changes": list(self.base_special_changes),
            "shared_vocab_problems": list(self.shared_vocab_problems),
        }


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of every special token: BOS/EOS/pad/unk and all added tokens flagged ``special``
    (Llama-3's ``<|start_header_id|>``, ``<|eot_id|>``, reserved tokens)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(ids)


def _special_strings(tokenizer) -> dict[str, int]:
    """Special token string -> id."""
    return {tokenizer.convert_ids_to_tokens(i): i for i in special_token_ids(tokenizer)}


def _role_check(tok_base, tok_tuned, role: str) -> SpecialCheck:
    def side(tok) -> tuple[str | None, int | None]:
        token = getattr(tok, f"{role}_token", None)
        return (None, None) if token is None else (str(token), tok.convert_tokens_to_ids(str(token)))
    return SpecialCheck(*side(tok_base), *side(tok_tuned))


def _string_check(s: str, base: dict[str, int], tuned: dict[str, int]) -> SpecialCheck:
    return SpecialCheck(s if s in base else None, base.get(s), s if s in tuned else None, tuned.get(s))


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        return "\n".join(template.values())
    return template or ""


def compare_specials(tok_base, tok_tuned) -> tuple[dict[str, SpecialCheck], dict[str, SpecialCheck],
                                                 tuple[str, ...]]:
    """Role checks (bos, eos, pad, unk), checks of the special strings written by either chat
    template, and the sorted special strings that differ (missing on one side or another id)."""
    roles = {r: _role_check(tok_base, tok_tuned, r) for r in ROLES}
    roles = {r: c for r, c in roles.items() if c.base_token is not None or c.tuned_token is not None}
    base, tuned = _special_strings(tok_base), _special_strings(tok_tuned)
    text = _template_text(tok_base) + "\n" + _template_text(tok_tuned)
    in_template = sorted(s for s in base.keys() | tuned.keys() if s in text)
    template = {s: _string_check(s, base, tuned) for s in in_template}
    mismatches = tuple(sorted(s for s in base.keys() | tuned.keys() if base.get(s) != tuned.get(s)))
    return roles, template, mismatches


def compare_vocabularies(tok_base, tok_tuned) -> VocabReport:
    """Compare two Hugging Face tokenizers on raw vocabulary strings; see :class:`VocabReport`."""
    vb, vt = tok_base.get_vocab(), tok_tuned.get_vocab()
    shared = sorted(vb.keys() & vt.keys(), key=vb.__getitem__)
    base_ids = np.fromiter((vb[s] for s in shared), dtype=np.int64, count=len(shared))
    tuned_ids = np.fromiter((vt[s] for s in shared), dtype=np.int64, count=len(shared))
    max_base = max(vb.values(), default=-1)
    tuned_only = vt.keys() - vb.keys()
    roles, template, mismatches = compare_specials(tok_base, tok_tuned)
    changes = tuple(sorted(t for t, i in _special_strings(tok_base).items() if vt.get(t) != i))
    return VocabReport(
        base_size=len(tok_base), tuned_size=len(tok_tuned), n_shared=len(shared),
        n_base_only=len(vb) - len(shared), n_tuned_only=len(tuned_only),
        n_appended=sum(vt[s] > max_base for s in tuned_only),
        n_same_id=int((base_ids == tuned_ids).sum()), base_ids=base_ids, tuned_ids=tuned_ids,
        specials=roles, template_specials=template, special_mismatches=mismatches,
        base_special_changes=changes)


def enforce_tokenizer_policy(report: VocabReport, policy: str, pair: str) -> dict[str, Any]:
    """Apply a pair's ``tokenizer_policy`` to its :class:`VocabReport`.

    ``shared_vocab_required``: raise :class:`TokenizerPolicyError` unless the tuned vocabulary is an
    id-preserving superset of the base's with identical special ids. ``shared_vocab_recommended``: the
    same test, recorded as a warning. Returns the JSON-ready record for fairness.json
    (``policy``, ``satisfied``, ``problems``, ``warnings``)."""
    if policy not in POLICIES:
        raise ValueError(f"tokenizer_policy must be one of {POLICIES}, got {policy!r}")
    problems = list(report.shared_vocab_problems)
    if problems and policy == "shared_vocab_required":
        raise TokenizerPolicyError(
            f"pair {pair!r}: tokenizer_policy shared_vocab_required, but the tuned vocabulary is not an "
            f"id-preserving superset of the base's ({'; '.join(problems)}). Fix: set pairs.{pair}.tokenizer_policy: "
            "shared_vocab_recommended in params.yaml (prompts are then compared in the strict/aligned modes; "
            "base_ids is unavailable), or point the pair at the tuned model's own tokenizer")
    warnings = ([f"tokenizer_policy shared_vocab_recommended not met: {'; '.join(problems)}; base_ids mode is "
                 "unavailable and comparisons rely on the strict/aligned modes"] if problems else [])
    return {"policy": policy, "satisfied": not problems, "problems": problems, "warnings": warnings}
