"""Tiny byte-level BPE tokenizers built in memory, with explicit vocab and merges (no downloads).

Layout mirrors Llama-3.1 / Sherkala: the 256 byte-level symbols first, then merged tokens, then the
special tokens (BOS, EOS, chat headers), then, for an extended tokenizer, appended tokens whose merges
have the lowest priority. Each builder returns a ``PreTrainedTokenizerFast`` whose post-processor adds
BOS (as Llama's does) and whose chat template itself writes ``bos_token`` and a date.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIALS = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# A Llama-3.1-like template: writes the BOS itself and a pinned-or-default date.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Same template without the BOS: rendering with it must fail the one-BOS check.
CHAT_TEMPLATE_NO_BOS = CHAT_TEMPLATE.replace("{{- bos_token }}", "")

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level symbols


def _byte_map() -> dict[int, str]:
    """GPT-2's byte -> printable symbol map (what ByteLevel writes into token strings)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def byte_level(text: str) -> list[str]:
    """Byte-level symbols of each character of ``text`` (one string per character)."""
    bmap = _byte_map()
    return ["".join(bmap[b] for b in ch.encode("utf-8")) for ch in text]


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that build each word: first every multi-byte character from its bytes, then the word
    from its characters left to right. Duplicates are dropped; order is priority."""
    bmap = _byte_map()
    merges: list[tuple[str, str]] = []
    for word in words:
        for ch in word:
            symbols = [bmap[b] for b in ch.encode("utf-8")]
            for i in range(1, len(symbols)):
                merges.append(("".join(symbols[:i]), symbols[i]))
        chars = byte_level(word)
        for i in range(1, len(chars)):
            merges.append(("".join(chars[:i]), chars[i]))
    return list(dict.fromkeys(merges))


def make_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], *, specials: dict[str, int],
                   bos: str = BOS, eos: str = EOS, pad: str | None = "<|eot_id|>",
                   chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Wrap an explicit BPE (``vocab`` string -> id, ``merges`` in priority order) with specials."""
    full = {**vocab, **specials}
    tok = Tokenizer(models.BPE(vocab=full, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, full[bos])])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


EN_WORDS = [" the", " cat", " sat", " on", " mat", "The", " and", " hello", " world", "Hello"]
KK_LETTERS = "абвгдежзийклмнопрстуфхцчшщъыьэюяәғқңөұүһі"  # each letter one base token
KK_WORDS = [" сәлем", " қазақ", " тілі", " әлем"]        # appended as whole-word tokens
OVERLAP = [("o", "n"), ("n", "e")]                       # "one": 'on' 'e' in base, 'o' 'ne' reordered


def _base_parts() -> tuple[list[str], list[tuple[str, str]]]:
    merges = word_merges(EN_WORDS + list(KK_LETTERS)) + OVERLAP
    merges = list(dict.fromkeys(merges))
    tokens = list(ALPHABET) + [a + b for a, b in merges]
    return list(dict.fromkeys(tokens)), merges


def _ids(tokens: list[str], start: int = 0) -> dict[str, int]:
    return {t: start + i for i, t in enumerate(tokens)}


def _specials(start: int, names: tuple[str, ...] = SPECIALS) -> dict[str, int]:
    return _ids(list(names), start)


def base_tokenizer(**kwargs) -> PreTrainedTokenizerFast:
    """The base: byte symbols, English words, single Kazakh letters, then the specials."""
    tokens, merges = _base_parts()
    return make_tokenizer(_ids(tokens), merges, specials=_specials(len(tokens)), **kwargs)


def extended_tokenizer() -> PreTrainedTokenizerFast:
    """Sherkala-like id-preserving extension: the base unchanged plus appended Kazakh word tokens
    (ids after the specials, merges last in priority). Returns the tokenizer."""
    tokens, merges = _base_parts()
    extra = [m for m in word_merges(KK_WORDS) if m not in set(merges)]
    new = [a + b for a, b in extra if a + b not in set(tokens)]
    vocab = {**_ids(tokens), **_ids(new, len(tokens) + len(SPECIALS))}
    return make_tokenizer(vocab, merges + extra, specials=_specials(len(tokens)))


def n_appended_extended() -> int:
    """How many tokens :func:`extended_tokenizer` appends (the known answer)."""
    tokens, merges = _base_parts()
    extra = [m for m in word_merges(KK_WORDS) if m not in set(merges)]
    return len({a + b for a, b in extra} - set(tokens))


def permuted_tokenizer() -> PreTrainedTokenizerFast:
    """Same strings and merges as the base, but the merged tokens' ids are reversed."""
    tokens, merges = _base_parts()
    merged = tokens[len(ALPHABET):]
    vocab = {**_ids(list(ALPHABET)), **_ids(merged[::-1], len(ALPHABET))}
    return make_tokenizer(vocab, merges, specials=_specials(len(tokens)))


def reordered_tokenizer() -> PreTrainedTokenizerFast:
    """Same vocabulary and ids as the base; the two overlapping merges swap priority."""
    tokens, merges = _base_parts()
    i, j = merges.index(OVERLAP[0]), merges.index(OVERLAP[1])
    merges = list(merges)
    merges[i], merges[j] = merges[j], merges[i]
    return make_tokenizer(_ids(tokens), merges, specials=_specials(len(tokens)))


def special_mismatch_tokenizer() -> PreTrainedTokenizerFast:
    """Same BPE as the base, but ``<|eot_id|>`` and ``<|end_header_id|>`` swap ids."""
    tokens, merges = _base_parts()
    specials = _specials(len(tokens))
    specials["<|eot_id|>"], specials["<|end_header_id|>"] = (specials["<|end_header_id|>"],
                                                             specials["<|eot_id|>"])
    return make_tokenizer(_ids(tokens), merges, specials=specials)
