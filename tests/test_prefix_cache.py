"""Automatic prefix caching (issue 19, engine/prefixcache.py): the store keeps
recent sequences within its budget, the scheduler reuses the longest cached
prefix of each admitted row (several lengths in one prefill), greedy answers
are the same with the cache on and off, and usage reports the reused tokens
as OpenAI does."""
import contextlib
import os

import numpy as np
import pytest
import requests
import torch

from genutil import post, sse
from llmhost.config import TestConfig
from llmhost.engine.prefixcache import PrefixStore, common_prefix
from llmhost.engine.sampling import SamplingParams
from llmhost.engine.scheduler import GenerationRequest, Scheduler
from llmhost.models.loading import LoadSpec, load
from support import Server, sample, scrape, validate

# -- the store ------------------------------------------------------------------------


def _kv(length: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((2, length, 4), float(i)), torch.full((2, length, 4), -float(i)))
            for i in range(layers)]


BYTES_PER_TOKEN = 2 * 2 * 2 * 4 * 4      # layers x (k, v) x heads x head_dim x float32


def test_common_prefix():
    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 9])) == 2
    assert common_prefix(a, np.array([1, 2, 3, 4, 5])) == 4
    assert common_prefix(a, np.array([7])) == 0 and common_prefix(a, np.array([], int)) == 0


def test_longest_prefix_never_the_last_token_and_only_in_its_partition():
    store = PrefixStore("m", 10 ** 6)
    assert store.insert("", [1, 2, 3, 4, 5], _kv(5))
    assert store.insert("", [1, 2, 9, 9], _kv(4))
    hit = store.lookup("", [1, 2, 3, 4, 5, 6])
    assert hit.length == 5 and hit.layer(1)[0].shape == (2, 5, 4)
    # the last prompt token is always computed again: its logits give the first token
    assert store.lookup("", [1, 2, 3, 4, 5]).length == 4
    assert store.lookup("", [1, 2, 9, 9, 9]).length == 4
    assert store.lookup("", [8, 1, 2]) is None
    assert store.lookup("salted", [1, 2, 3, 4, 5, 6]) is None   # another partition sees nothing
    assert store.hits == 3 and store.tokens_reused == 13


def test_a_longer_sequence_supersedes_its_prefix_and_lru_eviction_keeps_the_budget():
    store = PrefixStore("m", 20 * BYTES_PER_TOKEN)
    store.insert("", [1, 2, 3], _kv(3))
    store.insert("", [1, 2, 3, 4, 5], _kv(5))          # an agent's next turn
    assert len(store) == 1 and store.bytes == 5 * BYTES_PER_TOKEN
    assert store.holds("", [1, 2]) and not store.holds("", [1, 2, 4]) and not store.holds("x", [1])
    store.insert("", [1, 2], _kv(2))                     # already held: nothing added
    assert len(store) == 1
    store.insert("other", [1, 2, 3], _kv(3))             # partitions never supersede each other
    store.insert("", [7] * 10, _kv(10))
    assert len(store) == 3 and store.bytes == 18 * BYTES_PER_TOKEN
    store.lookup("", [1, 2, 3, 4, 5, 6])                 # now the most recently used
    store.insert("", [8] * 4, _kv(4))                    # over budget: the LRU one goes
    assert store.lookup("other", [1, 2, 3, 4]) is None
    assert store.lookup("", [1, 2, 3, 4, 5, 6]).length == 5
    assert store.evictions == 1 and store.bytes <= store.budget
    assert not store.insert("", [5] * 30, _kv(30))       # bigger than the whole budget
    store.clear()
    assert len(store) == 0 and store.bytes == 0 and store.stats()["prefix_cache_bytes"] == 0


def test_the_sorted_index_finds_what_comparing_every_sequence_finds():
    """lookup, match and holds read only the two sequences beside a prompt in
    sorted order; against comparing every stored sequence (the store's old
    scan), on random prompts over a few tokens (shared prefixes, prefixes of
    each other, partitions, evictions), tokens past 255 and 65,535 included."""
    rng = np.random.default_rng(7)
    store = PrefixStore("m", 60 * BYTES_PER_TOKEN)
    alphabet = [0, 1, 2, 300, 70000]
    for step in range(3000):
        partition = "ab"[int(rng.integers(2))]
        tokens = [alphabet[i] for i in rng.integers(len(alphabet), size=int(rng.integers(1, 9)))]
        entries = [e for e in store._entries.values() if e.partition == partition]
        lengths = [common_prefix(e.tokens, np.array(tokens[:-1])) for e in entries]
        block = int(rng.integers(1, 4))
        best = max(lengths, default=0) // block * block
        hit = store.lookup(partition, tokens, block)
        assert (hit.length if hit else 0) == best, (step, tokens, block)
        assert hit is None or common_prefix(hit.entry.tokens, np.array(tokens[:-1])) >= best
        assert store.match(partition, tokens) == max(lengths, default=0)
        assert store.holds(partition, tokens) == any(
            common_prefix(e.tokens, np.array(tokens)) == len(tokens) for e in entries)
        if rng.random() < 0.5:
            store.insert(partition, tokens, _kv(len(tokens)))
            stored = [e.tokens.tolist() for e in store._entries.values() if e.partition == partition]
            assert tokens in [t[:len(tokens)] for t in stored]
            assert not any(a != b and b[:len(a)] == a for a in stored for b in stored), stored
    assert store.evictions > 0 and store.bytes <= store.budget


# -- the scheduler: same greedy tokens with and without the cache ------------------------


def _submit(scheduler, ids, n=1, max_tokens=10, partition="", logprobs=None):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=logprobs)
    return scheduler.submit(GenerationRequest(list(ids), params, n=n, cache_partition=partition))


def _tokens(gen) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for event in gen.events():
        out.setdefault(event.index, []).append(event.token_id)
    return out


def _scored(gen) -> list[tuple[int, float]]:
    """A lone choice's tokens with their logprobs (the first from the prefill)."""
    return [(event.token_id, event.logprob) for event in gen.events()]


CHUNK = 16    # small prefill chunks, so that short test prompts span several


def _agent_loop_equal(loaded, turns: int = 3, together: bool = True, max_tokens: int = 10):
    """An agent loop (each turn resends the conversation, the answer and new
    text) and then (`together`) rows admitted together that reuse different
    lengths: the same greedy tokens as a scheduler without a prefix cache, and
    for a request alone the same logprobs to the last bit."""
    on = Scheduler("on", loaded, TestConfig(PREFIX_CACHE_MB=64, PREFILL_CHUNK=CHUNK)).start()
    off = Scheduler("off", loaded, TestConfig(PREFIX_CACHE_MB=0, PREFILL_CHUNK=CHUNK)).start()
    tok = loaded.tokenizer
    try:
        system = tok("You are a careful assistant with tools for weather and time. " * 2,
                     add_special_tokens=False)["input_ids"]
        conversation = list(system)
        held = 0
        for turn in range(turns):
            gen = _submit(on, conversation, max_tokens=max_tokens, logprobs=0)
            got = _scored(gen)
            assert got == _scored(_submit(off, conversation, max_tokens=max_tokens, logprobs=0)), turn
            if on.exact_rows:   # any prefix: the last prompt and its answer but the last token
                assert gen.cached_tokens == held, (turn, gen.cached_tokens, held)
                held = len(conversation) + len(got) - 1
            else:   # whole chunks of the previous prompt, never a partial one
                assert gen.cached_tokens % CHUNK == 0
                assert (gen.cached_tokens > len(system) // 2) == (turn > 0), (turn, gen.cached_tokens)
            conversation += [t for t, _ in got] + tok(f" result {turn}: sunny. next?",
                                                      add_special_tokens=False)["input_ids"]
        if not together:
            return
        # Admitted in one prefill: a long reuse, a short one (the system prompt
        # only), none, and n=2 choices of a reused prompt.
        prompts = [conversation + tok(" thanks", add_special_tokens=False)["input_ids"],
                   system + tok(" a different question", add_special_tokens=False)["input_ids"],
                   tok("unrelated words entirely", add_special_tokens=False)["input_ids"],
                   conversation[:len(conversation) - 3]]
        with on._cond:   # hold the scheduler until every request waits: one admission
            gens = [_submit(on, p, n=2 if i == 3 else 1) for i, p in enumerate(prompts)]
        results = [_tokens(g) for g in gens]
        reused = [g.cached_tokens for g in gens]
        assert reused[0] > reused[1] > 0 and reused[2] == 0 and reused[3] > 0, reused
        for i, (prompt, got) in enumerate(zip(prompts, results)):
            assert got == _tokens(_submit(off, prompt, n=2 if i == 3 else 1)), i
        assert on.stats()["prefix_cache_bytes"] > 0 and "prefix_cache_bytes" not in off.stats()
    finally:
        on.close("test over")
        off.close("test over")
    assert on.prefix.bytes == 0        # unloading frees it


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_families_same_tokens_with_and_without_the_cache(tiny_models, family):
    _agent_loop_equal(load(LoadSpec(model=tiny_models[family]), TestConfig()))


def test_any_prefix_where_rows_are_computed_alone(tiny_models):
    """The tiny Llama with its linear layers on llmhost's int4 kernel (as a
    GGUF int4 load has them): every forward runs on llmhost's attention, a
    position's keys do not depend on how they were computed, so the cache
    reuses any prefix, generated tokens included, and the answers (batched
    ones too) and logprobs are the same as without it."""
    import numpy as np
    from gguf import GGMLQuantizationType, quantize

    from llmhost.models import q4kernel
    from llmhost.models.quantize import int4_from_gguf

    if not q4kernel.available()[0]:
        pytest.skip("llmhost's int4 kernel is unavailable here")
    loaded = load(LoadSpec(model=tiny_models["llama"], dtype="float32"), TestConfig())
    for layer in loaded.model.model.layers:
        for part, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                            (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                weight = getattr(part, name).weight.detach().numpy()
                blocks = quantize(weight.astype(np.float32), GGMLQuantizationType.Q4_1)
                setattr(part, name, int4_from_gguf("Q4_1", blocks, np.arange(weight.shape[0]),
                                                   torch.float32))
    scheduler = Scheduler("probe", loaded, TestConfig(PREFIX_CACHE_MB=64))
    try:
        assert scheduler.exact_rows
        # LoRA adapters make forwards go through model(...): whole chunks then, and what
        # the other forward computed is dropped, both ways
        for context in (lambda names: contextlib.nullcontext(), None):
            scheduler.prefix.insert("", [1, 2, 3], [(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))])
            scheduler.adapter_context = context
            assert scheduler.exact_rows == (context is None) and len(scheduler.prefix) == 0
    finally:
        scheduler.close("test over")
    _agent_loop_equal(loaded)


@pytest.mark.slow  # loads SmolLM2 (int4: the session's smollm2_int4)
@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"quantization": "int4"}],
                         ids=["bfloat16", "int4"])
def test_smollm2_same_tokens_with_and_without_the_cache(smollm2_gguf, options, request):
    """One request at a time: the decode steps of rows batched together round
    differently from a row alone (with or without the cache), so the batched
    part is left to the tiny models' test."""
    if options.get("quantization") == "int4":
        loaded = request.getfixturevalue("smollm2_int4")
    else:
        loaded = load(LoadSpec(model=smollm2_gguf, **options), TestConfig())
    _agent_loop_equal(loaded, turns=2, together=False, max_tokens=4)


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(tiny_models):
    """A long prompt is read a chunk per step, each followed by a decode step of
    the running rows: a stream in progress keeps getting tokens meanwhile (not
    one pause for the whole prompt), and a short prompt that arrives meanwhile
    starts at once instead of waiting behind it. The order is recorded on the
    scheduler thread, where each token is handed out."""
    loaded = load(LoadSpec(model=tiny_models["llama"]), TestConfig())
    scheduler = Scheduler("fill", loaded, TestConfig(PREFIX_CACHE_MB=0, PREFILL_CHUNK=8)).start()
    order: list[str] = []
    try:
        def traced(name, gen):
            put = gen._put
            gen._put = lambda item: (order.append(name), put(item))
            return gen

        with scheduler._cond:    # all three wait before the scheduler looks: a known start
            stream = traced("stream", _submit(scheduler, [5, 6, 7], max_tokens=60))
            long = traced("long", _submit(scheduler, list(range(10, 170)), max_tokens=2))
        events = stream.events()
        next(events)
        short = traced("short", _submit(scheduler, [8, 9], max_tokens=2))
        assert len(_tokens(long)[0]) == 2 and len(_tokens(short)[0]) == 2
        list(events)
    finally:
        scheduler.close("test over")
    first_long = order.index("long")
    # 160 prompt tokens are 20 chunks: a decode step of the stream after each of them
    assert order[:first_long].count("stream") >= 19, order
    assert order.index("short") < first_long, order


def test_no_reuse_where_layers_drop_positions():
    """A sliding-window model (Mistral here) gets no prefix cache at all."""
    from types import SimpleNamespace

    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=64, vocab_size=512,
                           sliding_window=4)
    loaded = SimpleNamespace(model=MistralForCausalLM(config).eval(), max_context=64,
                             quantization=None, dtype=torch.float32)
    scheduler = Scheduler("sliding", loaded, TestConfig(PREFIX_CACHE_MB=64))
    assert scheduler.prefix is None and not scheduler.batchable


# -- the API: cached_tokens in usage, isolation by cache_salt ------------------------------


@pytest.fixture(scope="module")
def server():
    """A server of this file's own: a small cache, and small prefill chunks so
    that short test conversations reuse whole chunks."""
    srv = Server(env={"LLMHOST_PREFIX_CACHE_MB": "64", "LLMHOST_PREFILL_CHUNK": str(CHUNK)}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny(server, tiny_models):
    server.load(tiny_models["llama"], id="prefix-llama")
    yield "prefix-llama"
    requests.delete(server.url + "/v1/models/prefix-llama", timeout=60)


SYSTEM = "You are a helpful assistant. " * 20


def _chat(server, model, messages, **extra):
    r = post(server, "/v1/chat/completions", {"model": model, "messages": messages,
                                              "max_tokens": 8, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return validate(r.json(), "CreateChatCompletionResponse")


def test_usage_reports_cached_tokens_on_chat_completions_and_streams(server, tiny):
    salt = {"cache_salt": os.urandom(8).hex()}   # a partition of this test's own
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    first = _chat(server, tiny, messages, **salt)
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    messages += [first["choices"][0]["message"], {"role": "user", "content": "and then?"}]
    second = _chat(server, tiny, messages, **salt)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] // 2 < cached < second["usage"]["prompt_tokens"]

    # the same request in another partition reuses nothing, and answers the same
    other = _chat(server, tiny, messages, cache_salt="someone else")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert other["choices"] == second["choices"]

    _, chunks = sse(server, "/v1/chat/completions", {
        "model": tiny, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, **salt}, "CreateChatCompletionStreamResponse")
    usage = chunks[-1]["usage"]
    # every whole chunk but the last token's: what the non-streamed request just kept
    assert usage["prompt_tokens_details"]["cached_tokens"] == \
        (usage["prompt_tokens"] - 1) // CHUNK * CHUNK

    r = post(server, "/v1/completions", {"model": tiny, "prompt": SYSTEM, "max_tokens": 4,
                                         "temperature": 0, **salt})
    r = post(server, "/v1/completions", {"model": tiny, "prompt": SYSTEM + " more", "max_tokens": 4,
                                         "temperature": 0, **salt})
    body = validate(r.json(), "CreateCompletionResponse")
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    metrics = scrape(server)
    assert sample(metrics, "llmhost_prefix_cache_hits_total", model=tiny) >= 3
    assert sample(metrics, "llmhost_prefix_cache_reused_tokens_total", model=tiny) >= cached
    assert sample(metrics, "llmhost_prefix_cache_bytes", model=tiny) > 0


def test_responses_chain_reports_input_cached_tokens(server, tiny):
    r = post(server, "/v1/responses", {"model": tiny, "instructions": SYSTEM, "input": "hello",
                                       "max_output_tokens": 8, "temperature": 0,
                                       "cache_salt": "responses-test"})
    first = validate(r.json(), "Response")
    # instructions are not carried over by previous_response_id (as OpenAI's): send them again
    r = post(server, "/v1/responses", {"model": tiny, "instructions": SYSTEM, "input": "and then?",
                                       "previous_response_id": first["id"],
                                       "max_output_tokens": 8, "temperature": 0,
                                       "cache_salt": "responses-test"})
    second = validate(r.json(), "Response")
    assert second["usage"]["input_tokens_details"]["cached_tokens"] > \
        first["usage"]["input_tokens"] // 2


def test_bad_cache_salt_is_a_400_naming_it(server, tiny):
    r = post(server, "/v1/chat/completions", {"model": tiny, "cache_salt": 5,
                                              "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
    "required": ["answer"]}}}


@pytest.mark.parametrize("extra", [{"tools": TOOLS, "tool_choice": "required"},
                                   {"response_format": SCHEMA}, {"n": 2}],
                         ids=["tools", "structured", "n2"])
def test_same_answers_with_a_reused_prefix_tools_structured_n(server, tiny, extra):
    """A cold partition (nothing to reuse) and a warm one give the same choices."""
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 6},
                {"role": "user", "content": "weather?"}]
    warm = {"cache_salt": os.urandom(8).hex()}
    _chat(server, tiny, messages[:1] + [{"role": "user", "content": "hi"}], **warm, **extra)
    reused = _chat(server, tiny, messages, **warm, **extra)
    cold = _chat(server, tiny, messages, cache_salt=os.urandom(8).hex(), **extra)
    assert reused["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert reused["choices"] == cold["choices"]
