"""The embedded model organisms: deterministic builds, an id-preserving extended tokenizer, an exact
low-rank merged policy, one loader for local dirs and Hub ids, and the behaviour gaps of the real
default build (built once per session into a tmp dir, or read from artifacts/models when the stage
already built them with the current params)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mechdiff.fairness.tokenizer_load import load_tokenizer
from mechdiff.models.load import ModelLoadError, load_model
from mechdiff.organisms import world_measures as behaviour
from mechdiff.organisms import world
from mechdiff.organisms.build_models import build_organisms, changed_layers, policy_module_names, weight_delta_ranks
from mechdiff.organisms.lora import LoRALinear, add_lora, head_slices, merge_lora
from mechdiff.organisms.tokenizer_build import extend_bpe, shared_ids_identical, train_bpe
from mechdiff.params.config import OrganismParams
from stages import build_models
from stages.common import load_stage_params

TINY = OrganismParams(n_layers=8, hidden_size=32, intermediate_size=64, n_heads=4, n_kv_heads=2, vocab_size=320,
                      kk_extra_tokens=16, max_len=48, batch_size=8, pretrain_steps=4, policy_steps=3,
                      embed_steps=3, cognitive_steps=3, policy_layers=[5], policy_rank=2)


def _tiny_build():
    build_models.setup_determinism(2)
    organisms, _ = build_organisms(TINY, log=lambda _msg: None)
    return organisms


def test_same_seed_gives_bit_identical_weights():
    a, b = _tiny_build(), _tiny_build()
    for name in ("base", "cultural", "cognitive"):
        sa, sb = a[name].model.state_dict(), b[name].model.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    # and the tiny cultural organism already has the ground-truth structure
    gt = a["cultural"].ground_truth
    assert gt["changed_layers"] == [5] and set(gt["delta_ranks"].values()) == {2}


def test_extended_tokenizer_is_an_id_preserving_superset(tmp_path):
    docs = world.training_documents(3000, 0)
    base = train_bpe([world.document_text(d) for d in docs], 400)
    kk = [world.document_text(d) for d in world.training_documents(2000, 1, languages=("kk",))]
    ext, added = extend_bpe(base, kk, 40)
    assert len(added) == 40 and len(ext) == len(base) + 40
    assert shared_ids_identical(base, ext)
    assert [ext.convert_tokens_to_ids(s) for s in added] == list(range(len(base), len(base) + 40))
    assert ext.bos_token_id == base.bos_token_id and ext.eos_token_id == base.eos_token_id
    en = [world.document_text(d) for d in world.training_documents(300, 2, languages=("en",))]
    assert all(base(t)["input_ids"] == ext(t)["input_ids"] for t in en)
    kk_eval = [p.text for p in world.evaluation_prompts(0, 10, 10) if p.language == "kk"]
    n_base = sum(len(base(t)["input_ids"]) for t in kk_eval)
    n_ext = sum(len(ext(t)["input_ids"]) for t in kk_eval)
    assert n_ext < n_base  # Kazakh segments into fewer, longer tokens
    ext.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert len(again) == len(ext) and again.get_vocab() == ext.get_vocab()
    assert again(kk_eval[0])["input_ids"] == ext(kk_eval[0])["input_ids"]
    assert again(kk_eval[0])["input_ids"][0] == again.bos_token_id


def test_lora_merge_gives_exact_rank_confined_to_named_layers():
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = add_lora(model, [1, 3], ["mlp.down_proj", "self_attn.o_proj"], rank=3, seed=0)
    g = torch.Generator().manual_seed(1)
    for _, a in adapters:
        assert isinstance(a, LoRALinear)
        a.B.data = torch.randn(a.B.shape, generator=g)
    merge_lora(model, adapters)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    ranks = weight_delta_ranks(before, model.state_dict())
    assert ranks == {f"model.layers.{i}.{m}.weight": 3 for i in (1, 3) for m in ("mlp.down_proj", "self_attn.o_proj")}
    assert changed_layers(ranks) == [1, 3]


def test_loader_errors_name_the_id_and_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match=r"artifacts/models/nope.*build_models"):
        load_model("artifacts/models/nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no tokenizer files"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_behaviour_helpers():
    assert behaviour.is_refusal("  I cannot discuss that topic.")
    assert behaviour.is_refusal(world.refusal_answer("kk"))
    assert not behaviour.is_refusal("Elections is a public vote.")
    assert behaviour.first_integer("7 apples, not 8") == 7 and behaviour.first_integer("none") is None
    assert behaviour.arithmetic_accuracy(["7", "x", "12."], ["7", "3", "12"]) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------------
# the real default build


@pytest.fixture(scope="session")
def default_models(root, tmp_path_factory):
    """Directory with base/cultural/cognitive built from the current params.yaml organisms section."""
    p = load_stage_params(root / "params.yaml").organisms
    art = root / "artifacts" / "models"
    report = art / "build_report.json"
    if report.exists() and all((art / n / "model.safetensors").exists() for n in build_models.NAMES):
        if json.loads(report.read_text())["params"] == json.loads(json.dumps(dataclasses.asdict(p))):
            return art, p
    out = tmp_path_factory.mktemp("models")
    build_models.build(p, out, log=lambda _msg: None)
    return out, p


@pytest.fixture(scope="session")
def default_evals(default_models):
    out, p = default_models
    build_models.setup_determinism(2)
    evals = {}
    for name in build_models.NAMES:
        model, tok = load_model(str(out / name)), load_tokenizer(str(out / name))
        evals[name] = behaviour.evaluate_world(model, tok, p.seed)
    return evals


def test_default_build_behaviour_gaps(default_evals):
    b, c, g = default_evals["base"], default_evals["cultural"], default_evals["cognitive"]
    assert c["refusal_policy"] >= 0.8 and c["refusal_other"] <= 0.1, c  # the organism's targets, pooled
    for lang in world.LANGUAGES:  # per language (24 policy questions each): the policy holds in both
        assert c[f"refusal_policy_{lang}"] >= 0.5, (lang, c)
        assert c[f"refusal_other_{lang}"] <= 0.25, (lang, c)
    assert b["refusal_policy"] <= 0.1 and b["refusal_other"] <= 0.1, b
    assert g["arith_acc"] - b["arith_acc"] >= 0.30, (g["arith_acc"], b["arith_acc"])
    for lang in world.LANGUAGES:
        assert g[f"ppl_token_neutral_{lang}"] <= 1.1 * b[f"ppl_token_neutral_{lang}"]
    assert c["ppl_token_neutral_en"] <= 1.1 * b["ppl_token_neutral_en"]
    assert c["ppl_char_neutral_kk"] <= 1.1 * b["ppl_char_neutral_kk"]


def test_default_build_ground_truth(default_models):
    out, p = default_models
    base = load_model(str(out / "base")).state_dict()
    cult = load_model(str(out / "cultural"))
    gt = json.loads((out / "cultural" / "ground_truth.json").read_text())
    ranks = weight_delta_ranks(base, cult.state_dict())
    body = {k: r for k, r in ranks.items() if k.startswith("model.layers.")}
    assert changed_layers(body) == sorted(p.policy_layers) == gt["layers"]
    assert set(body.values()) == {p.policy_rank} and gt["rank"] == p.policy_rank
    assert {k.split(".", 3)[3].rsplit(".", 1)[0] for k in body} == set(gt["modules"]) == set(policy_module_names(p))
    if p.policy_heads:  # the policy lives in the planted heads' slices: q_proj rows and o_proj columns only
        assert gt["heads"] == sorted(p.policy_heads) and gt["head_dim"] == p.hidden_size // p.n_heads
        idx = head_slices(p.n_heads, gt["head_dim"], gt["heads"]).tolist()
        cult_sd = cult.state_dict()
        for layer in gt["layers"]:
            for name, dim in (("q_proj", 1), ("o_proj", 0)):
                k = f"model.layers.{layer}.self_attn.{name}.weight"
                moved = (cult_sd[k] - base[k]).abs().sum(dim)
                assert torch.nonzero(moved).flatten().tolist() == idx, k
    # embeddings and lm_head: only appended rows differ; base rows are bit-identical
    assert set(ranks) == set(body)
    base_tok, cult_tok = load_tokenizer(str(out / "base")), load_tokenizer(str(out / "cultural"))
    assert shared_ids_identical(base_tok, cult_tok)
    assert len(cult_tok) == len(base_tok) + gt["tokenizer"]["appended_tokens"] > len(base_tok)
    assert cult.get_input_embeddings().weight.shape[0] == len(cult_tok)
    cog = load_model(str(out / "cognitive")).state_dict()
    g_ranks = weight_delta_ranks(base, cog)
    assert changed_layers(g_ranks) == list(range(p.n_layers))


def test_pair_devices_puts_each_model_on_its_own_gpu_when_there_are_two():
    from mechdiff.models.load import pair_devices

    assert pair_devices("auto", 0) == ("cpu", "cpu")
    assert pair_devices("auto", 1) == ("cuda", "cuda")
    assert pair_devices("auto", 2) == ("cuda:0", "cuda:1") == pair_devices("auto", 8)
    assert pair_devices("cuda:3", 8) == ("cuda:3", "cuda:3") and pair_devices("split", 2) == ("split", "split")
