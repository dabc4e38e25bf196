"""One BOS, pinned dates, template special tokens and padding."""

from __future__ import annotations

import pytest
import torch

from mechdiff.data.rendering import RenderError, check_single_bos, pad_batch, render_prompt
from mechdiff.fairness.vocab import special_token_ids
from tokenizers_fixture import BOS, CHAT_TEMPLATE, CHAT_TEMPLATE_NO_BOS, base_tokenizer

DATE = "01 Jan 2031"


@pytest.fixture(scope="module")
def tok():
    return base_tokenizer()


def test_raw_has_exactly_one_bos(tok):
    r = render_prompt(" the cat", tok, "raw")
    assert r.text == BOS + " the cat" and r.ids[0] == tok.bos_token_id
    assert r.ids.count(tok.bos_token_id) == 1
    assert r.text[slice(*r.content_span)] == " the cat"
    assert list(r.ids[1:]) == tok(" the cat", add_special_tokens=False)["input_ids"]


def test_chat_has_one_bos_and_the_pinned_date(tok):
    r = render_prompt(" the cat", tok, "chat", date=DATE, system_prompt="Be brief.")
    assert r.ids.count(tok.bos_token_id) == 1 and r.ids[0] == tok.bos_token_id
    assert f"Today Date: {DATE}" in r.text and "26 Jul 2024" not in r.text
    assert "Be brief." in r.text and r.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert r.text[slice(*r.content_span)] == "the cat"  # the template trims content
    # the classic mistake: tokenizing the rendered chat string with special tokens gives two BOS
    doubled = tok(r.text)["input_ids"]
    assert doubled[:2] == [tok.bos_token_id] * 2
    with pytest.raises(RenderError, match="exactly one BOS"):
        check_single_bos(doubled, tok)


def test_double_or_missing_bos_raises(tok):
    with pytest.raises(RenderError, match="found 2"):
        render_prompt(BOS + " the cat", tok, "raw")
    no_bos = base_tokenizer(chat_template=CHAT_TEMPLATE_NO_BOS)
    with pytest.raises(RenderError, match="found 0"):
        render_prompt(" the cat", no_bos, "chat", date=DATE)
    with pytest.raises(RenderError, match="system prompt"):
        render_prompt(" the cat", tok, "raw", system_prompt="x")


def test_clock_reading_template_is_refused():
    clock = base_tokenizer(chat_template=CHAT_TEMPLATE.replace(
        "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}",
        "{%- set date_string = strftime_now('%d %b %Y') %}"))
    with pytest.raises(RenderError, match="pinned"):
        render_prompt(" the cat", clock, "chat", date=DATE)


def test_the_special_tokens_of_a_chat_render_are_its_template_tokens(tok):
    r = render_prompt(" the cat", tok, "chat", date=DATE)
    special = special_token_ids(tok)
    tokens = tok.convert_ids_to_tokens(list(r.ids))
    assert [t for t, i in zip(tokens, r.ids) if i in special] == [
        BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>",
        "<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def test_pad_batch_shapes():
    ids, attn = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, attn = pad_batch([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and attn.dtype == torch.long


def test_chatml_tokenizer_whose_bos_marks_every_turn_passes_but_still_catches_a_doubled_bos():
    # SmolLM2's BOS is <|im_start|>, which its chat template writes before every turn
    chatml = base_tokenizer(chat_template="{% for m in messages %}" + BOS + "{{ m['role'] }}\n{{ m['content'] }}\n"
                                          "{% endfor %}" + BOS + "assistant\n")
    b = chatml.bos_token_id
    check_single_bos([b, 5, 6, b, 7, b, 8], chatml)  # one per turn: fine
    with pytest.raises(RenderError, match="found 4"):
        check_single_bos([b, b, 5, b, 7, b], chatml)  # doubled at the start
    with pytest.raises(RenderError, match="found 1"):
        check_single_bos([5, b, 7], chatml)  # not at position 0


def test_raw_render_is_the_canonical_encoding_with_offsets_into_the_text(tok):
    r = render_prompt(" the cat sat", tok, "raw")
    assert r.ids == tuple(tok(" the cat sat")["input_ids"]) and len(r.offsets) == len(r.ids)
    assert r.offsets[0] == (0, len(BOS))  # the BOS the tokenizer adds spans its string in `text`
    assert r.text[r.offsets[-1][0]:r.offsets[-1][1]] == " sat" and r.offsets[-1][1] == r.content_span[1]


def test_a_tokenizer_whose_encoding_adds_no_bos_renders_raw_prompts_without_one():
    # SmolLM2-like: a BOS token exists (a chat marker) but tokenizer(text) does not add it
    tok = base_tokenizer()
    tok.backend_tokenizer.post_processor = None
    r = render_prompt(" the cat", tok, "raw")
    assert tok.bos_token_id not in r.ids and r.text == " the cat" and r.content_span == (0, 8)
    check_single_bos(r.ids, tok)
    with pytest.raises(RenderError, match="found 2"):
        check_single_bos([tok.bos_token_id, tok.bos_token_id, 5], tok)
