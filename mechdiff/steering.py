"""RQ3: steering and ablation along rank-k subspaces, as forward hooks, and the batched sweep.

Mechanism. An :class:`Intervention` rewrites the residual stream after each block in ``layers``:
``h -> h + coef * (h U) U^T + (role vectors)``, which covers the operations of RQ3:

* :func:`ablation` ``h - h P`` (``P = U U^T``), at every position: remove the subspace from the tuned model;
* :func:`scaling` ``h + alpha h P``: the seed's steering formula (``steer.mode: scale``); it multiplies
  the component the base already has, so it cannot create a behaviour the base lacks;
* :func:`addition`: additive steering (``steer.mode: add``, the default) -- ``alpha * c * u`` with ``c``
  the typical projection norm (P28), the way a missing behaviour is induced (ActAdd; Arditi et al.);
  ``u`` is the dev-mean change inside a rank-k steering basis of the change's top singular directions
  (:meth:`SteeringSubspace.steering_vectors`), so the rank is the steering's own, not an artefact of
  which column holds the mean change.
  Vectors are placed by position role (:func:`position_roles`): ``end`` = the prompt's last token
  (where the fine-tune writes its decision), ``answer`` = answer tokens (where it writes the answer),
  ``all`` = everywhere. Measured on the cultural organism, one vector added everywhere induced at most
  about half of the planted refusals; role vectors fitted from the same paired changes induce them.

Subspace (:func:`fit_subspace`, :class:`SteeringSubspace`, float64, dev split only): the diff-in-means
direction of the paired fine-tuning change (tuned minus base at the same prompt and last token) between
target and neutral prompts (``steer.contrast: change``; ``tuned`` = the tuned model's own target-vs-
neutral contrast, as the seed wrote it -- on the cognitive organism it is the arithmetic-vs-question
direction that both models share, and ablating it breaks the skill rather than the fine-tune), then the
mean change at the answer tokens, then the SVD of the paired changes; explained variance and bootstrap
stability recorded.

Sweep. S settings on N prompts run in ONE batched pass per prompt batch: the batch is replicated
setting-major (row ``r`` belongs to setting ``r // N``) and one hook per block applies a per-row
transform (:class:`InterventionStack`). Setting 0 is :func:`identity`, so the clean model is measured in
the same pass with the same numerics. Effects are signed toward the other model (ablation: behaviour
removed; steering: induced); side effects are the perplexity increase on neutral text and an accuracy
drop (ablation: MC items plus non-target questions; steering: MC items, since a steered base answers
other questions with the induced behaviour -- reported apart as selectivity; :func:`side_ok`). k and
alpha are chosen on dev, reported on test (:func:`select`). Control (P29): ``steer.n_random`` random
subspaces of equal rank per (layer, k) run as settings of the same pass; a fitted setting is above noise
only when its bootstrap lower bound beats the 95th percentile of their effects (:func:`mark_controls`).

Legend: S settings, N prompts, R = S * N rows, T tokens, D d_model, K rank (zero-padded to the largest).
Pitfalls (anchors 5.6): P25 float64 and bootstrap, P26 centred paired differences and QR, P27 one layer
or every layer, P28 alpha in typical-norm units, P29 side effects and equal-rank random controls, P30
selection on dev.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mechdiff.architecture import adapter_for
from mechdiff.hooks import hooks, output_tensor, replace_output
from mechdiff.measures import (ROLES, continuation_scores, decode_texts, greedy_decode, judge, model_device,
                               next_token_logits, plain_kv, roles_in_effect, score_and_decode, sequence_nll)
from mechdiff.rendering import pad_batch
from mechdiff.stats import bootstrap_mean_interval
from mechdiff.subspace import orthonormal_basis

__all__ = ["Intervention", "InterventionStack", "ablation", "addition", "continuation_scores", "greedy_decode",
           "identity", "intervene", "next_token_logits", "scaling", "score_and_decode", "sequence_nll",
           "steer_resid_post_hook", "sweep"]


# --------------------------------------------------------------------------------------------------
# interventions


@dataclass(frozen=True)
class Intervention:
    """``h -> h + coef * (h U) U^T + sum_role [position has role] * bias[role]`` on the outputs of ``layers``.

    ``basis`` (D, K) float64 with orthonormal columns (K may be 0); ``biases`` maps roles of
    :data:`ROLES` to (D,) vectors; ``label`` names the setting in result tables.
    """

    basis: torch.Tensor
    coef: float
    layers: tuple[int, ...]
    biases: dict = field(default_factory=dict)
    label: str = ""

    def apply(self, h: torch.Tensor, roles: torch.Tensor | None = None) -> torch.Tensor:
        """Reference (one setting, float64) transform of states ``h`` (R, T, D) with ``roles`` (R, T)."""
        x = h.double()
        U = self.basis.to(x.device, torch.float64)
        out = x + self.coef * ((x @ U) @ U.T)
        roles = roles_in_effect() if roles is None else roles
        for i, role in enumerate(ROLES):
            if role in self.biases:
                sel = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if i == 0 else \
                    (roles == i).to(x.device) if roles is not None else torch.zeros(x.shape[:-1], dtype=torch.bool)
                out = out + sel[..., None] * self.biases[role].to(x.device, torch.float64)
        return out.to(h.dtype)


def _checked(U) -> torch.Tensor:
    return orthonormal_basis(U, None).cpu()


def _vector(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu()
    if not torch.isfinite(v).all():
        raise ValueError("the steering vector holds NaN or Inf")
    return v


def identity(d: int, layers: Sequence[int] = (), label: str = "clean") -> Intervention:
    """The no-op setting (measures the clean model inside a sweep)."""
    return Intervention(torch.zeros(d, 0, dtype=torch.float64), 0.0, tuple(layers), {}, label)


def ablation(U, layers: Sequence[int], label: str = "") -> Intervention:
    """Remove span(U): ``h - h U U^T`` (U (D, K) orthonormal) at every position."""
    return Intervention(_checked(U), -1.0, tuple(layers), {}, label)


def scaling(U, alpha: float, layers: Sequence[int], label: str = "") -> Intervention:
    """Scale the component in span(U) by ``1 + alpha``: ``h + alpha h U U^T``, at every position."""
    return Intervention(_checked(U), float(alpha), tuple(layers), {}, label)


def addition(vector=None, layers: Sequence[int] = (), label: str = "", end=None, answer=None) -> Intervention:
    """Add fixed vectors (D,): ``vector`` at every position (ActAdd), ``end`` at the prompt's last token,
    ``answer`` at answer tokens (see :func:`position_roles`)."""
    biases = {r: _vector(v) for r, v in (("all", vector), ("end", end), ("answer", answer)) if v is not None}
    if not biases:
        raise ValueError("addition needs at least one of vector, end, answer")
    d = next(iter(biases.values())).numel()
    return Intervention(torch.zeros(d, 0, dtype=torch.float64), 0.0, tuple(layers), biases, label)


class InterventionStack:
    """The settings of one layer's hook, as per-row tensors: rows ``[s*N, (s+1)*N)`` get setting ``s``.

    Settings not active at ``layer`` act as the identity there.
    """

    def __init__(self, interventions: Sequence[Intervention], layer: int, device=None,
                 dtype: torch.dtype = torch.float32):
        d = _width(interventions)
        k = max([iv.basis.shape[1] for iv in interventions] + [1])
        S = len(interventions)
        self.bases = torch.zeros(S, d, k, dtype=dtype, device=device)  # (S, D, K), zero-padded
        self.coefs = torch.zeros(S, dtype=dtype, device=device)  # (S,)
        self.biases = torch.zeros(S, len(ROLES), d, dtype=dtype, device=device)  # (S, roles, D)
        for s, iv in enumerate(interventions):
            if layer not in iv.layers:
                continue
            self.bases[s, :, : iv.basis.shape[1]] = iv.basis.to(device, dtype)
            self.coefs[s] = iv.coef
            for role, v in iv.biases.items():
                self.biases[s, ROLES.index(role)] = v.to(device, dtype)
        self.n_settings = S
        self.active = bool(self.coefs.abs().sum() > 0 or self.biases.abs().sum() > 0)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Transform states h (R, T, D) row by row (R must be a multiple of S); computed in the stack's dtype."""
        R, T, D = h.shape
        S = self.n_settings
        if R % S:
            raise ValueError(f"{R} rows cannot be split over {S} settings")
        x = h.to(self.bases.dtype).reshape(S, R // S, T, D)  # (S, N, T, D)
        coord = torch.einsum("sntd,sdk->sntk", x, self.bases)  # (S, N, T, K)
        out = x + torch.einsum("sntk,sdk->sntd", coord, self.bases) * self.coefs[:, None, None, None]
        out = out + self.biases[:, 0, None, None, :]
        roles = roles_in_effect()
        if roles is not None:
            onehot = torch.stack([roles == 1, roles == 2], -1).to(x.device, x.dtype)  # (R, T, 2)
            onehot = onehot.reshape(S, R // S, T, 2)
            out = out + torch.einsum("sntr,srd->sntd", onehot, self.biases[:, 1:])
        return out.reshape(R, T, D).to(h.dtype)


def _is_identity(iv: Intervention) -> bool:
    return iv.coef == 0 and not any(bool(v.abs().sum() > 0) for v in iv.biases.values())


def _width(interventions: Sequence[Intervention]) -> int:
    widths = {iv.basis.shape[0] for iv in interventions} | {v.numel() for iv in interventions
                                                            for v in iv.biases.values()}
    if len(widths) != 1:
        raise ValueError(f"interventions disagree on d_model: {sorted(widths)}")
    return widths.pop()


def steer_resid_post_hook(stack: InterventionStack) -> Callable:
    """Forward hook applying ``stack`` to a block's output (tuple or tensor)."""
    def hook(_module, _inputs, output):
        return replace_output(output, stack(output_tensor(output)))

    return hook


@contextlib.contextmanager
def intervene(model: torch.nn.Module, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Hooks applying the per-row settings at every block some setting uses; removed on exit."""
    adapter = adapter_for(model)
    p = next(model.parameters())
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    layers = sorted({i for iv in interventions for i in iv.layers})
    bad = [i for i in layers if not 0 <= i < adapter.n_layers]
    if bad:
        raise ValueError(f"intervention layers {bad} out of range for a {adapter.n_layers}-layer model")
    post = []
    for i in layers:
        stack = InterventionStack(interventions, i, p.device, dtype)
        if stack.active:
            post.append((adapter.layers[i], steer_resid_post_hook(stack)))
    with hooks(post=post):
        yield


# --------------------------------------------------------------------------------------------------
# the batched sweep


@contextlib.contextmanager
def shared_prefix(model: torch.nn.Module, n_settings: int, first_layer: int) -> Iterator[None]:
    """Run the blocks below ``first_layer`` (which no setting touches) on ONE copy of the replicated rows.

    Inside a sweep the S copies of the prompt batch are identical until the first intervened block, so
    those blocks run on the first N = R / S rows and the last of them tiles its output back to R rows
    (prefix reuse). This holds for cache-free forwards (teacher-forced scoring) and for the prefill of a
    greedy decode: there each such block's fresh KV-cache entries are tiled to R rows too, so the decode
    steps that follow (whose tokens differ per setting) run every block on all R rows as usual.
    Restored on exit.
    """
    layers = adapter_for(model).layers[:first_layer] if n_settings > 1 else []
    originals = [(layer.forward, "forward" in vars(layer)) for layer in layers]
    state = {"rows": None}  # R, seen by the first block (the others get N rows)

    def wrap(orig, idx: int, first: bool, last: bool):
        def forward(hidden_states, *args, **kwargs):
            cache = kwargs.get("cache")
            prefill = cache is not None and _tileable(cache, idx) and cache.get_seq_length(idx) == 0
            if args or (kwargs.get("use_cache") and not prefill) or (cache is not None and not prefill):
                state["rows"] = None
                return orig(hidden_states, *args, **kwargs)
            if first:
                state["rows"] = hidden_states.shape[0]
            R = state["rows"]
            if R is None or R % n_settings:  # not a replicated sweep batch: leave it alone
                return orig(hidden_states, *args, **kwargs)
            n = R // n_settings

            def cut(x):  # per-row tensors (mask, rotary tables, position ids) keep the first copy
                if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == R:
                    return x[:n]
                return tuple(cut(y) for y in x) if isinstance(x, tuple) else x
            out = orig(hidden_states[:n], **{k: cut(v) for k, v in kwargs.items()})
            if prefill:  # this block's cache now holds N rows: tile it like the hidden states
                entry = cache.layers[idx]
                entry.keys = entry.keys.repeat(n_settings, *[1] * (entry.keys.dim() - 1))
                entry.values = entry.values.repeat(n_settings, *[1] * (entry.values.dim() - 1))
            h = output_tensor(out)
            return replace_output(out, h.repeat(n_settings, *[1] * (h.dim() - 1)) if last else h)
        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = wrap(originals[i][0], i, i == 0, i == len(layers) - 1)
        yield
    finally:
        for layer, (orig, own) in zip(layers, originals):
            if own:
                layer.forward = orig
            else:
                del layer.forward  # back to the class's forward


def _tileable(cache, idx: int) -> bool:
    """A KV cache whose entry ``idx`` is :func:`mechdiff.measures.plain_kv` (its rows can be tiled)."""
    layers = getattr(cache, "layers", None)
    return layers is not None and idx < len(layers) and plain_kv(layers[idx]) and hasattr(cache, "get_seq_length")


def sweep(model: torch.nn.Module, interventions: Sequence[Intervention], measure: Callable,
          seqs: Sequence, max_rows: int = 2048, reuse_prefix: bool = True) -> list:
    """Run ``measure(model, rows)`` once per chunk of settings, on the prompts replicated setting-major.

    ``seqs`` holds N per-prompt items (e.g. token-id lists or (prompt, continuation) tuples);
    ``measure`` returns a tensor (or tuple of tensors) with the row axis first. Settings are chunked so
    that a forward holds at most ``max_rows`` rows (at least one setting per chunk). With
    ``reuse_prefix``, blocks below the first intervened one run once per chunk (:func:`shared_prefix`).

    Returns
    -------
    list of Tensor, one per output of ``measure``, each of shape (S, N, ...).
    """
    n = len(seqs)
    per_chunk = max(1, max_rows // max(n, 1))
    outs: list[list[torch.Tensor]] = []
    for start in range(0, len(interventions), per_chunk):
        chunk = interventions[start:start + per_chunk]
        used = [i for iv in chunk if not _is_identity(iv) for i in iv.layers]
        first = min(used) if used and reuse_prefix else 0
        with intervene(model, chunk), shared_prefix(model, len(chunk), first):
            res = measure(model, list(seqs) * len(chunk))
        res = res if isinstance(res, tuple) else (res,)
        outs.append([r.reshape(len(chunk), n, *r.shape[1:]) for r in res])
    return [torch.cat(parts) for parts in zip(*outs)]


# --------------------------------------------------------------------------------------------------
# measures (one forward or one decode over a list of rows; row axis first)



# --------------------------------------------------------------------------------------------------
# the fitted subspace


class SteeringSubspace:
    """Diff-in-means direction of a target-vs-neutral contrast plus a rank-k basis of paired differences.

    ``fit(target, neutral, paired, groups, paired_answer)``: ``direction_`` = unit ``mean(target) -
    mean(neutral)`` (float64, P25); the basis spans that direction, then the top singular vectors
    of the centred paired differences (tuned minus base, same prompt and position: at the prompt's last
    token, and at the answer tokens when ``paired_answer`` is given) with it projected out,
    orthonormalised (P26); ``basis_`` (D, k_max) orders those columns by the share of the change (the
    paired differences, not centred) each carries, descending (:func:`~mechdiff.subspace.sort_by_change_share`),
    so the contrast direction comes first only when it carries the most; ``change_share_`` (k_max,) those
    shares (descending); ``explained_variance_ratio_`` (k_max,) of the centred differences, per column in
    the same order (the spread around the mean change, so not monotone: the mean-change direction has little);
    ``change_captured_`` (k_max,) = ``||P_k m||^2 / ||m||^2`` for the mean last-token difference m;
    ``stability_`` (n_boot,) bootstrap cosines of the direction (whole prompt groups resampled).

    Steering (:meth:`steering_vectors`) is rank-k in its own nested basis ``steer_basis_`` (D, k_max): the
    top right singular vectors of the paired changes (not centred, both roles pooled), so it never holds
    the mean change m as a column and ``W_k W_k^T m`` grows with k (with U above, m or the contrast sits in
    span(U_2), so every k >= 2 would add the same vector). For each position role (``end`` = the prompt's
    last token, ``answer`` = answer tokens) the vector is ``alpha * c * unit(sum_j c_j w_j)`` with
    ``c_j = w_j . m_role`` the dev-mean projection of that role's change on direction j and ``c`` the
    typical projection norm of that role's paired differences on the unit vector (P28);
    ``steer_change_captured_`` (k_max,) = ``||W_k^T m||^2 / ||m||^2`` for the last-token mean change.
    With no change at all (a null pair) it is zero.
    """

    def __init__(self, k_max: int = 8, n_boot: int = 200, seed: int = 0):
        self.k_max, self.n_boot, self.seed = k_max, n_boot, seed

    def fit(self, target, neutral, paired, groups=None, paired_answer=None) -> SteeringSubspace:
        from mechdiff.subspace import bootstrap_stability, diff_in_means, rank_k_basis, sort_by_change_share

        T, N, Dp = (torch.as_tensor(x).double() for x in (target, neutral, paired))
        Da = None if paired_answer is None or len(paired_answer) == 0 else torch.as_tensor(paired_answer).double()
        if min(T.shape[0], N.shape[0], Dp.shape[0]) < 2:
            raise ValueError(f"need >= 2 target, neutral and paired rows; got {T.shape[0]}, {N.shape[0]}, "
                             f"{Dp.shape[0]}")
        self.diff_, self.direction_ = diff_in_means(T, N)
        k = min(self.k_max, Dp.shape[0] + (0 if Da is None else Da.shape[0]), Dp.shape[1])
        if Da is None:
            self.basis_, self.explained_variance_ratio_ = rank_k_basis(Dp, k, direction=self.direction_)
        else:
            self.basis_, self.explained_variance_ratio_ = _two_role_basis(Dp, Da, self.direction_, k)
        change = Dp if Da is None else torch.cat([Dp, Da])
        self.basis_, order, self.change_share_ = sort_by_change_share(self.basis_, change)
        self.explained_variance_ratio_ = self.explained_variance_ratio_[order]
        self.paired_ = {"end": Dp} if Da is None else {"end": Dp, "answer": Da}
        self.mean_change_ = Dp.mean(0)
        m2 = float(self.mean_change_ @ self.mean_change_)
        proj = torch.cumsum((self.mean_change_ @ self.basis_) ** 2, 0)
        self.change_captured_ = (proj / m2).numpy() if m2 > 0 else np.zeros(k)
        self.steer_basis_ = _change_basis(change, k)
        sproj = torch.cumsum((self.mean_change_ @ self.steer_basis_) ** 2, 0)
        self.steer_change_captured_ = (sproj / m2).numpy() if m2 > 0 else np.zeros(k)
        self.stability_ = bootstrap_stability(T, N, self.n_boot, self.seed, groups)
        return self

    def basis(self, k: int) -> torch.Tensor:
        """The first k columns (D, k) of the fitted basis (the fit is nested in k)."""
        if not hasattr(self, "basis_"):
            raise RuntimeError("SteeringSubspace is not fitted; call fit() first")
        if not 1 <= k <= self.basis_.shape[1]:
            raise ValueError(f"k={k} outside the fitted ranks 1..{self.basis_.shape[1]}")
        return self.basis_[:, :k]

    def steering_basis(self, k: int) -> torch.Tensor:
        """The first k columns (D, k) of the steering basis (top singular directions of the change)."""
        self.basis(k)  # fitted and in range
        return self.steer_basis_[:, :k]

    def steering_vectors(self, k: int, alpha: float) -> dict[str, torch.Tensor]:
        """Per role (``end``, ``answer``): ``alpha * c * unit(W_k c_role)`` (D,) float64 with ``c_role = W_k^T
        m_role`` (k,) the per-direction dev-mean projections; zero when the role's mean change has no part
        in span(W_k)."""
        from mechdiff.subspace import typical_projection_norm

        W = self.steering_basis(k)
        out = {}
        for role, D in self.paired_.items():
            mk = W @ (W.T @ D.mean(0))
            norm = float(mk.norm())
            if norm <= 1e-9 * max(1.0, float(D.norm(dim=1).mean())):
                out[role] = torch.zeros_like(mk)
                continue
            unit = mk / norm
            out[role] = alpha * typical_projection_norm(D, unit[:, None]) * unit
        return out


def _change_basis(change: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors (D, k) of the paired changes ``change`` (n, D), not centred (a shift
    every row shares is part of the change), signed so the mean change projects >= 0; descending in the
    share of the change each carries. Zero columns are completed to an orthonormal set by QR."""
    V = torch.linalg.svd(change, full_matrices=False)[2][:k].T  # (D, <=k)
    if V.shape[1] < k:
        V = torch.linalg.qr(torch.cat([V, torch.eye(change.shape[1], k - V.shape[1], dtype=V.dtype)], 1))[0]
    return V * torch.where(change.mean(0) @ V < 0, -1.0, 1.0).to(V.dtype)


def _two_role_basis(Dp: torch.Tensor, Da: torch.Tensor, direction: torch.Tensor, k: int):
    """Orthonormal (D, k) basis: the diff-in-means direction, the mean answer-position change, then the top
    singular vectors of the paired differences centred per role with those two projected out (QR);
    returns it with the explained variance ratio of the centred differences per column."""
    heads = [direction / direction.norm()]
    ma = Da.mean(0)
    if float(ma.norm()) > 1e-9 * max(1.0, float(Da.norm(dim=1).mean())):
        heads.append(ma / ma.norm())
    C = torch.cat([Dp - Dp.mean(0), Da - Da.mean(0)])  # (n, D), centred per role
    Q = torch.linalg.qr(torch.stack(heads, 1))[0][:, : min(len(heads), k)]  # (D, h)
    n_rest = k - Q.shape[1]
    rest = torch.linalg.svd(C - (C @ Q) @ Q.T, full_matrices=False)[2][:n_rest].T  # (D, k - h)
    basis = torch.linalg.qr(torch.cat([Q, rest], 1))[0]  # (D, k)
    refs = torch.stack(heads + [Dp.mean(0)] * k, 1)[:, :k]  # orient column j along heads[j] (else the mean)
    basis = basis * torch.where((basis * refs).sum(0) < 0, -1.0, 1.0).to(basis.dtype)
    total = C.square().sum()
    ratio = (C @ basis).square().sum(0) / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    return basis, ratio.numpy()


def no_change(paired: torch.Tensor, states: torch.Tensor, rtol: float = 1e-6) -> bool:
    """True when the paired differences (n, D) vanish next to the states' typical norm (a null pair)."""
    return float(paired.norm(dim=1).max()) <= rtol * max(float(states.norm(dim=1).mean()), 1e-30)


# --------------------------------------------------------------------------------------------------
# prompts and rows of a pair


TARGET_TASK = {"cultural": "refusal", "cognitive": "math", "null": "refusal"}
_QUESTION_TASKS = ("topic", "freeform", "refusal")


def prompt_parts(frame, task: str) -> dict:
    """Split a filtered prompt table into ``target``, ``other`` (the neutral contrast: non-target
    questions), ``mc`` and ``neutral`` frames. ``refusal``: target = questions with ``target`` set;
    ``math``: target = math problems with an answer, other = every question. A pair without any such
    question (e.g. harmful requests against harmless instructions) contrasts with its ``neutral`` prompts."""
    q = frame["task"].isin(_QUESTION_TASKS)
    neutral = frame[frame["task"] == "neutral"]
    if task == "refusal":
        target, other = frame[q & frame["target"]], frame[q & ~frame["target"]]
    else:
        target, other = frame[(frame["task"] == "math") & frame["answer"].notna()], frame[q]
    return {"target": target, "other": other if len(other) else neutral, "mc": frame[frame["task"] == "mc"],
            "neutral": neutral}


def cap_parts(parts: dict, n: int, seed: int) -> dict:
    """At most ``n`` prompts per part and split (a seeded sample, original order kept)."""
    def cap(f):
        keep = [g.sample(n=min(n, len(g)), random_state=seed).index for _, g in f.groupby("split", sort=True)]
        return f.loc[sorted(i for idx in keep for i in idx)]
    return {k: cap(v) if len(v) else v for k, v in parts.items()}


def opening(language: str) -> str:
    """The refusal opening the soft score is computed on, in ``language`` (English otherwise)."""
    from mechdiff import world

    langs = world.LANGUAGES
    return world.REFUSAL_PREFIXES[langs.index(language)] if language in langs else world.REFUSAL_PREFIXES[0]


def continuation_texts(frame, task: str) -> list[str]:
    """The target continuation of each prompt: the refusal opening in its language, or `` <answer>``."""
    return [" " + (opening(lang) if task == "refusal" else str(a))
            for lang, a in zip(frame["language"], frame["answer"])]


@dataclass(frozen=True)
class PromptRows:
    """One model's token rows for a sweep (all ids start with the single BOS).

    ``target``: (prompt ids, continuation ids) per target prompt (the continuation is the refusal
    opening, or `` <answer>``) and ``references`` (the answer text, or ``""``); ``qa``: (prompt ids,
    `` <reference answer>`` ids) for non-target questions with an answer (neutral accuracy);
    ``qa_opening``: (prompt ids, refusal opening ids) for the same questions (false refusals;
    refusal task only); ``mc`` with ``mc_answers`` (index into ``letter_ids``); ``neutral`` texts.
    """

    target: list
    references: list
    qa: list
    qa_opening: list
    mc: list
    mc_answers: list
    letter_ids: list
    neutral: list


def prompt_rows(parts: dict, tok, ids_col: str, task: str) -> PromptRows:
    """Token rows of one model (``ids_col`` = ``base_input_ids`` or ``tuned_input_ids``)."""
    from mechdiff.world import MC_LETTERS

    def ids(frame):
        return [list(map(int, x)) for x in frame[ids_col]]

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    tgt, oth, mc = parts["target"], parts["other"], parts["mc"]
    cont = [enc(t) for t in continuation_texts(tgt, task)]
    qa = [(p, enc(" " + str(a))) for p, a in zip(ids(oth), oth["answer"]) if a is not None]
    answered = oth[oth["answer"].notna()]
    qa_opening = [(p, enc(" " + opening(lang))) for p, lang in zip(ids(answered), answered["language"])] \
        if task == "refusal" else []
    letters = list(MC_LETTERS)
    return PromptRows(target=list(zip(ids(tgt), cont)),
                      references=[str(a) if task == "math" else "" for a in tgt["answer"]],
                      qa=qa, qa_opening=qa_opening, mc=ids(mc),
                      mc_answers=[letters.index(str(a)) if str(a) in letters else -1 for a in mc["answer"]],
                      letter_ids=[enc(" " + c)[0] for c in letters], neutral=ids(parts["neutral"]))


def layer_states(model, rows: Sequence[Sequence[int]], positions: Sequence[int], layer: int, pad_id: int,
                 batch_size: int = 64) -> torch.Tensor:
    """Residual after block ``layer`` (n, D) float64, row i read at token ``positions[i]``."""
    from mechdiff.architecture import site_name
    from mechdiff.capture import capture

    site, out, dev = site_name(layer), [], model_device(model)
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start:start + batch_size]]
        ids, mask = pad_batch(chunk, pad_id, "right")
        sel = torch.stack([torch.arange(len(chunk)), torch.as_tensor(list(positions[start:start + len(chunk)]))], 1)
        out.append(capture(model, ids.to(dev), mask.to(dev), [site], sel)[site].double())
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size, dtype=torch.float64)


def paired_inputs(frame, modes: Sequence[str]) -> list[dict]:
    """Per prompt, the first of ``modes`` that keeps it: the ids both models read, the last compared
    positions and the mode (``base_ids``/``tuned_ids``/``base_pos``/``tuned_pos``/``mode``/``group``);
    prompts no mode keeps are left out."""
    out = []
    for r in frame.to_dict("records"):
        for mode in modes:
            if r.get(f"kept_{mode}"):
                base = list(map(int, r["base_input_ids"]))
                tuned = base if mode == "base_ids" else list(map(int, r["tuned_input_ids"]))
                out.append({"base_ids": base, "tuned_ids": tuned, "base_pos": int(r[f"pos_base_{mode}"][-1]),
                            "tuned_pos": int(r[f"pos_tuned_{mode}"][-1]), "mode": mode, "group": r["group"]})
                break
    return out


def paired_states(base, tuned, pairs: Sequence[dict], layer: int, pads: tuple[int, int]) -> tuple:
    """``(base states, tuned states)`` (n, D) float64 at the paired positions."""
    b = layer_states(base, [p["base_ids"] for p in pairs], [p["base_pos"] for p in pairs], layer, pads[0])
    t = layer_states(tuned, [p["tuned_ids"] for p in pairs], [p["tuned_pos"] for p in pairs], layer, pads[1])
    return b, t


def answer_diffs(base, tuned, toks, frame, task: str, layer: int) -> torch.Tensor:
    """Tuned minus base states (n, D) float64 at the target continuation's tokens (the answer positions),
    teacher-forced on inputs both models read token by token (``strict`` or ``base_ids``)."""
    from mechdiff.head_patch import aligned_rows

    rows = aligned_rows(frame, toks, continuation_texts(frame, task), ["strict", "base_ids"])
    pads = _pads(toks)
    out = []
    for side in ("base", "tuned"):
        seqs, pos = [], []
        for r in rows:
            p, c = r[side]
            seqs += [list(p) + list(c)] * len(c)
            pos += list(range(len(p), len(p) + len(c)))
        out.append(layer_states(base if side == "base" else tuned, seqs, pos, layer, pads[side == "tuned"]))
    return out[1] - out[0]


def fit_subspace(base, tuned, toks, parts: dict, layer: int, modes: Sequence[str], task: str, contrast: str,
                 k_max: int, n_boot: int, seed: int) -> tuple[SteeringSubspace, dict]:
    """The RQ3 subspace of one layer from the prompts in ``parts`` (e.g. the dev split).

    ``contrast="change"`` (default): the diff-in-means of the paired fine-tuning change (tuned minus base
    at the same prompt and last token) between target and neutral prompts -- the target-vs-neutral
    contrast of the tuned model minus the same contrast of the base, so directions both models share
    (the topic, the arithmetic format) are left out. ``"tuned"``: the tuned model's own target-vs-neutral
    contrast. Without any change (a null pair) ``change`` falls back to ``tuned``. The basis is completed
    from the paired changes on target prompts at their last token and at the answer tokens. Returns the
    fitted subspace and a JSON-ready description.
    """
    pads = _pads(toks)
    pt, po = paired_inputs(parts["target"], modes), paired_inputs(parts["other"], modes)
    if len(pt) < 2 or len(po) < 2:
        raise ValueError(f"need >= 2 target and >= 2 neutral prompts kept in a mode of {list(modes)}; "
                         f"got {len(pt)} and {len(po)}")
    bt, tt = paired_states(base, tuned, pt, layer, pads)
    bo, to = paired_states(base, tuned, po, layer, pads)
    used = contrast
    if contrast == "change" and no_change(torch.cat([tt - bt, to - bo]), torch.cat([tt, to])):
        used = "tuned"
    A, B = (tt - bt, to - bo) if used == "change" else (tt, to)
    groups = (np.array([p["group"] for p in pt]), np.array([p["group"] for p in po]))
    ans = answer_diffs(base, tuned, toks, parts["target"], task, layer)
    sub = SteeringSubspace(k_max, n_boot, seed).fit(A, B, tt - bt, groups, ans)
    modes_used = {m: sum(p["mode"] == m for p in pt + po) for m in modes}
    info = {"contrast": used, "contrast_asked": contrast, "n_target": len(pt), "n_neutral": len(po),
            "n_answer_positions": len(ans), "paired_modes": modes_used,
            "change_share": sub.change_share_.tolist(),
            "explained_variance_ratio": sub.explained_variance_ratio_.tolist(),
            "change_captured": sub.change_captured_.tolist(),
            "steer_change_captured": sub.steer_change_captured_.tolist(), "diff_norm": float(sub.diff_.norm()),
            "mean_change_norm": float(sub.mean_change_.norm()),
            "mean_answer_change_norm": float(ans.mean(0).norm()) if len(ans) else 0.0,
            "stability_cosine_mean": float(np.nanmean(sub.stability_)),
            "stability_cosine_q05": float(np.nanquantile(sub.stability_, 0.05))}
    return sub, info


# --------------------------------------------------------------------------------------------------
# task measures over a sweep


def evaluate(model, tok, rows: PromptRows, interventions: Sequence[Intervention], task: str, n_new: int,
             max_rows: int = 2048) -> dict[str, np.ndarray]:
    """Every measure of every setting, per prompt; each measure is one batched pass per chunk of settings.

    Returns ``hard`` (S, N) bool (greedy answer refused / correct), ``soft`` (S, N) log-prob of the
    target continuation, ``qa`` (S, N_qa) bool (greedy reproduces the reference answer of a non-target
    question), ``false_refusal`` (S, N_qa) bool (greedy emits the refusal opening on that question instead;
    refusal task only), ``mc`` (S, N_mc) bool (masked MC correct), ``nll`` (S, N_neutral), ``tokens`` (N_neutral,).
    """
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    S = len(interventions)

    def run(measure, seqs):
        return sweep(model, interventions, measure, seqs, max_rows)

    def greedy_match(seqs):
        return run(lambda m, r: continuation_scores(m, r, pad), seqs)[1].numpy() if seqs else np.zeros((S, 0), bool)

    soft, _, gen = run(lambda m, r: score_and_decode(m, r, pad, n_new, tok.eos_token_id), rows.target)
    out = {"hard": judge(task, decode_texts(tok, gen), list(rows.references) * S).reshape(S, -1), "soft": soft.numpy(),
           "qa": greedy_match(rows.qa), "false_refusal": greedy_match(rows.qa_opening)}
    if rows.mc:
        logits = run(lambda m, r: next_token_logits(m, r, pad), rows.mc)[0]
        out["mc"] = logits[..., list(rows.letter_ids)].argmax(-1).numpy() == np.asarray(rows.mc_answers)[None]
    else:
        out["mc"] = np.zeros((S, 0), dtype=bool)
    if rows.neutral:
        nll, tokens = run(lambda m, r: sequence_nll(m, r, pad), rows.neutral)
        out["nll"], out["tokens"] = nll.numpy(), tokens[0].numpy()
    else:
        out["nll"], out["tokens"] = np.zeros((S, 0)), np.zeros(0, dtype=np.int64)
    return out


def evaluate_with_controls(model, tok, rows: PromptRows, settings: Sequence[tuple[Setting, Intervention]], task: str,
                           n_new: int, max_rows: int = 2048) -> dict[str, np.ndarray]:
    """:func:`evaluate` of ``settings`` (clean first), where the random-subspace draws are measured on the
    target prompts only: a control's effect is all :func:`mark_controls` reads, so its side-effect measures
    (``qa``, ``false_refusal``, ``mc``, ``nll``) are ``nan`` instead of four more passes per draw. The
    arrays keep the settings' order; the side-effect arrays are float (1.0 / 0.0 / nan) when draws exist."""
    draws = np.array([st.subspace == "random" for st, _ in settings])
    if not draws.any():
        return evaluate(model, tok, rows, [iv for _, iv in settings], task, n_new, max_rows)
    if draws[0]:
        raise ValueError("setting 0 must be the clean run, not a random draw")
    main = evaluate(model, tok, rows, [iv for (_, iv), d in zip(settings, draws) if not d], task, n_new, max_rows)
    target_only = PromptRows(rows.target, rows.references, [], [], [], [], rows.letter_ids, [])
    ctrl = evaluate(model, tok, target_only, [iv for (_, iv), d in zip(settings, draws) if d], task, n_new, max_rows)
    out = {"tokens": main["tokens"]}
    for key, got in main.items():
        if key == "tokens":
            continue
        full = np.full((len(settings), *got.shape[1:]), np.nan, dtype=got.dtype if key in ("hard", "soft") else float)
        full[~draws] = got
        if key in ("hard", "soft"):
            full[draws] = ctrl[key]
        out[key] = full
    return out


def _mean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if x.size else float("nan")


def summarise_settings(ev: dict[str, np.ndarray], cols: dict[str, np.ndarray]) -> list[dict]:
    """Per setting, the measures over the prompt columns ``cols`` (index arrays for ``target``, ``qa``,
    ``other``, ``mc``, ``neutral``). ``neutral_acc`` pools the MC items and the non-target questions (greedy
    reproduces the reference answer); ``false_refusal``: share of those questions answered with the
    refusal opening instead. See :func:`side_ok` for which accuracy limits which direction."""
    t, q, m, n = (cols[k] for k in ("target", "qa", "mc", "neutral"))
    out = []
    for s in range(ev["hard"].shape[0]):
        fr = ev["false_refusal"][s, q] if ev["false_refusal"].shape[1] else np.zeros(0, dtype=bool)
        pooled = np.concatenate([ev["mc"][s, m], ev["qa"][s, q]])  # MC items + non-target questions
        out.append({"n_target": len(t), "rate": _mean(ev["hard"][s, t]), "soft": _mean(ev["soft"][s, t]),
                    "mc_acc": _mean(ev["mc"][s, m]), "qa_acc": _mean(ev["qa"][s, q]), "neutral_acc": _mean(pooled),
                    "n_neutral_items": len(pooled),
                    "false_refusal": _mean(fr) if ev["false_refusal"].shape[1] else float("nan"),
                    "ppl": float(np.exp(ev["nll"][s, n].sum() / ev["tokens"][n].sum())) if len(n) else float("nan")})
    return out


# --------------------------------------------------------------------------------------------------
# one layer's sweep: settings, effects, controls, selection


@dataclass(frozen=True)
class Setting:
    """What a sweep row did: ``direction`` (``clean``, ``ablate_tuned``, ``steer_base``), ``site``
    (``layer`` = the chosen block only, ``all`` = every block, P27), ``subspace`` (``fitted``, ``random``),
    ``draw`` (which random subspace of equal rank; 0 for the others)."""

    direction: str
    site: str = "layer"
    subspace: str = "none"
    k: int = 0
    alpha: float = 0.0
    draw: int = 0


def steer_intervention(sub: SteeringSubspace, k: int, alpha: float, layers: Sequence[int], mode: str,
                       random_basis: torch.Tensor | None = None) -> Intervention:
    """Steering of the base at rank k: ``add`` (the fitted vectors at the prompt's last token and at answer
    tokens; for a random basis, random unit vectors of its span at the same norms, P29) or ``scale``
    (``h + alpha h P`` at every position)."""
    if mode == "scale":
        return scaling(sub.basis(k) if random_basis is None else random_basis, alpha, layers)
    vecs = sub.steering_vectors(k, alpha)
    if random_basis is not None:
        g = torch.Generator().manual_seed(random_basis.shape[1])
        for role, v in vecs.items():
            r = random_basis @ torch.randn(random_basis.shape[1], generator=g, dtype=torch.float64)
            vecs[role] = float(v.norm()) * r / r.norm()
    return addition(layers=layers, **vecs)


def random_bases(d: int, ks: Sequence[int], layer: int, seed: int, n_random: int) -> dict[int, list[torch.Tensor]]:
    """Per k, ``n_random`` independent random orthonormal bases (d, k), float64, seeded by (seed, layer, k,
    draw); draw 0 is the single control drawn before ``steer.n_random`` existed."""
    from mechdiff.subspace import random_subspace

    return {k: [random_subspace(d, k, seed=seed + 1000 * layer + k + 100_003 * j) for j in range(n_random)]
            for k in ks}


def build_settings(sub: SteeringSubspace, layer: int, n_layers: int, ks: Sequence[int], alphas: Sequence[float],
                   mode: str, all_layers: bool, seed: int, n_random: int = 1) -> tuple[list, list]:
    """``(tuned, base)`` lists of ``(Setting, Intervention)``, clean first: ablations of the fitted
    subspace and of ``n_random`` random subspaces of equal rank (at the layer, and at every layer if
    ``all_layers``) for the tuned model; steering (fitted and the random draws, every k and alpha) for the
    base. The draws are ordinary settings, so they run in the same batched forward as the fitted ones."""
    d = sub.basis_.shape[0]
    ks = [k for k in ks if k <= sub.basis_.shape[1]]
    rand = random_bases(d, ks, layer, seed, n_random)
    sites = [("layer", (layer,))] + ([("all", tuple(range(n_layers)))] if all_layers else [])
    tuned = [(Setting("clean"), identity(d))]
    for site, layers in sites:
        for k in ks:
            tuned.append((Setting("ablate_tuned", site, "fitted", k), ablation(sub.basis(k), layers)))
            tuned += [(Setting("ablate_tuned", site, "random", k, draw=j), ablation(U, layers))
                      for j, U in enumerate(rand[k])]
    base = [(Setting("clean"), identity(d))]
    for k in ks:
        for a in alphas:
            base.append((Setting("steer_base", "layer", "fitted", k, a), steer_intervention(sub, k, a, (layer,), mode)))
            base += [(Setting("steer_base", "layer", "random", k, a, j), steer_intervention(sub, k, a, (layer,), mode, U))
                     for j, U in enumerate(rand[k])]
    return tuned, base


def effect_rows(settings: Sequence[Setting], ev: dict, cols: dict, gap_rate: float, n_boot: int,
                seed: int) -> list[dict]:
    """Result-table rows of one model's sweep on one prompt subset (``cols``): the measures, the signed
    effect toward the other model (ablation: behaviour removed; steering: behaviour induced) with a
    bootstrap interval, its fraction of the base-to-tuned gap, and the side effects against clean."""
    summ = summarise_settings(ev, cols)
    clean, t = summ[0], cols["target"]
    rows = []
    for s, (st, m) in enumerate(zip(settings, summ)):
        sign = -1.0 if st.direction == "ablate_tuned" else 1.0
        per_prompt = sign * (ev["hard"][s, t].astype(float) - ev["hard"][0, t].astype(float))
        lo, hi = bootstrap_mean_interval(per_prompt, n_boot, seed + s)
        effect = sign * (m["rate"] - clean["rate"])
        rows.append({**st.__dict__, **m, "effect": effect, "effect_lo": lo, "effect_hi": hi,
                     "soft_effect": sign * (m["soft"] - clean["soft"]),
                     "fraction_of_gap": effect / gap_rate if abs(gap_rate) > 1e-9 else float("nan"),
                     "neutral_drop_pp": 100.0 * (clean["neutral_acc"] - m["neutral_acc"]),
                     "mc_drop_pp": 100.0 * (clean["mc_acc"] - m["mc_acc"]),
                     "qa_drop_pp": 100.0 * (clean["qa_acc"] - m["qa_acc"]),
                     "ppl_increase": m["ppl"] / clean["ppl"] - 1.0,
                     "false_refusal_increase": m["false_refusal"] - clean["false_refusal"]})
    return rows


#: the quantile of the random draws' effects a fitted subspace must beat (P29)
CONTROL_QUANTILE = 0.95


def mark_controls(rows: list[dict], q: float = CONTROL_QUANTILE) -> list[dict]:
    """Add ``control_effect`` (the ``q`` quantile of the random draws' effects at the same direction, site,
    k, alpha, split and language, so an effect a random subspace of equal rank reaches is noise),
    ``n_control`` (the draws behind it) and ``above_noise`` (fitted rows whose bootstrap lower bound
    exceeds 0 and that control; without draws, 0 alone)."""
    key = ("direction", "site", "k", "alpha", "split", "language")
    draws: dict[tuple, list[float]] = {}
    for r in rows:
        if r["subspace"] == "random":
            draws.setdefault(tuple(r.get(c) for c in key), []).append(r["effect"])
    for r in rows:
        e = np.asarray(draws.get(tuple(r.get(c) for c in key), []), dtype=float)
        e = e[np.isfinite(e)]
        c = float(np.quantile(e, q)) if e.size else float("nan")
        r["control_effect"], r["n_control"] = c, int(e.size)
        r["above_noise"] = bool(r["subspace"] == "fitted" and r["effect_lo"] > max(0.0, c if c == c else 0.0))
    return rows


SIDE_EFFECT_ACCURACY = {"ablate_tuned": "neutral_drop_pp", "steer_base": "mc_drop_pp"}


def side_ok(row: dict, max_drop_pp: float, max_ppl_increase: float) -> bool:
    """Side effects within limits: the perplexity increase on neutral text, and an accuracy drop -- for an
    ablation the pooled neutral accuracy (MC items and the non-target questions), for steering the MC
    accuracy only, because on non-target *questions* a steered base shows the induced behaviour itself
    (its spread is reported as selectivity: ``qa_drop_pp``, ``false_refusal_increase``). A NaN measure
    (e.g. no MC items) does not block."""
    drop = row[SIDE_EFFECT_ACCURACY.get(row["direction"], "neutral_drop_pp")]
    return not drop > max_drop_pp and not row["ppl_increase"] > max_ppl_increase


def reached(row: dict, target_min: float, max_drop_pp: float, max_ppl_increase: float) -> bool:
    return bool(row["effect"] >= target_min and side_ok(row, max_drop_pp, max_ppl_increase))


def choose(dev: list[dict], target_min: float, max_drop_pp: float, max_ppl_increase: float) -> dict | None:
    """The minimal-k setting among dev rows of one direction and site (fitted subspace): the smallest k
    reaching ``target_min`` with side effects in limits, at the alpha with the largest effect there
    (ties: the smaller alpha). None when no k reaches it."""
    ok = [r for r in dev if reached(r, target_min, max_drop_pp, max_ppl_increase)]
    if not ok:
        return None
    k = min(r["k"] for r in ok)
    return max((r for r in ok if r["k"] == k), key=lambda r: (r["effect"], -r["alpha"]))


_REPORT = ("k", "alpha", "rate", "soft", "effect", "effect_lo", "effect_hi", "soft_effect", "fraction_of_gap",
           "neutral_acc", "neutral_drop_pp", "mc_drop_pp", "qa_drop_pp", "ppl_increase", "false_refusal_increase",
           "control_effect", "above_noise")


def _on_test(best: dict, test: list[dict], ctrl: list[dict], target_min: float, max_drop_pp: float,
             max_ppl_increase: float) -> dict:
    """A dev-chosen setting (``best``) and the same (k, alpha) on test, fitted (``test``) and random
    (``ctrl``): the reported columns of each (``random_test``: the draw with the largest test effect, with
    ``n_draws`` and every draw's ``draw_effects``) and ``test_reached`` (the test row meets the same target
    with side effects in limits)."""
    def same(xs):
        return [x for x in xs if (x["k"], x["alpha"]) == (best["k"], best["alpha"])]

    t, c = same(test), same(ctrl)
    top = max(c, key=lambda x: x["effect"]) if c else None
    return {"dev": {c_: best[c_] for c_ in _REPORT}, "test": {c_: t[0][c_] for c_ in _REPORT} if t else None,
            "random_test": {**{c_: top.get(c_) for c_ in _REPORT}, "n_draws": len(c),
                            "draw_effects": [x["effect"] for x in c]} if c else None,
            "test_reached": bool(t and reached(t[0], target_min, max_drop_pp, max_ppl_increase))}


def select(rows: list[dict], target_min: float, max_drop_pp: float, max_ppl_increase: float) -> dict:
    """Choose on dev, report on test, per direction and site; and the headline ``minimal_k``: the
    smallest k whose fitted subspace both removes the behaviour from the tuned model (ablation at the
    layer) and induces it in the base (some alpha), each on dev with side effects in limits -- a
    steerable handle, not only a part that can be broken. None if no swept k does both.

    The dev choice is then held to the test split, never re-chosen there: ``handle`` is the minimal k's
    setting in both directions (at that k, the alpha with the largest dev effect) with its test and
    random-control rows; ``test_confirmed`` is True when both directions reach the target on test with
    side effects in limits (None without a dev choice), and ``confirmed_minimal_k`` is the minimal k
    when confirmed, else None. Only a confirmed k is evidence of a low-rank handle
    (:func:`mechdiff.verdict.criteria`)."""
    rows = [r for r in rows if r.get("probe", "main") == "main"]
    limits = (target_min, max_drop_pp, max_ppl_increase)

    def pick(r, split, subspace="fitted"):
        return [x for x in rows if x["direction"] == r[0] and x["site"] == r[1] and x["split"] == split
                and x["subspace"] == subspace]

    out, reach = {}, {}
    for direction, site in sorted({(r["direction"], r["site"]) for r in rows if r["direction"] != "clean"}):
        dev = pick((direction, site), "dev")
        reach[(direction, site)] = {r["k"] for r in dev if reached(r, *limits)}
        best = choose(dev, *limits)
        entry = {"minimal_k": None if best is None else best["k"], "alpha": None if best is None else best["alpha"],
                 "max_dev_effect": max((r["effect"] for r in dev), default=float("nan"))}
        if best is not None:
            entry.update(_on_test(best, pick((direction, site), "test"), pick((direction, site), "test", "random"),
                                  *limits))
        out[f"{direction}@{site}"] = entry
    both = reach.get(("ablate_tuned", "layer"), set()) & reach.get(("steer_base", "layer"), set())
    k = min(both) if both else None
    out["minimal_k"] = k
    out["handle"] = None
    if k is not None:
        handle = {"k": k}
        for direction in ("ablate_tuned", "steer_base"):
            key = (direction, "layer")
            best = choose([r for r in pick(key, "dev") if r["k"] == k], *limits)
            handle[f"{direction}@layer"] = {"alpha": best["alpha"], **_on_test(
                best, pick(key, "test"), pick(key, "test", "random"), *limits)}
        handle["test_confirmed"] = all(handle[f"{d}@layer"]["test_reached"] for d in ("ablate_tuned", "steer_base"))
        out["handle"] = handle
    out["test_confirmed"] = None if k is None else out["handle"]["test_confirmed"]
    out["confirmed_minimal_k"] = k if out["test_confirmed"] else None
    return out


# --------------------------------------------------------------------------------------------------
# the whole sweep of one layer, and its robustness checks


def subset_cols(parts: dict, **where) -> dict[str, np.ndarray]:
    """Row indices per measure (``target``, ``qa``, ``other``, ``mc``, ``neutral``) of the prompts whose
    columns equal ``where`` (e.g. ``split="test"``); ``qa`` counts only questions with an answer."""
    def idx(frame):
        ok = np.ones(len(frame), dtype=bool)
        for col, val in where.items():
            ok &= (frame[col] == val).to_numpy()
        return ok
    other = parts["other"]
    has_answer = other["answer"].notna().to_numpy()
    return {"target": np.flatnonzero(idx(parts["target"])), "other": np.flatnonzero(idx(other)),
            "qa": np.flatnonzero(idx(other)[has_answer]), "mc": np.flatnonzero(idx(parts["mc"])),
            "neutral": np.flatnonzero(idx(parts["neutral"]))}


def _pads(toks) -> tuple[int, int]:
    return tuple(t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in toks)


def _n_new(*rows: PromptRows) -> int:
    """Greedy tokens to decode: the longest target continuation plus one."""
    return max(len(c) for r in rows for _, c in r.target) + 1


def run_layer(base, tuned, toks, parts: dict, layer: int, p, task: str, modes: Sequence[str],
              seed: int) -> tuple[list[dict], dict, SteeringSubspace]:
    """Fit on dev, sweep every setting on dev and test, both models; returns the result rows (marked
    against the random controls), the subspace description and the subspace. ``p`` is
    :class:`mechdiff.config.SteerParams`; ``toks`` = (base tokenizer, tuned tokenizer)."""
    dev = {k: v[v["split"] == "dev"] for k, v in parts.items()}
    sub, info = fit_subspace(base, tuned, toks, dev, layer, modes, task, p.contrast, max(p.ks), p.n_bootstrap, seed)
    tuned_s, base_s = build_settings(sub, layer, tuned.config.num_hidden_layers, p.ks, p.alphas, p.mode,
                                     p.all_layers, seed, p.n_random)
    rows_b = prompt_rows(parts, toks[0], "base_input_ids", task)
    rows_t = prompt_rows(parts, toks[1], "tuned_input_ids", task)
    n_new = _n_new(rows_b, rows_t)
    ev_t = evaluate_with_controls(tuned, toks[1], rows_t, tuned_s, task, n_new, p.max_rows)
    ev_b = evaluate_with_controls(base, toks[0], rows_b, base_s, task, n_new, p.max_rows)
    out = []
    for split in ("dev", "test"):
        cols = subset_cols(parts, split=split)
        gap = _mean(ev_t["hard"][0, cols["target"]]) - _mean(ev_b["hard"][0, cols["target"]])
        for model, settings, ev in (("tuned", tuned_s, ev_t), ("base", base_s, ev_b)):
            for r in effect_rows([s for s, _ in settings], ev, cols, gap, p.n_bootstrap, seed):
                out.append({"layer": layer, "model": model, "split": split, "probe": "main", "language": "all",
                            "gap": gap, **r})
    return mark_controls(out), {**info, "n_new_tokens": n_new}, sub


def _target_only(rows: PromptRows, idx: np.ndarray) -> PromptRows:
    return PromptRows([rows.target[i] for i in idx], [rows.references[i] for i in idx], [], [], [], [],
                      rows.letter_ids, [])  # target, references, qa, qa_opening, mc, mc_answers, letters, neutral


def _probe_rows(base, tuned, toks, task: str, p, layer: int, subs: dict, rows_bt: tuple, lang_of: np.ndarray,
                probe: str) -> list[dict]:
    """Effect rows on target prompts only, for the subspaces ``subs`` (name -> subspace) at every k (ablation)
    and (k, alpha) (steering): ``subspace`` = the name, ``language`` = the prompts' language."""
    out = []
    for model, tok, rows, direction in ((tuned, toks[1], rows_bt[1], "ablate_tuned"),
                                        (base, toks[0], rows_bt[0], "steer_base")):
        settings, ivs = [Setting("clean")], [identity(next(iter(subs.values())).basis_.shape[0])]
        for name, sub in subs.items():
            for k in [k for k in p.ks if k <= sub.basis_.shape[1]]:
                for a in ([0.0] if direction == "ablate_tuned" else p.alphas):
                    settings.append(Setting(direction, "layer", name, k, a))
                    ivs.append(ablation(sub.basis(k), (layer,)) if direction == "ablate_tuned"
                               else steer_intervention(sub, k, a, (layer,), p.mode))
        hard = evaluate(model, tok, rows, ivs, task, _n_new(*rows_bt), p.max_rows)["hard"].astype(float)
        sign = -1.0 if direction == "ablate_tuned" else 1.0
        for lang in sorted(set(lang_of)):
            sel = lang_of == lang
            for st_, h in zip(settings[1:], hard[1:]):
                out.append({"layer": layer, "model": "tuned" if direction == "ablate_tuned" else "base",
                            "split": "test", "probe": probe, "language": lang, **st_.__dict__,
                            "n_target": int(sel.sum()),
                            "rate": float(h[sel].mean()), "effect": sign * float(h[sel].mean() - hard[0, sel].mean())})
    return out


def language_rows(base, tuned, toks, parts: dict, layer: int, p, task: str, modes: Sequence[str], seed: int):
    """Subspaces fitted on ONE language's dev prompts, measured on every language's test prompts (rows
    with ``probe="language"``, ``subspace="fit:<lang>"``), or a reason why not."""
    langs = sorted(set(parts["target"]["language"]))
    if len(langs) < 2:
        return [], f"one language only ({langs})"
    subs = {}
    for lang in langs:
        dev = {k: v[(v["split"] == "dev") & (v["language"] == lang)] for k, v in parts.items()}
        try:
            subs[f"fit:{lang}"] = fit_subspace(base, tuned, toks, dev, layer, modes, task, p.contrast, max(p.ks),
                                               20, seed)[0]
        except ValueError as err:
            return [], f"cannot fit on {lang} alone: {err}"
    test = subset_cols(parts, split="test")["target"]
    rows_bt = tuple(_target_only(prompt_rows(parts, t, c, task), test)
                    for t, c in ((toks[0], "base_input_ids"), (toks[1], "tuned_input_ids")))
    lang_of = parts["target"]["language"].to_numpy()[test]
    return _probe_rows(base, tuned, toks, task, p, layer, subs, rows_bt, lang_of, "language"), None


def format_rows(base, tuned, toks, parts: dict, layer: int, sub: SteeringSubspace, p, task: str, fairness):
    """The layer's subspace measured on test prompts rendered in the other prompt format (raw <-> chat):
    rows with ``probe="format:<template>"``, or the reason it is not applicable (a tokenizer without a
    chat template, as for the embedded organisms)."""
    from mechdiff.rendering import render_prompt

    other = "chat" if fairness.template == "raw" else "raw"
    if any(not getattr(t, "chat_template", None) for t in toks):
        return [], ("not applicable: the pair's tokenizers have no chat template (prompts are raw text), so a "
                    "second prompt format cannot be rendered")
    test = parts["target"][parts["target"]["split"] == "test"]
    rows_bt = []
    for tok in toks:
        ids = [list(render_prompt(t, tok, other, fairness.template_date, fairness.system_prompt).ids)
               for t in test["text"]]
        frame = test.assign(base_input_ids=ids, tuned_input_ids=ids)
        empty = frame.iloc[:0]
        rows_bt.append(prompt_rows({"target": frame, "other": empty, "mc": empty, "neutral": empty}, tok,
                                   "base_input_ids", task))
    lang_of = np.full(len(test), "all")
    return _probe_rows(base, tuned, toks, task, p, layer, {"fitted": sub}, tuple(rows_bt), lang_of,
                       f"format:{other}"), None


def transfer_summary(rows: list[dict], layer: int, choice: dict, notes: dict) -> dict:
    """At the chosen (k, alpha) of each direction: the language transfer (``retained[a->b]`` = effect of
    the a-fitted subspace on b / effect of the b-fitted one on b) and the other-format effect (against
    the same setting's test effect in the primary format)."""
    out = {}
    for name in ("ablate_tuned", "steer_base"):
        pick = choice.get(f"{name}@layer") or {}
        if pick.get("minimal_k") is None:
            out[name] = {"status": "not reached on dev; nothing to transfer"}
            continue
        k, a = pick["minimal_k"], pick["alpha"]
        sel = [r for r in rows if r["layer"] == layer and r["direction"] == name and r["k"] == k and r["alpha"] == a]
        lang = {(r["subspace"][4:], r["language"]): r["effect"] for r in sel if r.get("probe") == "language"}
        fmt = [r for r in sel if str(r.get("probe", "")).startswith("format")]
        out[name] = {"k": k, "alpha": a,
                     "language": {"status": notes.get("language") or "ok",
                                  "effect": {f"{f}->{e}": v for (f, e), v in lang.items()},
                                  "retained": {f"{f}->{e}": v / lang[(e, e)] if abs(lang.get((e, e), 0.0)) > 1e-9
                                               else float("nan") for (f, e), v in lang.items() if f != e}},
                     "format": {"status": notes.get("format") or "ok",
                                **({"template": fmt[0]["probe"][7:], "effect": fmt[0]["effect"],
                                    "primary_test_effect": (pick.get("test") or {}).get("effect")} if fmt else {})}}
    return out


def curve_rows(rows: list[dict], max_drop_pp: float, max_ppl_increase: float) -> list[dict]:
    """Effect vs k on test, for plots: per layer, direction, site, subspace and k, the test row at the alpha
    chosen on dev for that k (the largest dev effect with side effects in limits, else the largest dev
    effect), with ``side_ok`` on test. The random draws (each with its own dev alpha) are pooled into one
    row per k: ``effect`` and the side effects their mean, ``effect_lo`` / ``effect_hi`` the lowest draw
    and the :data:`CONTROL_QUANTILE` quantile of the draws (the control the fitted subspace must beat),
    ``n_draws`` their number (1 for fitted rows)."""
    out, pooled = [], {}
    rows = [r for r in rows if r.get("probe", "main") == "main"]
    keys = sorted({(r["layer"], r["direction"], r["site"], r["subspace"], r["k"], r.get("draw", 0)) for r in rows
                   if r["direction"] != "clean"})
    for key in keys:
        def match(r, split):
            return (r["layer"], r["direction"], r["site"], r["subspace"], r["k"], r.get("draw", 0), r["split"]) == \
                (*key, split)
        dev = [r for r in rows if match(r, "dev")]
        ok = [r for r in dev if side_ok(r, max_drop_pp, max_ppl_increase)] or dev
        alpha = max(ok, key=lambda r: (r["effect"], -r["alpha"]))["alpha"]
        for r in (r for r in rows if match(r, "test") and r["alpha"] == alpha):
            row = {c: r[c] for c in ("layer", "direction", "site", "subspace", "k", "alpha", "effect", "effect_lo",
                                     "effect_hi", "fraction_of_gap", "neutral_drop_pp", "ppl_increase")} \
                | {"side_drop_pp": r[SIDE_EFFECT_ACCURACY[key[1]]], "side_ok": side_ok(r, max_drop_pp, max_ppl_increase),
                   "n_draws": 1}
            if key[3] == "random":
                pooled.setdefault(key[:5], []).append(row)
            else:
                out.append(row)
    for draws in pooled.values():
        e = np.array([d["effect"] for d in draws], dtype=float)
        mean = {c: float(np.mean([d[c] for d in draws])) for c in ("alpha", "fraction_of_gap", "neutral_drop_pp",
                                                                    "ppl_increase", "side_drop_pp")}
        out.append({**draws[0], **mean, "effect": float(e.mean()), "effect_lo": float(e.min()),
                    "effect_hi": float(np.quantile(e, CONTROL_QUANTILE)),
                    "side_ok": all(d["side_ok"] for d in draws), "n_draws": len(draws)})
    return out
