"""The one code path that runs a generation for the API: submit to the model's
scheduler, turn token events into text per choice (incremental decoding, stop
strings) and hand out deltas. A streaming response sends the deltas as they
come; a non-streaming one is the same deltas collected, so both give the same
text for the same greedy request by construction."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Iterator

from .callguard import CallGuard
from ..engine.errors import EngineFailure, ModelClosed
from .parsing import join_calls
from ..engine.sampling import SamplingParams
from ..engine.scheduler import GenerationRequest
from .text import ChoiceText

log = logging.getLogger("llmhost")

# How often a running request looks at its client socket while tokens come,
# and how long it waits for one before looking anyway (e.g. while it waits in
# the queue, or a slow step runs).
DISCONNECT_CHECK_S = 0.5
IDLE_POLL_S = 0.25


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int                       # characters of this choice's text before the token


@dataclass
class ChoiceDelta:
    """New text of one choice, the logprobs of the tokens consumed since the
    last delta, and on the last delta its finish_reason."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    # With an output parser (generation/parsing.py): chat-chunk tool call deltas
    # ({"index", "id", "type", "function": {"name", "arguments"}} pieces) and thought text.
    tool_calls: list[dict] = field(default_factory=list)
    reasoning: str = ""


@dataclass
class Choice:
    """A whole choice: the deltas of one index joined."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[dict] | None = None   # OpenAI chat format, when calls were parsed
    reasoning: str | None = None


class _ChoiceState:
    def __init__(self, tokenizer, stop: list[str], parser=None, max_calls: int = 0) -> None:
        self.text = ChoiceText(tokenizer, stop, getattr(parser, "markers", None))
        self.logprobs: list[TokenLogprob] = []
        self.done = False
        self.parser = parser          # generation.parsing.OutputParser or None
        self.called = False
        self.calls = CallGuard(max_calls)   # a repeated call ends the choice (generation/callguard.py)


class Run:
    """One API request's generation: one engine request per prompt, each with
    `n` choices; choice `index` = prompt number x n + choice number."""

    def __init__(self, entry, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 stop: list[str] | None = None,
                 disconnected: Callable[[], bool] | None = None,
                 parser: Callable[[], object] | None = None, max_calls: int = 0,
                 cache_partition: str = "") -> None:
        self.entry = entry
        self.prompts = prompts
        self.params = params
        self.n = n
        self.disconnected = disconnected
        self.cache_partition = cache_partition
        self.states = [_ChoiceState(entry.tokenizer, stop or [], parser() if parser else None,
                                    max_calls)
                       for _ in range(len(prompts) * n)]
        self.generations: list = []
        self.completion_tokens = 0
        self.cancelled = False
        self._first = None
        self._iterators: list[Iterator] = []

    @property
    def prompt_tokens(self) -> int:
        """Prompt ids after templating, once per prompt (not per choice)."""
        return sum(len(p) for p in self.prompts)

    @property
    def cached_tokens(self) -> int:
        """Of `prompt_tokens`, those read from the engine's prefix cache."""
        return sum(g.cached_tokens for g in self.generations)

    def start(self) -> "Run":
        """Submit every prompt and wait for the first token, so that a full
        queue (429), a queue timeout (503) or an engine failure is still an
        HTTP status rather than an error inside a 200 stream."""
        engine = self.entry.engine
        if engine is None:            # unloaded between the lookup and now
            raise ModelClosed(f"The model '{self.entry.id}' was unloaded.")
        try:
            for ids in self.prompts:
                self.generations.append(engine.submit(GenerationRequest(
                    prompt_ids=ids, params=self.params, n=self.n,
                    model_inputs=getattr(ids, "model_inputs", None) or {},  # prompt.PromptIds
                    cache_partition=self.cache_partition)))
            self._iterators = [g.events(poll=IDLE_POLL_S) for g in self.generations]
            self._first = next((e for e in self._iterators[0] if e is not None or self._gone()),
                               None)
        except BaseException as exc:
            self.cancel(f"it could not start ({type(exc).__name__})")
            raise
        return self

    def cancel(self, reason: str) -> None:
        """Stop every choice (their rows leave the batch at the next step) and
        say why, once: the one place a request is cancelled."""
        if self.cancelled:
            return
        self.cancelled = True
        for gen in self.generations:
            gen.cancel()
        log.info("cancelled a %s request after %d generated tokens: %s", self.entry.id,
                 self.completion_tokens, reason)

    def _gone(self) -> bool:
        """Whether the client went away (and so the request is now cancelled)."""
        if self.cancelled:
            return True
        if self.disconnected is not None and self.disconnected():
            self.cancel("the client went away")
        return self.cancelled

    def deltas(self) -> Iterator[ChoiceDelta]:
        """Deltas in the order tokens arrive (prompt by prompt). Leaving early
        (client gone, error) cancels what is still running."""
        try:
            yield from self._deltas()
        except GeneratorExit:
            self.cancel("its response was closed before the end (the client went away)")
            raise
        except BaseException as exc:
            self.cancel(f"an error ({type(exc).__name__})")
            raise

    def _deltas(self) -> Iterator[ChoiceDelta]:
        if self.cancelled:            # the client left while start() waited
            return
        checked = time.monotonic()
        for number, (gen, events) in enumerate(zip(self.generations, self._iterators)):
            if number == 0 and self._first is not None:
                events = chain([self._first], events)
            for event in events:
                if event is None or time.monotonic() - checked > DISCONNECT_CHECK_S:
                    checked = time.monotonic()
                    if self._gone():
                        return
                    if event is None:
                        continue
                delta = self._on_event(gen, number, event)
                if delta is not None:
                    yield delta
            if self.cancelled:
                return
            base = number * self.n
            unfinished = [i for i in range(base, base + self.n) if not self.states[i].done]
            if unfinished:
                raise EngineFailure("generating", f"the engine ended choice {unfinished[0]} "
                                                  "without a finish reason")

    def _on_event(self, gen, number: int, event) -> ChoiceDelta | None:
        index = number * self.n + event.index
        state = self.states[index]
        if state.done:            # a token already in flight when a stop string matched
            return None
        self.completion_tokens += 1
        reason = None
        if event.finish_reason == "stop":
            # The stop (EOS) token ends the choice; it is not part of the text.
            text, _ = state.text.finish()
            reason = "stop"
        else:
            if event.logprob is not None:
                state.logprobs.append(TokenLogprob(event.token_id, event.logprob,
                                                   list(event.top_logprobs or []),
                                                   state.text.offset))
            text, matched = state.text.add(event.token_id)
            if matched:
                reason = "stop"
                gen.finish(event.index)
            elif event.finish_reason is not None:
                rest, matched = state.text.finish()
                text += rest
                reason = "stop" if matched else event.finish_reason
        calls, thought = [], ""
        if state.parser is not None:  # content, reasoning and tool calls (generation/parsing.py)
            parsed = state.parser.feed(text)
            if reason is not None:
                rest = state.parser.finish()
                parsed.content += rest.content
                parsed.reasoning += rest.reasoning
                parsed.tool_calls += rest.tool_calls
            text, calls, thought = parsed.content, parsed.tool_calls, parsed.reasoning
            if calls or reason is not None:
                calls, repeated = state.calls.check(calls, final=reason is not None)
                if repeated:                  # the model loops: its answer ended
                    if reason is None:
                        gen.finish(event.index)
                    reason = "stop"
            state.called = state.called or bool(calls)
            if reason == "stop" and state.called:
                reason = "tool_calls"
        if not text and not calls and not thought and reason is None:
            return None                   # nothing to show yet: logprobs wait for the text
        state.done = reason is not None
        delta = ChoiceDelta(index, text, state.logprobs, reason, calls, thought)
        state.logprobs = []
        return delta

    def collect(self) -> list[Choice]:
        """The non-streaming answer: every delta, joined per choice."""
        choices = [Choice(i) for i in range(len(self.states))]
        for delta in self.deltas():
            choice = choices[delta.index]
            choice.text += delta.text
            choice.logprobs += delta.logprobs
            choice.finish_reason = delta.finish_reason or choice.finish_reason
            if delta.reasoning:
                choice.reasoning = (choice.reasoning or "") + delta.reasoning
            if delta.tool_calls:
                choice.tool_calls = join_calls(choice.tool_calls or [], delta.tool_calls)
        return choices
