"""What the collect_acts stage's activations were computed from (``<out>/fingerprint.json``): the models (id,
revision, local file digests), the rendering, the chat templates, dtype, attention, sites, prompts, positions and
library versions. Readers of the activations check it (:func:`mechdiff.fingerprint.check_fingerprint`)."""

from __future__ import annotations

from pathlib import Path

from mechdiff.fairness.tokenizer_load import effective_chat_template
from mechdiff.fingerprint import digest, library_versions
from stages.common import file_digest


def local_hash(model_id: str) -> str:
    """Digest of a local model directory's weight and tokenizer files (empty for Hub ids); files over
    64 MiB are sampled as track_inputs samples them (an 8B model is not read whole on every run)."""
    path = Path(model_id)
    if not path.is_dir():
        return ""
    return digest({p.name: file_digest(p) for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".json")})


def fingerprint(params, pair, layers, prompts_digest) -> dict:
    """The fingerprint of one pair's activations at ``layers`` for the prompts digested as ``prompts_digest``."""
    acts = params.acts
    return {"base": pair.base, "base_revision": str(pair.base_revision), "base_files": local_hash(pair.base),
            "tuned": pair.tuned, "tuned_revision": str(pair.tuned_revision), "tuned_files": local_hash(pair.tuned),
            "template": digest([params.fairness.template, params.fairness.template_date, params.fairness.system_prompt,
                                params.fairness.native_templates]),
            "chat_templates": digest([effective_chat_template(m, r, o) for (m, r), o in zip(
                ((pair.base, pair.base_revision), (pair.tuned, pair.tuned_revision)), pair.chat_templates())]),
            "dtype": acts.dtype, "attn_implementation": acts.attn_implementation,
            "sites": digest([f"layers.{i}.resid_post" for i in layers]), "prompts": prompts_digest,
            "positions": digest([params.fairness.n_sampled_positions, params.seed, list(params.fairness.modes)]),
            "shard_prompts": str(acts.shard_prompts), "versions": digest(library_versions())}
