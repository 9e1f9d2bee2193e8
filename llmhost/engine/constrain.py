"""Constrained decoding: a grammar (JSON schema, regex, choice, EBNF or an
xgrammar structural tag for tool calls) turned into a per-row token mask.

Why xgrammar and not llguidance. Measured here (2 shared CPU cores, xgrammar
0.2.8, llguidance 1.9.1, a one-off script, not kept: a nested JSON schema with
$ref, enum, pattern, bounds and format, teacher-forced with a 30-token answer;
"fill" is computing the allowed-token bitmask, "apply" is masking the logits):

    tokenizer (vocab)    library     tokenizer prep  compile   fill/step B1  B8     apply/step B1  B8
    SmolLM2 (49152)      xgrammar    0.11 s          0.33 s    0.009 ms  0.046 ms   0.19 ms  1.39 ms
    SmolLM2 (49152)      llguidance  0.31 s          0.002 s   0.115 ms  0.723 ms   53 ms    65 ms
    tiny GPT-2 (512)     xgrammar    0.002 s         0.005 s   0.002 ms  0.006 ms   0.008 ms 0.019 ms
    tiny GPT-2 (512)     llguidance  0.003 s         0.001 s   0.075 ms  0.362 ms   5.8 ms   6.3 ms

llguidance compiles lazily (nearly free up front) but its per-token mask is
about 12x slower to fill here and its CPU apply path is far slower (it would
need our own apply); xgrammar pays ~0.3 s once per new schema, which the
compiler's cache (per model, keyed by the grammar, bounded in bytes) pays once,
and then costs well under a millisecond per token at batch 8 against a
decode step of tens of milliseconds. xgrammar also ships structural tags
(tool calls in a model family's own syntax, "either a call or a JSON answer",
a reasoning block before the answer), which tool calling here is built on.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import xgrammar as xgr
# xgrammar (about 24 MiB with pydantic) is imported by the first grammar, not at
# start-up: a server whose clients never ask for one never holds it.

# Bytes of compiled grammars kept per model (xgrammar's own LRU cache).
CACHE_BYTES = 64 * 1024 * 1024

_compilers: "weakref.WeakKeyDictionary[Any, xgr.GrammarCompiler]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class GrammarError(ValueError):
    """The grammar, schema or regex cannot be compiled; str() says why."""


def compiler(model, tokenizer, vocab_size: int, stop_token_ids) -> xgr.GrammarCompiler:
    """One compiler per loaded model (dropped with it): its cache is the
    per-(model, grammar) cache of compiled grammars."""
    import xgrammar as xgr
    with _lock:
        comp = _compilers.get(model)
        if comp is None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=sorted(stop_token_ids))
            comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                       cache_limit_bytes=CACHE_BYTES)
            _compilers[model] = comp
        return comp


class Constraint:
    """A compiled grammar; each row that uses it gets its own :class:`Matcher`."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, kind: str) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.kind = kind

    def matcher(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    """The grammar state of one row: masks its logits, accepts its tokens."""

    __slots__ = ("matcher", "bitmask", "failed")

    def __init__(self, constraint: Constraint) -> None:
        import xgrammar as xgr
        self.matcher = xgr.GrammarMatcher(constraint.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, constraint.vocab_size)
        self.failed = False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits with every token the grammar forbids at -inf."""
        import xgrammar as xgr
        logits = logits.clone().unsqueeze(0)
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits[0]

    def accept(self, token_id: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(int(token_id)):
            self.failed = True

    @property
    def done(self) -> bool:
        """The grammar is complete (a stop token was accepted) or broken."""
        return self.failed or self.matcher.is_terminated()


# xgrammar prefixes its messages with a time and its C++ source path
# ("[17:13:16] /project/cpp/regex_converter.cc:94: "): not for clients.
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


def _message(exc: Exception) -> str:
    lines = [_LOG_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(exc).__name__


def _accepts_something(compiled: xgr.CompiledGrammar) -> None:
    """A grammar that allows no first token (not even the end) accepts no
    string at all (``root ::= root "a"``): sampling would find every token
    masked. One mask fill, microseconds."""
    import xgrammar as xgr
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    if not bool(bitmask.any()):
        raise GrammarError("it accepts no string at all (no first token and no end is allowed)")


def _compile(comp: xgr.GrammarCompiler, fn, *args, **kwargs) -> xgr.CompiledGrammar:
    try:
        compiled = fn(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(_message(exc))
    _accepts_something(compiled)
    return compiled


def json_schema(comp, schema: dict | bool, strict: bool = True) -> xgr.CompiledGrammar:
    """Compact JSON (", " and ": " separators, no other whitespace: small models
    otherwise wander into endless whitespace) valid against `schema`."""
    return _compile(comp, comp.compile_json_schema, json.dumps(schema), any_whitespace=False,
                    strict_mode=strict)


def json_object(comp) -> xgr.CompiledGrammar:
    return json_schema(comp, {"type": "object"}, strict=False)


def regex(comp, pattern: str) -> xgr.CompiledGrammar:
    return _compile(comp, comp.compile_regex, pattern)


def ebnf(comp, grammar: str) -> xgr.CompiledGrammar:
    return _compile(comp, comp.compile_grammar, grammar)


def compact(node):
    """`node` (a structural tag or one of its formats) with every JSON schema
    content compact, as :func:`json_schema` compiles it: ", " and ": "
    separators and no other whitespace, so a forced call or JSON answer costs
    only the tokens it needs (a small model given free whitespace writes
    newlines and indentation, and max_tokens cuts the call). Structural tags
    take no `any_whitespace`, so each schema becomes the grammar xgrammar
    builds for it with `any_whitespace=False`; `"strict": false` on a node
    allows properties the schema does not name (json_object)."""
    if isinstance(node, list):
        return [compact(item) for item in node]
    if not isinstance(node, dict):
        return node
    import xgrammar as xgr
    if node.get("type") == "json_schema" and node.get("style", "json") == "json":
        grammar = xgr.Grammar.from_json_schema(json.dumps(node["json_schema"]),
                                               any_whitespace=False,
                                               strict_mode=node.get("strict", True))
        return {"type": "grammar", "grammar": str(grammar)}
    return {key: compact(value) for key, value in node.items()}


def structural_tag(comp, tag: dict) -> xgr.CompiledGrammar:
    return _compile(comp, lambda: comp.compile_structural_tag(json.dumps(compact(tag))))
