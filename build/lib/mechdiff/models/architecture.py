"""One small adapter over the Hugging Face decoder-only layout (Llama, Mistral, Qwen2, ...).

Sites are named ``layers.{i}.resid_post`` (output of block ``i``), ``layers.{i}.attn_out`` (attention
output added to the residual), ``layers.{i}.mlp_out`` and ``layers.{i}.attn.o_proj_in`` (the
concatenated per-head outputs, shape (..., n_heads * head_dim); head ``h`` is the slice
``[h * head_dim, (h + 1) * head_dim)``, which is grouped-query-attention safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechdiff.errors import MechdiffError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")
SITE_KINDS = ("resid_post", "attn_out", "mlp_out", "attn.o_proj_in")


class ArchitectureMismatch(MechdiffError):
    """The two models of a pair cannot be compared layer by layer."""


@dataclass(frozen=True)
class Adapter:
    """Named access to the blocks of a decoder-only model."""

    model: torch.nn.Module

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads

    def module(self, site: str) -> torch.nn.Module:
        """The module whose forward output (or, for ``o_proj_in``, input) is the site."""
        layer, kind = parse_site(site)
        if not 0 <= layer < self.n_layers:
            raise MechdiffError(f"site {site!r}: layer {layer} out of range; the model has {self.n_layers} "
                                f"layers (0..{self.n_layers - 1})")
        block = self.layers[layer]
        return {"resid_post": block, "attn_out": block.self_attn, "mlp_out": block.mlp,
                "attn.o_proj_in": block.self_attn.o_proj}[kind]


def parse_site(site: str) -> tuple[int, str]:
    """``'layers.4.resid_post'`` -> ``(4, 'resid_post')``; a clear error for anything else."""
    parts = site.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in SITE_KINDS:
        raise MechdiffError(f"unknown site {site!r}; expected 'layers.<i>.<kind>' with kind in {SITE_KINDS}")
    return int(parts[1]), parts[2]


def site_name(layer: int, kind: str = "resid_post") -> str:
    return f"layers.{layer}.{kind}"


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``, chosen from ``config.model_type`` (never from the path)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MechdiffError(f"model type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    return Adapter(model)


COMPARED_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "rope_theta", "intermediate_size")


def _rope_theta(config) -> float | None:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return theta


def check_compatible(base_config, tuned_config, base_id: str = "base", tuned_id: str = "tuned") -> None:
    """Raise :class:`ArchitectureMismatch` naming every field that differs between the two configs."""
    diffs = []
    for name in COMPARED_FIELDS:
        get = _rope_theta if name == "rope_theta" else (lambda c, n=name: getattr(c, n, None))
        a, b = get(base_config), get(tuned_config)
        if a != b:
            diffs.append(f"{name}: {a} vs {b}")
    if diffs:
        raise ArchitectureMismatch(
            f"{base_id} and {tuned_id} are not layer-compatible ({'; '.join(diffs)}); layer-wise comparison "
            "needs the same architecture: pick a tuned model derived from this base")
