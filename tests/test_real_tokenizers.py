"""Tokenizer loading, rendering and sanity on the real published Llama-2 and Llama-3 tokenizer files.

The files live beside the project in ``../shared/real/tokenizers`` (never in the repository); each test
copies what it needs into a temporary directory, laid out the way mirrors publish them. References are
computed outside transformers: ``sentencepiece`` for Llama-2, ``tiktoken`` with Meta's split pattern and
the chat template rendered by Jinja for Llama-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from mechdiff.data.rendering import RenderedPrompt, canonical_ids, render_prompt
from mechdiff.fairness.alignment import align_rendered
from mechdiff.fairness.filter_shared import RenderMismatch, check_render, filter_prompts, fairness_report
from mechdiff.fairness.tokenizer_load import (MIN_TOKENS, TokenizerSanityError, check_tokenizer, effective_chat_template,
                                     load_pair_tokenizers, load_tokenizer, tokenizer_info)
from mechdiff.fairness.vocab import compare_vocabularies, enforce_tokenizer_policy
from mechdiff.models.load import ModelLoadError, load_model
from mechdiff.params.config import FairnessParams, PairSpec, ParamsError
from mechdiff.params.parse import parse_value
from tests.tokenizers_fixture import base_tokenizer

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
TOKS = REAL / "tokenizers"
needs_real = pytest.mark.skipif(not TOKS.exists(), reason=f"{TOKS} is absent: the real-tokenizer tests need it")

DATE = "26 Jul 2024"
EN = ["The cat sat on the mat.", "Hello, world!", "What is the capital of France?", "A quick brown fox",
      "Numbers: 3.14159 and 2,718.", "He said: \"no\" -- twice.", "it's (mostly) fine; isn't it?",
      "Email me at a.b@example.com", "The year 1999 was long", "Tabs\tand\nnew lines", "double  spaces here",
      "ALL CAPS SHOUT", "end with space ", "semi;colon:colon", "Why?!?", "x = y + 2 * z"]
LEADING = [" leading space", "  two leading spaces", "   The three", " 42 is the answer"]
KK = ["Қазақ тілі — мемлекеттік тіл.", "Сәлем, әлем!", "Абай Құнанбайұлы кім болған?",
      "Наурыз қай айда тойланады?", "Домбыра неше ішекті?", "Қазақстанның астанасы қай қала?",
      " Алматы — ең үлкен қала.", "Бүгін ауа райы жақсы.", "Мен кітап оқимын.", "Өзен жағасында ағаштар өседі."]
DIGITS = ["12345", "0", "2024-07-26", "1,000,000 + 2 = ?", "3/4 of 100 is 75", "99 bottles",
          "7 * 8 = 56", "-17 degrees", "v1.2.3", "100%"]
PROMPTS = EN + LEADING + KK + DIGITS  # 40 mixed prompts
assert len(PROMPTS) == 40

# Meta's Llama-3 pre-tokenizer split (meta-llama/llama-models, models/llama3/tokenizer.py)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# A Sherkala-style template (set in code in its model card): BOS and header blocks, no date preamble.
SHERKALA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                     "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                     "{% endif %}")


def _dir(root: Path, name: str, files: dict[str, Path | str]) -> Path:
    """A model directory under ``root`` holding copies of files (Path) or written text (str)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for fname, src in files.items():
        if isinstance(src, Path):
            shutil.copyfile(src, d / fname)
        else:
            (d / fname).write_text(src, encoding="utf-8")
    return d


def _sp(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


# ---------------------------------------------------------------------------------------------------
# Llama-2: SentencePiece


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    if not TOKS.exists():
        pytest.skip(f"{TOKS} is absent: the real-tokenizer tests need it")
    root = tmp_path_factory.mktemp("llama2")
    model = _dir(root, "only_model", {"tokenizer.model": TOKS / "llama2" / "tokenizer.model"})
    return SimpleNamespace(root=root, model_file=model / "tokenizer.model", dir=model, tok=load_tokenizer(str(model)),
                           sp=_sp(model / "tokenizer.model"))


@needs_real
def test_llama2_model_alone_renders_bos_plus_sentencepiece(llama2):
    tok, sp = llama2.tok, llama2.sp
    assert len(tok) == 32000 and (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in PROMPTS:
        r = render_prompt(text, tok, "raw")
        assert list(r.ids) == [1] + sp.encode(text), text
        assert r.text[slice(*r.content_span)] == text
        # segmentation comes from the rendered ids: a prompt aligns with itself, every content token kept
        a = align_rendered(r, r, tok, tok)
        assert a.identical and a.n_content == len(sp.encode(text))
    info = tokenizer_info(tok)
    assert info["source"].startswith("tokenizer.model") and "agrees" in info["sentencepiece_check"]


@needs_real
def test_the_same_sentencepiece_file_loads_as_one_class_whatever_the_configs_say(llama2):
    """A mirror with only tokenizer.model against one whose configs name LlamaTokenizer(legacy=False) and
    model_type llama: transformers would build two different classes; mechdiff builds one."""
    other = _dir(llama2.root, "with_configs", {
        "tokenizer.model": llama2.model_file,
        "tokenizer_config.json": json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                             "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}),
        "config.json": json.dumps({"model_type": "llama", "vocab_size": 32000, "bos_token_id": 1,
                                   "eos_token_id": 2})})
    tok2 = load_tokenizer(str(other))
    assert type(tok2) is type(llama2.tok)
    assert all(tok2(t)["input_ids"] == llama2.tok(t)["input_ids"] == [1] + llama2.sp.encode(t) for t in PROMPTS)
    assert tokenizer_info(tok2)["padding_rows"] == 0
    frame = pd.DataFrame({"id": [f"p{i}" for i in range(len(PROMPTS))], "text": PROMPTS,
                          "language": ["kk" if t in KK else "en" for t in PROMPTS], "task": "topic"})
    fairness = FairnessParams()
    vocab = compare_vocabularies(llama2.tok, tok2)
    kept, alignments = filter_prompts(frame, llama2.tok, tok2, fairness, vocab, pair="llama2")
    seg = fairness_report(vocab, frame, alignments, fairness)["segmentation"]
    assert seg["en"]["segmentation_identity_rate"] == 1.0 and seg["all"]["segmentation_identity_rate"] == 1.0
    # filter_shared strips each prompt, then both models see [bos] + sentencepiece.encode(prompt)
    assert all(list(ids) == [1, *llama2.sp.encode(t.strip())] for ids, t in zip(kept["base_input_ids"], kept["text"]))
    assert (kept["base_input_ids"] == kept["tuned_input_ids"]).all()


@needs_real
def test_the_legacy_bos_string_render_is_caught_per_prompt(llama2):
    """The old raw render, "<s>" + text under LlamaTokenizer(legacy=False), loses the leading "▁" of the
    first word; filter_shared's per-prompt check names the pair, the model, the prompt and the fix."""
    from transformers import LlamaTokenizer

    legacy = LlamaTokenizer.from_pretrained(str(llama2.dir), legacy=False)
    text = "The cat sat on the mat."
    old = tuple(legacy("<s>" + text, add_special_tokens=False)["input_ids"])
    assert old[:2] != (1, llama2.sp.encode(text)[0])  # the reported bug: `The` instead of `▁The`
    rendered = RenderedPrompt(text="<s>" + text, ids=old, template="raw", content_span=(3, 3 + len(text)))
    with pytest.raises(RenderMismatch, match=r"filter_shared@llama2: the base model '.*only_model' renders prompt "
                                             r"'p7' as .* canonical encoding .* Fix: "):
        check_render(rendered, text, llama2.tok, FairnessParams(), pair="llama2", side="base", prompt_id="p7")
    check_render(render_prompt(text, llama2.tok), text, llama2.tok, FairnessParams(), pair="llama2", side="base",
                 prompt_id="p7")


def _extended_llama2(root: Path, model_file: Path, sp) -> tuple[Path, int]:
    """The Llama-2 model with Kazakh pieces appended to its proto: NORMAL pieces that merge the pieces
    Llama-2 splits Kazakh words into (scores below every existing piece) and one USER_DEFINED piece."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    have = {p.piece for p in proto.pieces}
    score = min(p.score for p in proto.pieces) - 1.0
    new = []
    for word in ("Қазақ", "тілі", "мемлекеттік", "Сәлем", "әлем", "қала", "Алматы"):
        pieces = sp.encode(" " + word.strip(), out_type=str)
        pieces = [p for p in pieces if p != "▁"] if len(pieces) > 1 and pieces[0] == "▁" else pieces
        acc = pieces[0]
        for p in pieces[1:]:
            acc += p
            if acc not in have and not any(x.startswith("<0x") for x in (p, acc)):
                new.append(acc)
                have.add(acc)
    for piece in new:
        proto.pieces.add(piece=piece, score=score, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
        score -= 1.0
    proto.pieces.add(piece="<kk>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    out = root / "extended"
    out.mkdir(exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    return out, len(new) + 1


@needs_real
def test_a_llama2_extension_is_an_id_preserving_superset_with_identical_english(llama2):
    ext_dir, n_new = _extended_llama2(llama2.root, llama2.model_file, llama2.sp)
    ext, ext_sp = load_tokenizer(str(ext_dir)), _sp(ext_dir / "tokenizer.model")
    assert n_new > 5 and len(ext) == 32000 + n_new
    for text in PROMPTS + ["<kk> Қазақ тілі"]:  # the extension encodes exactly as its own SentencePiece model
        assert render_prompt(text, ext).ids == tuple([1] + ext_sp.encode(text)), text
    assert sum(len(ext(t)["input_ids"]) for t in KK) < sum(len(llama2.tok(t)["input_ids"]) for t in KK)
    vocab = compare_vocabularies(llama2.tok, ext)
    assert vocab.id_preserving_superset and vocab.n_appended == n_new and not vocab.shared_vocab_problems
    assert enforce_tokenizer_policy(vocab, "shared_vocab_required", "llama2_kk")["satisfied"]
    frame = pd.DataFrame({"id": [f"e{i}" for i in range(len(EN))], "text": EN, "language": "en", "task": "topic"})
    _, alignments = filter_prompts(frame, llama2.tok, ext, FairnessParams(), vocab, pair="llama2_kk")
    assert all(a.identical for a in alignments)  # 100% segmentation identity on English


# ---------------------------------------------------------------------------------------------------
# Llama-3: tiktoken BPE ranks + the 3.1 config


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    if not TOKS.exists():
        pytest.skip(f"{TOKS} is absent: the real-tokenizer tests need it")
    root = tmp_path_factory.mktemp("llama3")
    cfg = TOKS / "llama3.1-instruct"
    d = _dir(root, "llama31", {"tokenizer.model": TOKS / "llama3" / "tokenizer.model",
                               "tokenizer_config.json": cfg / "tokenizer_config.json",
                               "special_tokens_map.json": cfg / "special_tokens_map.json"})
    return SimpleNamespace(root=root, dir=d, tok=load_tokenizer(str(d)),
                           config=json.loads((cfg / "tokenizer_config.json").read_text()))


def _tiktoken_reference(llama3):
    """Llama-3's encoding built by tiktoken from the rank file, Meta's split pattern and the config's specials."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(llama3.dir / "tokenizer.model"))
    specials = {t["content"]: int(i) for i, t in llama3.config["added_tokens_decoder"].items()}
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def _jinja(template: str, messages, bos: str) -> str:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(template).render(messages=messages, bos_token=bos, add_generation_prompt=True,
                                             date_string=DATE)


@needs_real
def test_llama3_raw_and_chat_renders_equal_the_reference_encodings(llama3):
    tok, enc = llama3.tok, _tiktoken_reference(llama3)
    assert len(tok) == 128256 and tok.bos_token_id == 128000 and tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    bos = "<|begin_of_text|>"
    for text in PROMPTS:
        raw = render_prompt(text, tok, "raw")
        assert list(raw.ids) == [128000] + enc.encode(text) and raw.ids.count(128000) == 1, text
        chat = render_prompt(text.strip(), tok, "chat", date=DATE)
        official = _jinja(llama3.config["chat_template"], [{"role": "user", "content": text.strip()}], bos)
        assert chat.text == official and f"Today Date: {DATE}" in chat.text
        assert list(chat.ids) == enc.encode(official, allowed_special="all") and chat.ids.count(128000) == 1
        assert chat.ids == canonical_ids(text.strip(), tok, "chat", DATE)  # apply_chat_template(tokenize=True)
        assert chat.text[slice(*chat.content_span)] == text.strip()


@needs_real
def test_llama3_model_without_its_config_is_refused_never_silently_bos_less(llama3):
    bare = _dir(llama3.root, "bare", {"tokenizer.model": llama3.dir / "tokenizer.model"})
    with pytest.raises(TokenizerSanityError, match=rf"{bare}/tokenizer.model is a tiktoken BPE rank file.*"
                                                   rf"no tokenizer_config.json.*Fix: put the model's own"):
        load_tokenizer(str(bare))
    (bare / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128256,
                                                  "bos_token_id": 128000}))
    with pytest.raises(TokenizerSanityError, match="tiktoken"):
        load_tokenizer(str(bare))


@needs_real
def test_a_chat_template_override_renders_and_reaches_the_fingerprint(llama3, tmp_path):
    tok = load_tokenizer(str(llama3.dir), chat_template=SHERKALA_TEMPLATE)
    assert tokenizer_info(tok)["chat_template_source"] == "params"
    text = "Абай кім болған?"
    r = render_prompt(text, tok, "chat", date=DATE)
    expected = _jinja(SHERKALA_TEMPLATE, [{"role": "user", "content": text}], "<|begin_of_text|>")
    assert r.text == expected and "Today Date" not in r.text
    assert list(r.ids) == _tiktoken_reference(llama3).encode(expected, allowed_special="all")

    from stages.acts_fingerprint import fingerprint

    def fp(tuned_template):
        pair = _pair(str(llama3.dir), str(llama3.dir), tuned_chat_template=tuned_template)
        params = SimpleNamespace(acts=SimpleNamespace(dtype="float32", attn_implementation="sdpa", shard_prompts=8),
                                 fairness=FairnessParams(), seed=0)
        return fingerprint(params, pair, [0], "d")

    path = tmp_path / "sherkala.jinja"
    path.write_text(SHERKALA_TEMPLATE, encoding="utf-8")
    assert fp(None)["chat_templates"] != fp(SHERKALA_TEMPLATE)["chat_templates"] == fp(str(path))["chat_templates"]
    assert effective_chat_template(str(llama3.dir)) == llama3.config["chat_template"]
    base_t, tuned_t = load_pair_tokenizers(_pair(str(llama3.dir), str(llama3.dir), tuned_chat_template=str(path)))
    assert base_t.chat_template == llama3.config["chat_template"] and tuned_t.chat_template == SHERKALA_TEMPLATE


def _pair(base: str, tuned: str, **kw) -> PairSpec:
    spec = {"base": base, "tuned": tuned, "domain": "cultural", "tokenizer_policy": "shared_vocab_required",
            "datasets": {"world": {"kind": "world", "task": "world"}}, **kw}
    return parse_value(spec, PairSpec, "pairs.p")


def test_chat_template_params_are_validated(tmp_path):
    assert _pair("a", "b").chat_templates() == (None, None)
    assert _pair("a", "b", base_chat_template=SHERKALA_TEMPLATE).chat_templates()[0] == SHERKALA_TEMPLATE
    with pytest.raises(ParamsError, match=r"pairs.p.tuned_chat_template': expected an existing template file"):
        _pair("a", "b", tuned_chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ParamsError, match=r"pairs.p.base_chat_template': expected a Jinja chat template"):
        _pair("a", "b", base_chat_template="just words")
    with pytest.raises(ParamsError, match=r"pairs.p.base_chat_template': expected a valid Jinja chat template"):
        _pair("a", "b", base_chat_template="{% for m in messages %}{{ m }}")


# ---------------------------------------------------------------------------------------------------
# sanity at load and the errors' wording (no real files needed)


def test_a_three_token_tokenizer_is_refused(tmp_path):
    from transformers import LlamaTokenizer

    model_file = TOKS / "llama2" / "tokenizer.model"
    degenerate = LlamaTokenizer(vocab_file=str(model_file))  # transformers 5 ignores vocab_file: 3 tokens
    assert len(degenerate) == 3 <= MIN_TOKENS
    degenerate.save_pretrained(tmp_path)
    with pytest.raises(TokenizerSanityError, match=rf"tokenizer '{tmp_path}' has 3 tokens \(<= {MIN_TOKENS}\).*"
                                                   rf"Fix: put the model's own tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerSanityError, match="has 3 tokens"):
        check_tokenizer(degenerate, "some/model")


def test_bad_directory_errors_name_it_and_a_fix_about_the_users_model(tmp_path):
    missing = tmp_path / "my-finetune"
    for call in (lambda: load_tokenizer(str(missing)), lambda: load_model(str(missing))):
        with pytest.raises(ModelLoadError) as err:
            call()
        assert str(missing) in str(err.value) and "build_models" not in str(err.value)
        assert "config.json" in str(err.value) and "\n" not in str(err.value)
    missing.mkdir()
    (missing / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=rf"the directory {missing} has no tokenizer files \(looked for "
                                             r"tokenizer.json, tokenizer.model") as err:
        load_tokenizer(str(missing))
    assert "build_models" not in str(err.value)
    with pytest.raises(ModelLoadError, match=r"artifacts/models/nope.*build_models"):  # the organisms' own path
        load_tokenizer("artifacts/models/nope")


def _saved(tmp_path: Path, config: dict, bos: bool = True) -> Path:
    tok = base_tokenizer()
    if not bos:
        tok.bos_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return tmp_path


def test_embedding_rows_and_bos_are_checked_against_config_json(tmp_path):
    n, bos = len(base_tokenizer()), base_tokenizer().bos_token_id
    tok = load_tokenizer(str(_saved(tmp_path / "padded", {"vocab_size": n + 7, "bos_token_id": bos})))
    info = tokenizer_info(tok)
    assert (info["n_tokens"], info["embedding_rows"], info["padding_rows"], info["config_bos_token_id"]) == (
        n, n + 7, 7, bos)
    with pytest.raises(TokenizerSanityError, match=rf"has {n} tokens but the model's embedding has {n - 1} rows"):
        load_tokenizer(str(_saved(tmp_path / "small", {"vocab_size": n - 1})))
    with pytest.raises(TokenizerSanityError, match=r"config.json names bos_token_id 5 but the tokenizer's BOS is"):
        load_tokenizer(str(_saved(tmp_path / "other_bos", {"vocab_size": n, "bos_token_id": 5})))
    with pytest.raises(TokenizerSanityError, match=rf"bos_token_id {n + 3} but the tokenizer's BOS is .* "
                                                   rf"no id {n + 3}"):
        load_tokenizer(str(_saved(tmp_path / "beyond", {"vocab_size": n + 7, "bos_token_id": n + 3})))
    # a tokenizer without a BOS while config.json names one: never a silent BOS-less prompt
    with pytest.raises(TokenizerSanityError, match=rf"bos_token_id {bos} but the tokenizer has no BOS .* Fix: set "
                                                   r'"bos_token": "<\|begin_of_text\|>"'):
        load_tokenizer(str(_saved(tmp_path / "no_bos", {"vocab_size": n, "bos_token_id": bos}, bos=False)))
    with pytest.raises(TokenizerSanityError, match=rf"bos_token_id {n + 3} but the tokenizer has no token with id"):
        load_tokenizer(str(_saved(tmp_path / "no_bos_beyond", {"vocab_size": n + 7, "bos_token_id": n + 3}, bos=False)))


@pytest.mark.parametrize("name", ["base", "cultural"])
def test_the_organisms_pass_the_sanity_checks(name, root):
    path = root / "artifacts" / "models" / name
    if not (path / "tokenizer.json").exists():
        pytest.skip("the model organisms are not built: run `python -m stages.build_models`")
    tok = load_tokenizer(str(path))
    info = tokenizer_info(tok)
    assert info["n_tokens"] > MIN_TOKENS and info["padding_rows"] == 0
    assert info["bos_token_id"] == info["config_bos_token_id"] and info["adds_bos"]
    if name == "cultural":  # params: cultural is shared_vocab_required
        base = load_tokenizer(str(root / "artifacts" / "models" / "base"))
        assert enforce_tokenizer_policy(compare_vocabularies(base, tok), "shared_vocab_required", name)["satisfied"]
