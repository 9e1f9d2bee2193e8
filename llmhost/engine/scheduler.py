"""The per-model scheduler: one thread that decodes every running request of a
model together (continuous batching). Request threads submit and wait.

A hand-written step loop over a plain, left-padded ``DynamicCache`` rather
than transformers' ``ContinuousBatchingManager``: every request keeps its own
sampling settings, and it measured faster here (README, "Architecture").
"""
from __future__ import annotations

import logging
import queue
import time
from collections import deque
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import metrics, omp
from .errors import EngineError, InvalidInput, failure
from .kvcache import ROOM, growing_cache, seeded_cache, set_room
from .llamastep import LlamaStep
from .prefixcache import PrefixStore, budget_bytes
from .queueing import ModelWorker
from .sampling import RowSampler, SamplingParams, vocab_size

log = logging.getLogger("llmhost.engine")

_END = object()


# The adapter name of a row that runs on the base weights alone (PEFT's own).
BASE_ADAPTER = "__base__"


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    # A LoRA adapter loaded onto this model (models/adapters.py): its rows run
    # with it, in the same batch as rows of other adapters and of the base.
    adapter: str | None = None
    # Extra tensors of the prompt's prefill forward (a VLM's pixel_values and
    # friends from its processor); the decode steps need only token ids.
    model_inputs: dict[str, Any] = field(default_factory=dict)
    # The prefix cache partition (engine/prefixcache.py): requests only reuse
    # prefixes cached under the same value.
    cache_partition: str = ""

    @property
    def prefix_key(self) -> str | None:
        """Where its prompt's KV may be reused from and kept (engine/prefixcache.py):
        the partition and the adapter (an adapter changes every key and value);
        never for a prompt with images (equal ids, other pixels)."""
        if self.model_inputs:
            return None
        return f"{self.cache_partition}\0{self.adapter or ''}"


@dataclass
class TokenEvent:
    """One generated token of choice `index`. `finish_reason` is set on the
    choice's last event ('stop': a stop token, which is included as token_id;
    'length': max_tokens or the model's context reached)."""

    index: int
    token_id: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Generation:
    """A request's handle: the waiting thread iterates its events; the scheduler
    thread fills them in."""

    def __init__(self, request: GenerationRequest, model_id: str) -> None:
        self.request = request
        self.model_id = model_id
        self.prompt_tokens = len(request.prompt_ids)
        self.cached_tokens = 0          # prompt tokens read from the prefix cache
        self.completion_tokens = 0
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.cancelled = False
        self.finished: set[int] = set()
        self.rows_left = request.n
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    # -- request thread ---------------------------------------------------------
    def events(self, poll: float | None = None) -> Iterator[TokenEvent | None]:
        """Yield token events until every choice finished. With `poll`, also
        yield None after `poll` seconds without an event, so the caller (the
        Run) can look at its client meanwhile. Closing the iterator cancels."""
        try:
            while True:
                try:
                    item = self._events.get(timeout=poll)
                except queue.Empty:
                    yield None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        except GeneratorExit:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Stop the whole request: its rows leave the batch at the next step."""
        self.cancelled = True

    def finish(self, index: int) -> None:
        """Choice `index` is done (a stop string matched): its row leaves the batch."""
        self.finished.add(index)

    # -- scheduler thread ---------------------------------------------------------
    def _put(self, item) -> None:
        self._events.put(item)


class _Row:
    """One sequence in the running batch."""

    __slots__ = ("gen", "index", "sampler", "generated", "position", "last_token", "done", "tokens")

    @property
    def adapter(self) -> str:
        return self.gen.request.adapter or BASE_ADAPTER

    def __init__(self, gen: Generation, index: int, sampler: RowSampler) -> None:
        self.gen = gen
        self.index = index
        self.sampler = sampler
        self.generated = 0
        self.position = 0          # tokens in the cache: the position the last token is fed at
        self.last_token = 0
        self.done = False
        self.tokens: list[int] = []   # generated, in order (the prefix cache keeps them)

    @property
    def gone(self) -> bool:
        return self.done or self.gen.cancelled or self.index in self.gen.finished


def step_threads(rows: int, threads: int, lone_row: int = 0) -> int:
    """torch's CPU threads for a decode step of `rows` rows on a process given
    `threads`: all of them (measured: docs/performance.md, "Threads per step";
    streamed, a lone row of every load was as fast or faster on every core once
    idle threads stopped holding OpenMP workers, engine/omp.py). `lone_row` > 0
    (LLMHOST_LONE_ROW_THREADS) sets a lone row's count instead."""
    if rows == 1 and lone_row > 0:
        return max(1, min(threads, lone_row))
    return threads


class _Filling:
    """A prompt longer than one chunk, prefilled a chunk per scheduler step
    between the running rows' decode steps (``Scheduler._fill_step``)."""

    __slots__ = ("gen", "samplers", "cache", "next")

    def __init__(self, gen: Generation, samplers: list[RowSampler]) -> None:
        self.gen, self.samplers = gen, samplers
        self.cache: DynamicCache | None = None   # made at its first chunk
        self.next = 0                            # the first position not yet computed


class Scheduler(ModelWorker):
    """Continuous batching for one loaded causal LM."""

    # A model thread's OpenMP threads, kept up to 30 s after its last step (another model
    # worker waking takes them back sooner: queueing.py): a next request within it (an agent's
    # next turn, a user's follow-up) starts on them, where a pool made anew cost a 42-token
    # prompt ~10 ms more on the 2-core EPYC (omp.py).
    keep_pool_s = 30.0

    def __init__(self, model_id: str, loaded, config) -> None:
        super().__init__(model_id, config, "scheduler")
        self.model = loaded.model
        self.vocab_size = vocab_size(loaded)
        self.max_context = loaded.max_context
        self.device = next(self.model.parameters()).device
        self.max_rows = max(1, int(config.MAX_BATCH))
        self.batchable = self._cache_is_batchable()
        self.batch_wait = max(0.0, float(config.BATCH_WAIT_MS)) / 1000
        self._recent: deque[float] = deque()   # when requests finished, for _gather
        self._rows: list[_Row] = []
        self._filling: deque[_Filling] = deque()   # long prompts, first come first filled
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None      # [rows, cache length], 1 = real token
        self.threads = torch.get_num_threads()
        self.lone_row_threads = int(config.LONE_ROW_THREADS)
        self._adapter_context: Callable[[list[str]], ContextManager] | None = None
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        # Reusing a prefix needs every layer to keep every position: the same
        # models whose rows can share a batch (sliding windows cannot).
        budget = budget_bytes(config)
        self.prefix = PrefixStore(model_id, budget) if budget and self.batchable else None
        self.chunk = max(1, int(config.PREFILL_CHUNK))
        # Llama-architecture models: the same arithmetic without transformers' Python
        # around it (llamastep.py); None: model(...) as is
        self.step = LlamaStep.for_model(self.model) if self.batchable else None
        self._rows_alone = self.prefix is not None and self.step is not None and self.step.rows_alone
        self.warm_ms: float | None = None   # how long the warm-up took (_warm), once it did

    @property
    def exact_rows(self) -> bool:
        """A position's keys and values do not depend on how they were computed
        (LlamaStep's rows_alone: llmhost's int4 kernel and attention, while no
        LoRA adapter makes forwards go through model(...)): the prefix cache then
        reuses any token prefix, short prompts and generated tokens included,
        not only whole chunks of prompts."""
        return self._rows_alone and self._adapter_context is None

    @property
    def adapter_context(self) -> Callable[[list[str]], ContextManager] | None:
        """Set by models/adapters.py (on this thread, via between_steps) while
        LoRA adapters are loaded: adapter names per row -> the context of a
        forward."""
        return self._adapter_context

    @adapter_context.setter
    def adapter_context(self, context: Callable[[list[str]], ContextManager] | None) -> None:
        # the first adapter in or the last out changes which forward runs (model(...) or
        # LlamaStep): what the prefix cache holds was computed by the other one
        if (context is None) != (self._adapter_context is None) and self.prefix is not None:
            self.prefix.clear()
        self._adapter_context = context

    def _cache_is_batchable(self) -> bool:
        """Rows of different lengths can share a cache only when every layer keeps
        all positions (no sliding windows): otherwise serve one request at a time."""
        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # pragma: no cover - exotic configs
            return False
        return all(type(layer) is DynamicLayer for layer in layers)

    # -- request threads --------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Generation:
        gen = Generation(request, self.model_id)
        self._enqueue(gen)
        return gen

    def stats(self) -> dict:
        stats = {"queued": len(self._waiting),
                 "running": len(self._rows) + sum(f.gen.request.n for f in self._filling)}
        if self.prefix is not None:
            stats.update(self.prefix.stats())
        return stats

    def between_steps(self, fn: Callable[[], Any], timeout: float = 600.0) -> Any:
        """Run `fn` on the scheduler thread between two steps, when no forward
        runs (adding or removing a LoRA adapter changes the model's modules),
        and return its result or raise its error."""
        done: Future = Future()
        with self._cond:
            if self._closing:
                raise self._closed_error()
            self._calls.append((fn, done))
            self._cond.notify()
        return done.result(timeout)

    def end_adapter(self, name: str, error: EngineError) -> None:
        """On the scheduler thread (between_steps): end every request that uses
        adapter `name` with `error`, waiting or running, before it is removed."""
        with self._cond:
            waiting = [g for g in self._waiting if g.request.adapter == name]
            for gen in waiting:
                self._waiting.remove(gen)
        running = {r.gen for r in self._rows if r.gen.request.adapter == name}
        filling = [f for f in self._filling if f.gen.request.adapter == name]
        for fill in filling:
            self._filling.remove(fill)
            running.add(fill.gen)
        for gen in running:
            gen.cancel()
        self._fail(set(waiting) | running, error)
        self._drop_gone()

    def _run_calls(self) -> None:
        while self._calls:
            fn, done = self._calls.popleft()
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

    # -- scheduler thread ---------------------------------------------------------------
    def _warm(self) -> None:
        """The first request's OpenMP team made and spread before it comes (5.5-8.2
        ms of its first step, SmolLM2 int4), then kept keep_pool_s as after work.
        Not a warm-up forward as llama.cpp's server runs: measured, a 32-token
        forward and a decode step left the worker 17 MiB larger right after the
        load (what the first request adds anyway) for a few ms more."""
        started = time.perf_counter()
        self._threads(0)
        self.warm_ms = (time.perf_counter() - started) * 1000

    def _run(self) -> None:
        self._warm()
        while True:
            with self._cond:
                while (not self._closing and not self._waiting and not self._rows
                       and not self._filling and not self._calls):
                    self._idle_wait()
                if self._closing:
                    break
                calls = bool(self._calls)
                if not calls:
                    self._gather()
                    admitted = self._admit()
            if calls:
                self._run_calls()
                continue
            try:
                if admitted:
                    # Prefill first, and look for more arrivals before the next decode
                    # step: requests that arrive together get their first token together.
                    self._prefill_isolated(admitted)
                    self._drop_gone()
                    continue
                # One chunk of a long prompt, then one decode step of the running
                # rows: their streams go on while it is read.
                if self._filling:
                    self._fill_step()
                    self._drop_gone()
                if self._rows:
                    self._decode()
                    self._drop_gone()
            except Exception as exc:  # a bug or OOM must not hang the waiting threads
                log.exception("generation failed on %s", self.model_id)
                err = failure(exc, self.model_id, "generating",
                              "fewer tokens or fewer concurrent requests")
                self._fail({r.gen for r in self._rows} | {f.gen for f in self._filling}
                           | set(admitted), err)
                self._reset_batch()
                self._filling.clear()
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = list(self._calls), deque()
        for _, done in calls:
            done.set_exception(self._closed_error())
        self._fail(set(waiting) | {r.gen for r in self._rows} | {f.gen for f in self._filling},
                   self._closed_error())
        self._reset_batch()
        self._filling.clear()
        if self.prefix is not None:
            self.prefix.clear()
        self.model = None

    def _gather(self) -> None:
        """On an idle batch, wait a few milliseconds (LLMHOST_BATCH_WAIT_MS) for
        the follow-ups of clients whose requests just finished, so that requests
        arriving together are prefilled together instead of the first one alone
        and the rest one prefill later. A lone client never waits: its own
        previous request is the only one that just finished. Called under the
        condition lock."""
        if self._rows or self._filling or not self.batch_wait:
            return
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 0.5:
            self._recent.popleft()
        deadline = now + self.batch_wait
        while (not self._closing and len(self._waiting) < len(self._recent)
               and time.monotonic() < deadline):
            self._cond.wait(deadline - time.monotonic())
        self._recent.clear()

    def _admit(self) -> list[Generation]:
        """Take waiting requests that fit (called under the condition lock); fail
        those that waited too long."""
        now = time.monotonic()
        admitted: list[Generation] = []
        rows = len(self._rows) + sum(f.gen.request.n for f in self._filling)
        while self._waiting:
            gen = self._waiting[0]
            if gen.cancelled:
                self._waiting.popleft()
                gen._put(_END)
                continue
            if now - gen.submitted > self.queue_timeout:
                self._waiting.popleft()
                gen._put(self._timeout_error())
                continue
            n = gen.request.n
            fits = rows + n <= self.max_rows if self.batchable else rows == 0 and not admitted
            if not fits and (rows or admitted):
                break
            admitted.append(self._waiting.popleft())
            rows += n
        return admitted

    def _threads(self, rows: int) -> None:
        """torch's CPU threads for the next step of `rows` decoding rows (0: a
        prefill), by step_threads' rule, each on a CPU of its own (omp.spread)."""
        if self.device.type != "cpu":
            return
        want = step_threads(rows, self.threads, self.lone_row_threads)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
        omp.spread(want)
        self._pool_warm = True

    def _prefill_isolated(self, gens: list[Generation]) -> None:
        """Prefill `gens`; when that fails before their rows joined the batch,
        the running rows are untouched: prefill each request alone, so only the
        one that fails (an input the model cannot take) gets the error."""
        self._threads(0)
        alone = [g for g in gens if g.request.model_inputs]
        if alone and len(gens) > 1:   # a prompt with images prefills alone (docs/vision-lora.md)
            for gen in alone:
                self._prefill_isolated([gen])
            gens = [g for g in gens if not g.request.model_inputs]
            if not gens:
                return
        rows = self._rows
        try:
            self._prefill(gens)
            return
        except Exception as exc:
            if self._rows is not rows:    # failed after joining the batch: fail everything
                raise
            if len(gens) == 1:
                log.exception("prefill failed on %s", self.model_id)
                self._fail(gens, failure(exc, self.model_id, "reading the prompt", "a shorter prompt"))
                return
        for gen in gens:
            self._prefill_isolated([gen])

    def _row_failed(self, gen: Generation, exc: Exception, doing: str) -> None:
        """A failure caused by one request's row (its settings, its input) ends
        that request with an error; the rest of the batch goes on."""
        log.exception("%s failed for one request on %s", doing, self.model_id)
        if not gen.cancelled:
            gen.cancel()   # its other rows leave the batch at the next _drop_gone
            gen._put(failure(exc, self.model_id, doing, "other sampling settings"))

    @torch.inference_mode()
    def _prefill(self, gens: list[Generation]) -> None:
        """The prompts admitted at this step: the first token of every choice,
        then their rows join the batch. Short prompts share one left-padded
        forward; a prompt longer than a chunk waits in ``_filling``, to be
        prefilled alone, a chunk per step (``_fill_step``)."""
        samplers: dict[int, list[RowSampler]] = {}
        for gen in gens:   # per-request setup first: a bad one fails alone, before the forward
            if not gen.request.prompt_ids:
                gen._put(InvalidInput("The prompt is empty: there is no token to start from.",
                                      param="prompt", code="empty_prompt"))
                continue
            try:
                samplers[id(gen)] = [
                    RowSampler(gen.request.params, gen.request.prompt_ids, self.vocab_size, index)
                    for index in range(gen.request.n)]
            except Exception as exc:
                self._row_failed(gen, exc, "preparing sampling")
        gens = [g for g in gens if id(g) in samplers and not g.cancelled]
        together = [g for g in gens if not self._chunks(g)]
        self._filling.extend(_Filling(g, samplers[id(g)]) for g in gens if self._chunks(g))
        if together:
            self._join(together, *self._prefill_together(together), samplers,
                       [len(g.request.prompt_ids) for g in together] if self.exact_rows else None)

    def _chunks(self, gen: Generation) -> bool:
        """Whether `gen`'s prompt is prefilled alone, in chunks: longer than one
        chunk (or mostly in the prefix cache, where any prefix is reused), on a
        model whose rows can share a batch, without images (their pixels go
        with the one forward that holds their tokens)."""
        prompt = gen.request.prompt_ids
        if not self.batchable or gen.request.model_inputs:
            return False
        # a short prompt most of which the prefix cache holds is read from there, alone
        return len(prompt) > self.chunk or (self.exact_rows and gen.request.prefix_key is not None
                                            and 2 * self.prefix.match(gen.request.prefix_key, prompt)
                                            >= len(prompt))

    def _prefill_together(self, gens: list[Generation]):
        """One forward over short prompts, left-padded: (cache, mask, logits)."""
        prompts = [g.request.prompt_ids for g in gens]
        length = max(len(p) for p in prompts)
        ids = torch.zeros((len(gens), length), dtype=torch.long)
        mask = torch.zeros((len(gens), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache(self.model.config)   # decode steps write into spare room
        logits = self._forward(ids, mask, positions, cache,
                               [g.request.adapter or BASE_ADAPTER for g in gens],
                               gens[0].request.model_inputs if len(gens) == 1 else None)
        return cache, mask, logits

    @torch.inference_mode()
    def _fill_step(self) -> None:
        """The next chunk of the first long prompt in ``_filling``; after its
        last chunk its rows join the batch. Chunk bounds are multiples of
        `self.chunk` (LLMHOST_PREFILL_CHUNK), starting after the longest
        whole-chunk prefix the prefix cache holds (looked up at the first
        chunk, so a prompt that waited behind the same one reuses it).

        Why alone and in fixed chunks: a forward's rounding depends on its
        shapes (the rows and padding beside a prompt, how many positions it
        reads at once). Computed this way every chunk of a prompt meets the
        same shapes whether the chunks before it were computed just now or
        read from the prefix cache, and whatever decode steps ran between
        them, so reusing a prefix gives bit-identical keys, values and logits:
        the answer is the same with the cache on and off, in bfloat16 and int4
        too (tests/test_prefix_cache.py). Prompts are kept, not generated
        tokens: a decode step computes a token's keys with other shapes
        (unless ``exact_rows``: then any tokens, in chunks of any size). A
        long prompt alone also costs no padding. A failure ends this request
        alone: the running rows are not in its forward."""
        fill = self._filling[0]
        gen, prompt = fill.gen, fill.gen.request.prompt_ids
        if gen.cancelled:
            self._filling.popleft()
            gen._put(_END)
            return
        self._threads(0)
        key = gen.request.prefix_key if self.prefix is not None else None
        try:
            if fill.cache is None:
                hit = self.prefix.lookup(key, prompt, 1 if self.exact_rows else self.chunk) \
                    if key is not None else None
                fill.next = gen.cached_tokens = hit.length if hit else 0
                room = len(prompt) - fill.next + ROOM
                if hit:
                    layers = [tuple(t.unsqueeze(0) for t in hit.layer(i))
                              for i in range(len(hit.entry.kv))]
                    fill.cache = seeded_cache(self.model.config, layers, room)
                else:
                    fill.cache = growing_cache(self.model.config, room)
            begin = fill.next
            fill.next = end = min(begin + self.chunk, len(prompt))
            logits = self._forward(torch.tensor([prompt[begin:end]]),
                                   torch.ones((1, end), dtype=torch.long),
                                   torch.arange(begin, end).unsqueeze(0), fill.cache,
                                   [gen.request.adapter or BASE_ADAPTER])
        except Exception as exc:
            self._filling.popleft()
            log.exception("prefill failed on %s", self.model_id)
            self._fail([gen], failure(exc, self.model_id, "reading the prompt", "a shorter prompt"))
            return
        if end < len(prompt):
            return
        self._filling.popleft()
        cache = fill.cache
        set_room(cache)
        # whole chunks only, unless any prefix is reused (exact_rows)
        whole = len(prompt) if self.exact_rows else len(prompt) // self.chunk * self.chunk
        self._join([gen], cache, torch.ones((1, len(prompt)), dtype=torch.long), logits,
                   {id(gen): fill.samplers}, [whole if whole > gen.cached_tokens else 0])

    def _keep(self, gen: Generation, tokens: list[int], cache: DynamicCache, row: int,
              end: int | None = None) -> None:
        """The prefix cache keeps `tokens`' keys and values (copied): `row` of
        `cache`, the len(tokens) positions before `end` (default: its last
        ones), unless it holds them already."""
        key = gen.request.prefix_key if self.prefix is not None else None
        if key is None or not tokens or self.prefix.holds(key, tokens):
            return
        end = cache.layers[0].keys.shape[2] if end is None else end
        self.prefix.insert(key, list(tokens), [
            (layer.keys[row, :, end - len(tokens):end].clone(),
             layer.values[row, :, end - len(tokens):end].clone()) for layer in cache.layers])

    def _join(self, gens: list[Generation], cache: DynamicCache, mask: torch.Tensor,
              logits: torch.Tensor, samplers: dict[int, list[RowSampler]],
              keep: list[int] | None = None) -> None:
        """The prefilled `gens` get their first tokens, then the prefix cache
        the first keep[i] tokens of prompt i (0 or no `keep`: none), then they
        join the batch (n choices of a request share its
        prompt: its cache rows are repeated). The first tokens go out before the
        copies those make, the prefix cache's and, joining running rows, the
        batch's whole cache (SmolLM2 int4, a 20-token prompt joining 4 rows of
        ~1,500-1,900 positions: time to first token 45-52 -> 32-34 ms)."""
        repeat = torch.tensor([g.request.n for g in gens])
        select = torch.repeat_interleave(torch.arange(len(gens)), repeat) if int(repeat.max()) > 1 else None
        new_rows = []
        for gen in gens:
            for index, sampler in enumerate(samplers[id(gen)]):
                row = _Row(gen, index, sampler)
                row.position = len(gen.request.prompt_ids)
                new_rows.append(row)
        self._sample(new_rows, logits if select is None else logits[select])
        if keep:
            length = cache.layers[0].keys.shape[2]
            for i, (gen, count) in enumerate(zip(gens, keep)):
                prompt = gen.request.prompt_ids   # row i's last positions (left padding)
                if count:
                    self._keep(gen, prompt[:count], cache, i, length - len(prompt) + count)
        if select is not None:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[select], layer.values[select]
            mask = mask[select]
        self._merge(new_rows, cache, mask)

    @torch.inference_mode()
    def _decode(self) -> None:
        rows = self._rows
        self._threads(len(rows))
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(ids, self._mask, positions, self._cache, [r.adapter for r in rows],
                               decode=True)
        for row in rows:
            row.position += 1
        self._sample(rows, logits)

    def _forward(self, ids, mask, positions, cache, adapters: list[str],
                 extra: dict | None = None, decode: bool = False) -> torch.Tensor:
        """Last-position logits as float32 on the CPU, [rows, vocab]. `adapters`:
        each row's LoRA adapter (BASE_ADAPTER for none); `extra`: a lone
        prompt's other model inputs (pixel values), cast to the model's dtype;
        `decode`: a decode step (LlamaStep's own attention may run it)."""
        dev = self.device
        inputs = {name: value.to(dev, self.model.dtype) if value.is_floating_point()
                  else value.to(dev) for name, value in (extra or {}).items()}
        if self.step is not None and self.adapter_context is None and not inputs:
            logits = self.step(ids.to(dev), mask.to(dev), positions.to(dev), cache, decode)
            return logits[:, -1, :].float().cpu()
        context = self.adapter_context(adapters) if self.adapter_context else nullcontext()
        with context:
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             position_ids=positions.to(dev), cache=cache, use_cache=True,
                             logits_to_keep=1, **inputs)
        return out.logits[:, -1, :].float().cpu()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token with its own settings and hand it out."""
        plain = [i for i, r in enumerate(rows) if r.sampler.params.argmax_only]
        chosen: dict[int, int] = {}
        if plain:  # one argmax for every plain greedy row (no row copy when all are)
            picked = logits if len(plain) == len(rows) else logits[plain]
            for i, tok in zip(plain, torch.argmax(picked, dim=-1).tolist()):
                chosen[i] = tok
        now = time.monotonic()
        for i, row in enumerate(rows):
            if row.gone:
                continue
            lp = top = None
            try:
                if i in chosen:
                    tok = chosen[i]
                else:
                    processed = row.sampler.process(logits[i])
                    tok = row.sampler.choose(processed)
                    if row.sampler.params.logprobs is not None:
                        lp, top = row.sampler.logprobs(processed, tok)
                if not 0 <= tok < self.vocab_size:
                    raise ValueError(f"sampled token {tok} outside the vocabulary")
                row.sampler.observe(tok)
            except Exception as exc:
                self._row_failed(row.gen, exc, "sampling")
                continue
            row.generated += 1
            row.last_token = tok
            row.tokens.append(tok)
            params = row.sampler.params
            reason = None
            if tok in params.stop_token_ids or row.sampler.grammar_done:
                reason = "stop"
            elif row.generated >= params.max_tokens or row.position >= self.max_context:
                reason = "length"
            gen = row.gen
            gen.completion_tokens += 1
            if gen.first_token_at is None:
                gen.first_token_at = now
                metrics.observe_ttft(self.model_id, now - gen.submitted)
            gen._put(TokenEvent(row.index, tok, reason, lp, top))
            if reason:
                row.done = True

    # -- batch bookkeeping ----------------------------------------------------------------
    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch, left-padding whichever
        side is shorter."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self._rows = self._rows + rows

    def _drop_gone(self) -> None:
        """Drop finished and cancelled rows, end requests with no rows left, and
        trim padding columns that no remaining row needs."""
        if not self._rows or not any(r.gone for r in self._rows):
            return
        keep = [i for i, r in enumerate(self._rows) if not r.gone]
        for i, row in enumerate(self._rows):
            if row.done and self.exact_rows:   # its prompt and the tokens fed back after it
                fed = int(self._mask[i].sum())
                tokens = row.gen.request.prompt_ids + row.tokens[:-1]
                if fed == len(tokens):
                    self._keep(row.gen, tokens, self._cache, i)
            if row.gone:
                gen = row.gen
                gen.rows_left -= 1
                if gen.rows_left == 0:
                    # before _END: a scrape after the answer sees them
                    metrics.record_tokens(self.model_id, gen.prompt_tokens, gen.completion_tokens)
                    gen._put(_END)
                    self._recent.append(time.monotonic())
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask[index]
        start = int((self._mask.sum(0) > 0).nonzero()[0])  # first column a row still uses
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask = [], None, None

    def _fail(self, gens, err: EngineError) -> None:
        for gen in gens:
            gen._put(err)


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)

