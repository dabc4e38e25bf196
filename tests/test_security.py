"""Security rules: no code execution from data or params, tensors only through safetensors (or
``torch.load(weights_only=True)``), and remote model code off unless params turn it on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mechdiff.params.config import FairnessParams

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("mechdiff", "stages", "benchmarks") for p in (ROOT / d).rglob("*.py"))

FORBIDDEN = {
    r"(?<![.\w])eval\(": "eval() of text",
    r"(?<![.\w])exec\(": "exec() of text",
    r"\bimport pickle\b|\bpickle\.load": "pickle (executes code on load)",
    r"yaml\.load\(": "yaml.load (use yaml.safe_load)",
    r"trust_remote_code\s*=\s*True": "remote code switched on in code (params must decide)",
}


@pytest.mark.parametrize("pattern", sorted(FORBIDDEN))
def test_no_forbidden_construct_in_the_sources(pattern):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert not hits, f"{FORBIDDEN[pattern]}: {hits}"


def test_torch_load_only_with_weights_only():
    for p in SOURCES:
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{p.relative_to(ROOT)}:{i}: {line.strip()}"


def test_remote_code_is_off_by_default_and_passed_through(monkeypatch, tmp_path):
    import transformers

    from mechdiff.fairness.tokenizer_load import load_tokenizer
    from mechdiff.models.load import ModelLoadError, load_model

    assert FairnessParams().trust_remote_code is False
    seen = []

    def fake(model_id, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    for call in (lambda: load_model(str(tmp_path)), lambda: load_tokenizer(str(tmp_path)),
                 lambda: load_model(str(tmp_path), trust_remote_code=True)):
        with pytest.raises(ModelLoadError):
            call()
    assert seen == [False, False, True]
