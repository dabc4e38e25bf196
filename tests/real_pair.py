"""A Llama-3.1-shaped pair on the real Llama-3 tokenizer, for tests of real inputs (no downloads).

``base``: Meta's Llama-3 ``tokenizer.model`` with the Llama-3.1-Instruct ``tokenizer_config.json`` and
``special_tokens_map.json`` (the files in ``../shared/real/tokenizers``), saved the way the Hub publishes
Llama-3.1 (a ``tokenizer.json`` whose post-processor prepends ``<|begin_of_text|>``), and a tiny random
Llama whose embedding has the tokenizer's 128,256 rows. ``tuned``: a Sherkala-like *append-only*
extension (new Kazakh BPE tokens and merges after every Llama-3 id, as Sherkala grew 128,256 -> 159,766),
its embedding grown to match (new rows: the mean base row), and one layer's ``mlp.down_proj`` moved by a
low-rank update, so the pair differs in a known place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
LLAMA3_FILES = (REAL / "tokenizers" / "llama3" / "tokenizer.model",
                REAL / "tokenizers" / "llama3.1-instruct" / "tokenizer_config.json",
                REAL / "tokenizers" / "llama3.1-instruct" / "special_tokens_map.json")
BOS, BOS_ID = "<|begin_of_text|>", 128000
EDITED_LAYER = 3


def llama3_tokenizer(workdir: Path) -> PreTrainedTokenizerFast:
    """The real Llama-3 tokenizer with the 3.1 config, its post-processor prepending BOS as on the Hub."""
    src = workdir / "llama3_src"
    src.mkdir(parents=True, exist_ok=True)
    for f in LLAMA3_FILES:
        shutil.copy(f, src / f.name)
    tok = AutoTokenizer.from_pretrained(src)
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tok.special_tokens_map,
                                   chat_template=tok.chat_template, clean_up_tokenization_spaces=False)


def _byte_level_nonascii(token: str) -> bool:
    """True when a byte-level token string stands for a non-ASCII byte (chars outside GPT-2's ASCII map)."""
    return any(ord(ch) > 0x7E or ord(ch) < 0x21 for ch in token.replace("Ġ", "").replace("Ċ", ""))


def extend_append_only(base: PreTrainedTokenizerFast, texts: list[str], n_new: int) -> PreTrainedTokenizerFast:
    """``base`` with up to ``n_new`` Kazakh tokens appended at ids ``len(base)`` and up (merges after every
    base merge): an id-preserving superset whose English segmentation is unchanged (every new token holds a
    non-ASCII byte). A merge is appended only when both its parts are already in the vocabulary."""
    data = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    aux = Tokenizer(models.BPE())
    aux.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + 4 * n_new, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    aux.train_from_iterator(texts, trainer=trainer)
    candidates = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                  for m in json.loads(aux.to_str())["model"]["merges"]]
    next_id, grew = len(base), True
    while grew and next_id - len(base) < n_new:  # a merge whose parts an earlier pass appended
        grew = False
        for a, b in candidates:
            if next_id - len(base) >= n_new:
                break
            if a + b in vocab or a not in vocab or b not in vocab or not _byte_level_nonascii(a + b):
                continue
            vocab[a + b] = next_id
            merges.append((a, b))
            next_id, grew = next_id + 1, True
    data["model"]["merges"] = [list(m) for m in merges]
    for t in data["added_tokens"]:  # keep the specials at their ids across the gap (128000-128255)
        vocab.setdefault(t["content"], t["id"])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   **base.special_tokens_map, chat_template=base.chat_template,
                                   clean_up_tokenization_spaces=False)


KK_VOWELS = "аәеиоөұүыіэюя"
KK_CONSONANTS = "бвгғджзйкқлмнңпрстуфхһцчшщ"


def kazakh_corpus(n_words: int = 6000, seed: int = 0) -> list[str]:
    """Kazakh text the extension is learned from: the project's Kazakh prompts and world sentences, and
    ``n_words`` words of Kazakh-alphabet syllables (seeded), so that thousands of merges are learnable."""
    import random

    from mechdiff.organisms import world

    texts = [p.text for p in world.evaluation_prompts(0, 400, 400) if p.language == "kk"]
    texts += [p.text for p in world.training_documents(2000, 0) if p.language == "kk"]
    rng = random.Random(seed)
    syllable = lambda: rng.choice(KK_CONSONANTS) + rng.choice(KK_VOWELS) + rng.choice(["", *KK_CONSONANTS])  # noqa: E731
    words = ["".join(syllable() for _ in range(rng.randint(1, 3))) for _ in range(n_words)]
    texts += [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    return texts


def tiny_llama31(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A random 8-layer Llama with Llama-3.1's special ids (BOS 128000, EOS 128001/128008/128009)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=BOS_ID, eos_token_id=[128001, 128008, 128009], pad_token_id=None,
                      tie_word_embeddings=True, rope_theta=500000.0)
    return LlamaForCausalLM(cfg).eval()


def build_pair(root: Path, n_new: int = 2000) -> tuple[Path, Path, int]:
    """Write ``root/base`` and ``root/tuned``; returns their paths and the number of appended tokens."""
    tok = llama3_tokenizer(root)
    ext = extend_append_only(tok, kazakh_corpus(), n_new)
    n_added = len(ext) - len(tok)
    base = tiny_llama31(len(tok))
    tuned = tiny_llama31(len(tok))
    tuned.load_state_dict(base.state_dict())
    tuned.resize_token_embeddings(len(ext), mean_resizing=False)
    with torch.no_grad():
        emb = tuned.get_input_embeddings().weight
        emb[len(tok):] = emb[:len(tok)].mean(0)
        w = tuned.model.layers[EDITED_LAYER].mlp.down_proj.weight
        g = torch.Generator().manual_seed(1)
        w += 0.5 * w.norm() / w.shape[0] ** 0.5 * (torch.randn(w.shape[0], 2, generator=g)
                                                   @ torch.randn(2, w.shape[1], generator=g)) / w.shape[1] ** 0.5
    for name, model, t in (("base", base, tok), ("tuned", tuned, ext)):
        model.save_pretrained(root / name)
        t.save_pretrained(root / name)
    shutil.rmtree(root / "llama3_src")
    return root / "base", root / "tuned", n_added
