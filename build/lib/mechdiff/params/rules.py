"""What a valid ``params.yaml`` holds beyond its types: one constraints table and the validator that walks it.

:data:`RULES` maps each section dataclass of :mod:`mechdiff.params.config` (by class name) to its constraints, in
the order they are checked. A constraint is a small data object (:class:`Range`, :class:`Items`,
:class:`Pattern`, :class:`Rule`) or a named rule function for what a fixed key cannot express; each is
called with the built section and returns None or ``(key relative to the section, what is wrong)``.
:func:`validate` raises :class:`ParamsError` for the first broken one. Integer reading rules (counts >= 1,
seeds of 32 bits) apply as values are read (:mod:`mechdiff.params.parse`), before these.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Callable

from mechdiff.errors import MechdiffError


class ParamsError(MechdiffError, ValueError):
    """A params file does not match the schema; the message names the key and the fix."""


Broken = tuple[str, str] | None  # (key relative to the section, "expected ..., got ...") or None


def _broken(key: str, expected: str, got: Any) -> Broken:
    """The problem at ``key``: what was ``expected``, and the value ``got``."""
    return key, f"expected {expected}, got {got!r}"


def _filled(expected: str, section: Any) -> str:
    """A table's ``expected`` text with its ``{field}`` placeholders filled from ``section``."""
    return expected.format(**vars(section))


@dataclass(frozen=True)
class _Bounds:
    """Optional bounds ``value > gt``, ``>= ge``, ``< lt``, ``<= le``; a string bound names another field."""

    _: KW_ONLY
    gt: float | str | None = None
    ge: float | str | None = None
    lt: float | str | None = None
    le: float | str | None = None

    def holds(self, value: Any, section: Any) -> bool:
        bounds = ((self.gt, operator.gt), (self.ge, operator.ge), (self.lt, operator.lt), (self.le, operator.le))
        return all(b is None or op(value, getattr(section, b) if isinstance(b, str) else b) for b, op in bounds)


@dataclass(frozen=True)
class Range(_Bounds):
    """A number field (null passes) within the bounds. Several ``fields``: each within them and, when
    ``ordered``, non-decreasing; the message names ``key`` (default: the first field) and shows them all."""

    fields: str | tuple[str, ...]
    expected: str
    key: str | None = None
    ordered: bool = False

    def __call__(self, section: Any) -> Broken:
        names = (self.fields,) if isinstance(self.fields, str) else self.fields
        values = [getattr(section, name) for name in names]
        ok = all(v is None or self.holds(v, section) for v in values)
        if ok and (not self.ordered or all(a <= b for a, b in zip(values, values[1:]))):
            return None
        got = values[0] if len(names) == 1 else tuple(values)
        return _broken(self.key or names[0], _filled(self.expected, section), got)


@dataclass(frozen=True)
class Items(_Bounds):
    """A list (or mapping: its keys) whose every item is within the bounds and, if given, among ``choices``;
    ``nonempty``: at least one item; ``distinct``: no repeats."""

    field: str
    expected: str
    nonempty: bool = False
    distinct: bool = False
    choices: tuple | None = None

    def __call__(self, section: Any) -> Broken:
        items = getattr(section, self.field)
        ok = ((items or not self.nonempty)
              and all(self.holds(x, section) and (self.choices is None or x in self.choices) for x in items)
              and (not self.distinct or len(set(items)) == len(items)))
        return None if ok else _broken(self.field, _filled(self.expected, section), items)


@dataclass(frozen=True)
class Pattern:
    """A string field that fully matches ``regex``."""

    field: str
    regex: str
    expected: str

    def __call__(self, section: Any) -> Broken:
        value = getattr(section, self.field)
        if re.fullmatch(self.regex, value):
            return None
        return _broken(self.field, _filled(self.expected, section), value)


@dataclass(frozen=True)
class Rule:
    """A cross-field condition: ``test(section)`` is true, else the message names ``key`` and shows the
    value of field ``got`` (None: shows None)."""

    key: str
    test: Callable[[Any], Any]
    expected: str
    got: str | None = None

    def __call__(self, section: Any) -> Broken:
        if self.test(section):
            return None
        got = None if self.got is None else getattr(section, self.got)
        return _broken(self.key, _filled(self.expected, section), got)


# --------------------------------------------------------------------------------------------------
# what the named rules need


LLAMA_LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


ORGANISM_NAMES = ("base", "cultural", "cognitive")


def uses_organism(model_id: str) -> bool:
    """True when ``model_id`` names one of the embedded organisms that build_models trains
    (``artifacts/models/{base,cultural,cognitive}``; the planted pair lives in ``artifacts/models/planted``)."""
    parts = model_id.replace("\\", "/").rstrip("/").split("/")
    return len(parts) >= 3 and parts[-3:-1] == ["artifacts", "models"] and parts[-1] in ORGANISM_NAMES


TEMPLATE_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt")


def read_chat_template(value: str | None) -> tuple[str | None, str | None]:
    """``(Jinja text, None)`` of a chat-template param, or ``(None, what is wrong)``. The param is ``None``;
    a path to a ``.jinja``/``.j2``/``.txt`` file (relative to the working directory, the project root for
    stages); or the template itself. Wrong: a missing file, a string that is not a template, a Jinja syntax
    error."""
    if value is None:
        return None, None
    text = value
    if value.strip().endswith(TEMPLATE_FILE_SUFFIXES) and "\n" not in value and "{" not in value:
        path = Path(value.strip()).expanduser()
        if not path.is_file():
            return None, f"expected an existing template file (no file {str(path)!r}), got {value!r}"
        text = path.read_text(encoding="utf-8")
    if not ("{{" in text or "{%" in text):
        return None, ("expected a Jinja chat template (text with {{ ... }} / {% ... %}) or a path to a .jinja/.txt "
                      f"file holding one, got {value[:80]!r}")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except Exception as err:  # noqa: BLE001 - any template error is a params error
        return None, ("expected a valid Jinja chat template, got a syntax error: "
                      f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return text, None


def resolve_chat_template(value: str | None, key: str) -> str | None:
    """The Jinja text of the chat-template param at ``key`` (see :func:`read_chat_template`); raises
    :class:`ParamsError` naming ``key`` when it is wrong."""
    text, problem = read_chat_template(value)
    if problem:
        raise ParamsError(f"params key '{key}': {problem}")
    return text


# --------------------------------------------------------------------------------------------------
# named rules: the key they name depends on the values


def _target_names_known(pair: Any) -> Broken:
    """A target mapping's ``prompts`` and ``contrast`` name datasets of its pair."""
    if dataclasses.is_dataclass(pair.target):
        for part in ("prompts", "contrast"):
            unknown = [n for n in getattr(pair.target, part) or () if n not in pair.datasets]
            if unknown:
                return _broken(f"target.{part}", f"names of this pair's datasets ({sorted(pair.datasets)})",
                               unknown)
    return None


def _chat_templates_valid(pair: Any) -> Broken:
    """Each side's chat-template override is a readable Jinja template (or null)."""
    for side in ("base", "tuned"):
        problem = read_chat_template(getattr(pair, f"{side}_chat_template"))[1]
        if problem:
            return f"{side}_chat_template", problem
    return None


def _pair_names_are_words(params: Any) -> Broken:
    """Pair names are letters, digits and '_' (they become stage names and folder names)."""
    for name in params.pairs:
        if not name.replace("_", "").isalnum():
            return _broken(f"pairs.{name}", "a name of letters, digits and '_'", name)
    return None


def _organisms_built_when_used(params: Any) -> Broken:
    """No pair uses an embedded organism while ``organisms.build`` is false."""
    if not params.organisms.build:
        for name, pair in params.pairs.items():
            for side in ("base", "tuned"):
                if uses_organism(getattr(pair, side)):
                    return _broken(f"pairs.{name}.{side}", "a model other than the embedded organisms while "
                                   "organisms.build is false (set organisms.build: true to train them)",
                                   getattr(pair, side))
    return None


# --------------------------------------------------------------------------------------------------
# the table


_MODULES = f"a list drawn from {list(LLAMA_LINEAR_MODULES)}, non-empty unless policy_heads is set"
_AT_LEAST_1 = "an integer >= 1"

RULES: dict[str, tuple[Callable[[Any], Broken], ...]] = {
    "DatasetSpec": (
        Range("n", "a positive integer or null", gt=0),
        Rule("hub_id", lambda d: d.kind != "hub" or d.hub_id, "a non-empty string for kind 'hub'", "hub_id"),
        Rule("revision", lambda d: d.kind != "hub" or d.revision or d.path,
             "a non-empty string for kind 'hub' without `path:` (pin the dataset revision)", "revision"),
        Rule("path", lambda d: d.kind != "file" or d.path, "a file, folder or glob for kind 'file'", "path"),
        Rule("split_from_path", lambda d: not d.split_from_path or d.path,
             "false unless `path:` is set (the split is read from file paths)", "split_from_path"),
        Rule("fields.text", lambda d: d.kind == "world" or "text" in d.fields,
             "the source column holding the prompt text"),
        Range(("world_n_math", "world_n_neutral"), "positive counts", gt=0, key="world_n_*"),
    ),
    "TargetSpec": (
        Items("prompts", "a non-empty list of dataset names of this pair", nonempty=True),
        Rule("text", lambda t: t.text is None or t.measure in ("logprob", "match"),
             "null for measure {measure!r} (only logprob and match score a given text)", "text"),
        Rule("text", lambda t: t.text is None or t.text.strip(), "a non-empty continuation or null", "text"),
        Rule("contrast", lambda t: not set(t.prompts) & set(t.contrast or ()),
             "dataset names disjoint from target.prompts (a prompt is in one class)", "contrast"),
    ),
    "PairSpec": (
        Items("datasets", "at least one dataset", nonempty=True),
        Rule("target", lambda p: p.target is not None, "a built-in target (cultural, cognitive) or a mapping "
             "with measure and prompts for domain 'custom'", "target"),
        _target_names_known,
        _chat_templates_valid,
    ),
    "DataParams": (
        Range("dev_fraction", "a number in (0, 1)", gt=0.0, lt=1.0),
    ),
    "OrganismParams": (
        Range("n_layers", "at least 8 layers (the scan is every 2 layers)", ge=8),
        Rule("n_kv_heads", lambda o: o.n_heads % o.n_kv_heads == 0 and o.n_kv_heads < o.n_heads,
             "fewer KV heads than query heads, dividing n_heads (grouped-query attention)", "n_kv_heads"),
        Rule("hidden_size", lambda o: o.hidden_size % o.n_heads == 0, "a multiple of n_heads", "hidden_size"),
        Items("policy_layers", "layer indices in [0, {n_layers})", nonempty=True, ge=0, lt="n_layers"),
        Range("policy_rank", "a rank in [1, {hidden_size})", ge=1, lt="hidden_size"),
        Items("policy_modules", _MODULES, choices=LLAMA_LINEAR_MODULES),
        Rule("policy_modules", lambda o: o.policy_modules or o.policy_heads, _MODULES, "policy_modules"),
        Items("policy_heads", "distinct query-head indices in [0, {n_heads})", distinct=True, ge=0, lt="n_heads"),
        Rule("policy_modules",
             lambda o: not o.policy_heads or not {"self_attn.q_proj", "self_attn.o_proj"} & set(o.policy_modules),
             "no q_proj / o_proj when policy_heads confines those to the planted heads", "policy_modules"),
        *(Range(lr, "a positive learning rate", gt=0) for lr in ("pretrain_lr", "policy_lr", "embed_lr",
                                                                   "cognitive_lr")),
    ),
    "PlantedParams": (
        Range("rank", _AT_LEAST_1, ge=1),
        Range(("steps", "batch_size"), "steps and batch_size >= 1", ge=1),
        Range("lr", "a learning rate > 0", gt=0),
    ),
    "FairnessParams": (
        Items("modes", "at least one of strict, aligned, base_ids", nonempty=True),
        Rule("primary_mode", lambda f: f.primary_mode in f.modes, "one of modes {modes}", "primary_mode"),
    ),
    "LayerParams": (
        Range("scan_stride", _AT_LEAST_1, ge=1),
        Range("n_choose", "1 or 2 (the seed chooses 1-2 layers)", ge=1, le=2),
        Range("patch_prompts", _AT_LEAST_1, ge=1),
        Range("entry_threshold", "a fraction in (0, 1]", gt=0, le=1),
        Range("calibration_prompts", _AT_LEAST_1, ge=1),
        Range("n_bootstrap", "an integer >= 10", ge=10),
    ),
    "ActsParams": (
        Pattern("device", r"auto|cpu|split|cuda(:\d+)?", "'auto', 'cpu', 'cuda', 'cuda:<index>' or 'split'"),
    ),
    "CkaParams": (
        Range("n_permutations", _AT_LEAST_1, ge=1),
        Range("n_bootstrap", _AT_LEAST_1, ge=1),
    ),
    "MapParams": (
        Range("n_random", "an integer >= 1 (draws of the random-change control)", ge=1),
        Items("lambdas", "a non-empty list of positive ridge penalties", nonempty=True),
        Items("lambdas", "positive ridge penalties (lambda > 0)", gt=0),
        Range("min_positions", "a count in (0, n_positions]", gt=0, le="n_positions"),
        Range("heldout_fraction", "a number in (0, 1)", gt=0.0, lt=1.0),
        Range("cv_folds", "an integer >= 2", ge=2),
        Range("agreement_tolerance", "a positive number", gt=0),
        Range("pca_dim", "null or an integer >= 1", ge=1),
        Range("patch_alpha", "a strength in (0, 1] (patched base state = h_base + alpha * (v - h_base))", gt=0, le=1),
        Range("patch_prompts", _AT_LEAST_1, ge=1),
    ),
    "SteerParams": (
        Items("ks", "a non-empty list of ranks >= 1", nonempty=True, ge=1),
        Items("alphas", "a non-empty list of positive strengths", nonempty=True, gt=0),
        Range("max_neutral_drop_pp", "percentage points >= 0", ge=0),
        Range("max_ppl_increase", "a relative increase >= 0 (0.05 = 5%)", ge=0),
        Range("n_bootstrap", "an integer >= 10", ge=10),
        Range("max_prompts", "an integer >= 4 (prompts per part and split)", ge=4),
        Range("n_random", "an integer >= 1 (random subspaces per layer and k)", ge=1),
    ),
    "HeadPatchParams": (
        Items("kinds", "a non-empty list of distinct kinds among zero, mean, swap", nonempty=True, distinct=True),
        Range("max_prompts", "an integer >= 4 (dev and test need 2+ prompts)", ge=4),
        Range("top_m", "an integer >= 1 (heads confirmed jointly)", ge=1),
        Range("n_random", "an integer >= 1 (random head sets)", ge=1),
        Range("fdr", "a false discovery rate in (0, 1) (Benjamini-Hochberg level over heads x kinds, e.g. 0.05)",
              gt=0, lt=1),
        Range("n_bootstrap", "an integer >= 10", ge=10),
    ),
    "ChurnParams": (
        *(Range(name, "a positive threshold", gt=0) for name in ("z", "math_nats", "refusal_pp")),
        Range("top_k", _AT_LEAST_1, ge=1),
        Range("n_bootstrap", _AT_LEAST_1, ge=1),
        Range("n_splits", "an integer >= 1 (split-half repeats)", ge=1),
    ),
    "AttributionParams": (
        Range("max_prompts", "an integer >= 4 (split halves need 2+ prompts)", ge=4),
    ),
    "BehaviourParams": (
        Range("max_prompts", _AT_LEAST_1, ge=1),
        Range("n_bootstrap", _AT_LEAST_1, ge=1),
    ),
    "ReportParams": (
        Range("sharp_entry_min", "a number in (0, 1]", gt=0, le=1),
        Range("null_cka_min", "a number in (0, 1]", gt=0, le=1),
        Range("null_kl_max", "a number >= 0 (nats)", ge=0),
    ),
    "SuccessParams": (
        Range(("map_r2_min", "map_r2_strong"), "0 <= map_r2_min <= map_r2_strong <= 1", ge=0, le=1, ordered=True),
        Range(("target_effect_min", "target_effect_strong"), "0 < target_effect_min <= target_effect_strong <= 1",
              gt=0, le=1, ordered=True),
        Range("policy_max_k", _AT_LEAST_1, ge=1),
    ),
    "Params": (
        Items("pairs", "at least one pair", nonempty=True),
        _pair_names_are_words,
        _organisms_built_when_used,
    ),
}


def validate(section: Any, key: str) -> None:
    """Raise :class:`ParamsError` for the first constraint of :data:`RULES` that ``section`` (one built
    section of the schema, at dotted ``key``; ``""`` for the whole file) breaks."""
    for constraint in RULES.get(type(section).__name__, ()):
        broken = constraint(section)
        if broken:
            name, problem = broken
            raise ParamsError(f"params key '{key + '.' if key else ''}{name}': {problem}")
