"""Token ids to text: incremental decoding never splits a character, stop
strings are found across tokens and never leak, prompts are built as the
model's template (or the fallback) says."""
import pytest
from transformers import AutoTokenizer

from llmhost.generation.prompt import FALLBACK_TEMPLATE
from llmhost.generation.text import ChoiceText, Detokenizer, StopMatcher, token_bytes, token_string


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["gpt2"])


def byte_ids(tok, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte: how byte-level BPE spells rare characters."""
    from llmhost.generation.text import _byte_decoder
    to_char = {b: c for c, b in _byte_decoder().items()}
    return [tok.convert_tokens_to_ids(to_char[b]) for b in text.encode("utf-8")]


def test_detokenizer_never_splits_a_character(tok):
    text = "a🙂b€日本語 ok"
    ids = byte_ids(tok, text)
    detok = Detokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # The emoji's four byte tokens give nothing until the last one.
    assert pieces[1:5] == ["", "", "", "🙂"]


def test_detokenizer_joined_equals_decode(tok):
    ids = tok("hello world 🙂 héllo 日本語 and the quick brown fox")["input_ids"]
    detok = Detokenizer(tok)
    assert "".join([detok.add(i) for i in ids] + [detok.flush()]) == tok.decode(ids)


def test_unfinished_character_is_flushed_at_the_end(tok):
    detok = Detokenizer(tok)
    assert [detok.add(i) for i in byte_ids(tok, "a🙂")[:3]] == ["a", "", ""]
    assert detok.flush() == "\ufffd"


def test_token_bytes_and_strings(tok):
    ids = byte_ids(tok, "🙂")
    assert b"".join(token_bytes(tok, i) for i in ids) == "🙂".encode()
    assert token_string(tok, ids[0]) == "\\xf0"
    whole = tok(" world")["input_ids"]
    assert "".join(token_string(tok, i) for i in whole) == " world"


@pytest.mark.parametrize("pieces, stops, released, matched", [
    (["hel", "lo wor", "ld"], ["o w"], "hell", True),            # spans two pieces
    (["ab", "c", "d"], ["cd"], "ab", True),
    (["x", "STO", "P", "y"], ["STOP"], "x", True),
    (["ab", "cd"], ["zz"], "abcd", False),
    (["a", "b"], ["bc"], "ab", False),                         # held "b" comes out at the end
    (["one two", " three"], ["three", "two"], "one ", True),    # earliest match wins
])
def test_stop_matcher(pieces, stops, released, matched):
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            break
        # Nothing that could start a stop string is ever released.
        assert not any(out.endswith(s[:k]) for s in stops for k in range(1, len(s)) if out)
    if not hit:
        text, hit = matcher.feed("", final=True)
        out += text
    assert (out, hit) == (released, matched)


def test_choice_text_stop_spanning_byte_tokens(tok):
    text = ChoiceText(tok, ["🙂b"])
    out = ""
    for i in byte_ids(tok, "a🙂bc"):
        piece, hit = text.add(i)
        out += piece
        if hit:
            break
    assert (out, hit) == ("a", True)


def test_fallback_template_renders(tok):
    ids = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        chat_template=FALLBACK_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert ids == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
