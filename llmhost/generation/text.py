"""From generated token ids to the text a client sees.

Two problems make this more than ``tokenizer.decode``:

* Byte-level BPE (GPT-2, Llama 3, SmolLM2...) splits one emoji or CJK character
  across several tokens. Decoding a token on its own gives U+FFFD, so a stream
  that decoded token by token would send broken characters. The
  :class:`Detokenizer` decodes a small window of recent tokens and only
  releases text once it no longer ends in an incomplete character.
* Stop strings are matched on text, not tokens, so one may span several
  tokens. :class:`StopMatcher` holds back any tail that could still become a
  stop string, so a stop string never leaks to a streaming client, and the
  returned text ends right before it.
"""
from __future__ import annotations

import re
from functools import lru_cache

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Incremental decoding with the prefix/read window used by TGI and vLLM.

    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new
    text: decoding with a little left context keeps tokenizers that strip a
    leading space at the start of a sequence (SentencePiece) correct, and the
    released text joined is what ``decode(all_ids)`` gives.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True,
                 keep: dict[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Special tokens that still come out as their text (a tool-call
        # family's delimiters the output parser reads, generation/parsing.py).
        self.keep = keep or {}
        self.ids: list[int] = []
        self.prefix = 0          # start of the context window
        self.read = 0            # ids before this were released as text
        self.released = 0        # characters released so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """The text this token completes ('' while a character is incomplete)."""
        if token_id in self.keep:
            new = self.flush() + self.keep[token_id]
            self.ids.append(token_id)
            self.prefix = self.read = len(self.ids)
            self.released += len(self.keep[token_id])
            return new
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            new = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.released += len(new)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is still held, at the end of the sequence (an incomplete
        character the model never finished comes out as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        new = after[len(before):] if after.startswith(before) else after
        self.prefix = self.read = len(self.ids)
        self.released += len(new)
        return new


class StopMatcher:
    """Finds the earliest stop string in the text as it grows."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None   # the stop string that ended the text (Anthropic's stop_sequence)

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that starts some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to release, whether a stop string matched). After a match
        the text before it is released and the rest is dropped."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(pos, s) for s, pos in ((s, self.pending.find(s)) for s in self.stops) if pos >= 0]
        if hits:
            pos, self.matched = min(hits)
            out, self.pending = self.pending[:pos], ""
            return out, True
        keep = 0 if final else self._held(self.pending)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False


class ChoiceText:
    """The text of one choice: detokenizer, then stop strings."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = (),
                 keep: dict[int, str] | None = None) -> None:
        self.detok = Detokenizer(tokenizer, keep=keep)
        self.stop = StopMatcher(stops)

    @property
    def offset(self) -> int:
        """Characters of decoded text before the next token (legacy `text_offset`)."""
        return self.detok.released

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text to release, stop string matched)."""
        return self.stop.feed(self.detok.add(token_id))

    def finish(self) -> tuple[str, bool]:
        """The held-back rest at the end of the sequence."""
        return self.stop.feed(self.detok.flush(), final=True)


# -- tokens as logprobs show them -------------------------------------------------

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted."""
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


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _is_byte_level(tokenizer) -> bool:
    cached = getattr(tokenizer, "_llmhost_byte_level", None)
    if cached is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cached = "ByteLevel" in repr(getattr(backend, "decoder", None))
        try:
            tokenizer._llmhost_byte_level = cached
        except AttributeError:
            pass
    return cached


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for, even when it is part of one character."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return b""
    if _is_byte_level(tokenizer):
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    match = _BYTE_TOKEN.match(piece)
    if match:                                   # SentencePiece byte fallback
        return bytes([int(match.group(1), 16)])
    if piece.startswith("▁") or "▁" in piece:    # SentencePiece word boundary
        return piece.replace("▁", " ").encode("utf-8")
    return tokenizer.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")


def token_string(tokenizer, token_id: int) -> str:
    """A token as text; a token holding part of a character shows its bytes as
    ``\\xNN`` escapes (the exact bytes are in the `bytes` field)."""
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="backslashreplace")
