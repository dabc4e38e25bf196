"""Byte-level BPE tokenizers of the embedded organisms: train one on the world corpus, and extend it with
second-language (Kazakh) tokens as an *id-preserving superset* (as Sherkala extended Llama-3.1's).

The extension appends vocabulary entries after the last base id and appends their merges after the
base merges (lowest priority), so every base token keeps its id, text without the new tokens'
characters (all English text: new tokens always contain a non-ASCII byte) tokenizes identically, and
Kazakh text segments into fewer, longer tokens. Pure functions over in-memory tokenizers; no file I/O.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character map used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(token: str) -> bytes:
    """The raw bytes a byte-level token string stands for (``'Ġthe'`` -> ``b' the'``)."""
    dec = _byte_decoder()
    return bytes(dec[ch] for ch in token)


def _new_bpe(vocab_size: int, special: Iterable[str]) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` that prepends BOS on encoding and knows BOS/EOS/PAD."""
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)
    fast.padding_side = "right"
    return fast


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` entries (3 specials, 256 bytes, merges) on ``texts``."""
    tok, trainer = _new_bpe(vocab_size, SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def _model_json(fast: PreTrainedTokenizerFast) -> dict:
    return json.loads(fast.backend_tokenizer.to_str())


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def extend_bpe(base: PreTrainedTokenizerFast, texts: list[str], n_new: int) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """Append up to ``n_new`` tokens learned from ``texts`` (second-language text) to ``base``.

    A BPE is trained on ``texts`` alone; its merged tokens are walked in merge order and a token is
    appended (id ``len(base) + i``, merge appended after every base merge) when it is new, contains a
    non-ASCII byte, and the current extended model segments its string into exactly two pieces (so
    the appended merge is reachable). Returns the extended tokenizer and the appended token strings.
    """
    data = _model_json(base)
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    merges = _merge_pairs(data["model"])
    n_base = len(vocab)
    if len(base) != n_base:
        raise ValueError(f"base tokenizer has added tokens outside its BPE vocab ({len(base)} != {n_base})")
    aux, trainer = _new_bpe(256 + 3 * n_new + 64, [])
    aux.train_from_iterator(texts, trainer=trainer)
    candidates = [a + b for a, b in _merge_pairs(json.loads(aux.to_str())["model"])]
    added: list[str] = []
    for cand in candidates:
        if len(added) >= n_new:
            break
        if cand in vocab or max(token_bytes(cand)) < 0x80:
            continue
        current = models.BPE(vocab=vocab, merges=merges)
        pieces = [t.value for t in current.tokenize(cand)]
        if len(pieces) != 2:
            continue
        vocab[cand] = n_base + len(added)
        merges.append((pieces[0], pieces[1]))
        added.append(cand)
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [list(m) for m in merges]
    tok = Tokenizer.from_str(json.dumps(data))
    return _wrap(tok), added


def shared_ids_identical(base: PreTrainedTokenizerFast, tuned: PreTrainedTokenizerFast) -> bool:
    """True when every base vocabulary string has the same id in ``tuned`` (raw ``get_vocab`` keys)."""
    tv = tuned.get_vocab()
    return all(tv.get(s) == i for s, i in base.get_vocab().items())


def widen_vocab(base: PreTrainedTokenizerFast, size: int, n_reserved: int = 256) -> PreTrainedTokenizerFast:
    """``base`` widened to exactly ``size`` entries the way Llama-3's is laid out: filler BPE entries
    (``<|fill_i|>``; no merge produces them, so they are never emitted) up to ``size - n_reserved``, then
    ``n_reserved`` special tokens ``<|reserved_special_token_i|>``. Every base id and every
    segmentation is unchanged; only the embedding and unembedding get Llama-3.1-sized (128,256 rows).
    """
    data = _model_json(base)
    vocab = data["model"]["vocab"]
    n_fill = size - n_reserved - len(base)
    if n_fill < 0 or len(vocab) != len(base):
        raise ValueError(f"cannot widen a {len(base)}-entry tokenizer to {size} entries with {n_reserved} reserved")
    start = len(vocab)
    vocab.update({f"<|fill_{i}|>": start + i for i in range(n_fill)})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(n_reserved)])
    return _wrap(tok)
