"""The scheduler in-process: batching keeps every request's own result,
cancellation frees the slot, the queue is bounded, errors reach the waiter."""
import threading
import time

import pytest
import torch

from llmhost.config import TestConfig
from llmhost.engine.errors import ModelClosed, QueueFull, QueueTimeout
from llmhost.http.errors import from_engine
from llmhost.models.loading import LoadSpec, load
from llmhost.engine.sampling import SamplingParams
from llmhost.engine.scheduler import GenerationRequest, Scheduler


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load(LoadSpec(model=tiny_models["llama"]), TestConfig())


@pytest.fixture()
def make_scheduler(llama):
    made = []

    def make(**config):
        made.append(Scheduler("tiny", llama, TestConfig(**config)).start())
        return made[-1]

    yield make
    for scheduler in made:
        scheduler.close("test over")


def prompt(llama, text: str) -> list[int]:
    return llama.tokenizer(text)["input_ids"]


def run(scheduler, ids, n=1, **params) -> dict[int, list[int]]:
    params.setdefault("max_tokens", 16)
    params.setdefault("temperature", 0)
    gen = scheduler.submit(GenerationRequest(ids, SamplingParams(**params), n=n))
    out: dict[int, list[int]] = {}
    for event in gen.events():
        out.setdefault(event.index, []).append(event.token_id)
    return out


def reference(llama, ids, max_tokens=16) -> list[int]:
    out = llama.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_equals_generate_alone_and_in_a_busy_batch(llama, make_scheduler):
    sched = make_scheduler()
    prompts = [prompt(llama, t) for t in ("hello world", "the quick brown fox jumps over",
                                         "what is the capital city of france and why", "🙂 日本語")]
    refs = [reference(llama, p, 24) for p in prompts]
    assert [run(sched, p, max_tokens=24)[0] for p in prompts] == refs

    results: dict[int, list[int]] = {}
    noise_done = threading.Event()

    def noise():  # sampled requests with other settings share the batch meanwhile
        while not noise_done.is_set():
            run(sched, prompts[0], n=2, temperature=1.5, top_k=20, logit_bias={5: 50},
                frequency_penalty=1.0, max_tokens=7)

    def greedy(i):
        time.sleep(0.01 * i)  # staggered: rows join a running batch
        results[i] = run(sched, prompts[i], max_tokens=24)[0]

    noisy = threading.Thread(target=noise)
    noisy.start()
    workers = [threading.Thread(target=greedy, args=(i,)) for i in range(len(prompts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    noise_done.set()
    noisy.join()
    assert [results[i] for i in range(len(prompts))] == refs


def test_the_team_is_spread_before_the_first_request_and_nothing_else_runs(llama, make_scheduler):
    """The scheduler thread makes and spreads its OpenMP team when it starts
    (Scheduler._warm): no row, no prefix cache entry, and the first request's
    tokens are generate's."""
    sched = make_scheduler()
    deadline = time.monotonic() + 60
    while sched.warm_ms is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.warm_ms is not None
    stats = sched.stats()
    assert stats["running"] == stats["queued"] == stats.get("prefix_cache_entries", 0) == 0, stats
    ids = prompt(llama, "hello world")
    assert run(sched, ids, max_tokens=8)[0] == reference(llama, ids, max_tokens=8)


@pytest.mark.parametrize("chunk", [0, 4], ids=["one-forward", "chunked"])
def test_the_first_token_goes_out_before_the_batch_copies(llama, make_scheduler, chunk):
    """A prefilled request's first token is handed out before its rows are
    copied into the prefix cache and the running batch (joining long running
    rows, those copies held its first token back), whether its prompt was read
    in one forward or in chunks; its tokens stay generate's."""
    sched = make_scheduler(PREFIX_CACHE_MB=16, **({"PREFILL_CHUNK": chunk} if chunk else {}))
    seen, kept = [], []
    merge, keep = sched._merge, sched._keep

    def recording(rows, cache, mask):
        seen.append([row.gen.first_token_at is not None for row in rows])
        return merge(rows, cache, mask)

    def keeping(gen, *args, **kwargs):
        kept.append(gen.first_token_at is not None)
        return keep(gen, *args, **kwargs)

    sched._merge, sched._keep = recording, keeping
    ids = prompt(llama, "hello world, what a fine day it is")
    assert run(sched, ids, n=2, max_tokens=6)[0] == reference(llama, ids, max_tokens=6)
    assert seen and all(all(rows) for rows in seen), seen
    # the chunked prompt's whole chunks, or (where rows are computed alone) the whole prompt
    assert bool(kept) == bool(chunk or sched.exact_rows) and all(kept), kept


def test_seed_reproducible_and_choices_differ(llama, make_scheduler):
    sched = make_scheduler()
    ids = prompt(llama, "tell me a story")
    a = run(sched, ids, n=3, temperature=1.0, seed=1234)
    b = run(sched, ids, n=3, temperature=1.0, seed=1234)
    c = run(sched, ids, n=3, temperature=1.0, seed=99)
    assert a == b and sorted(a) == [0, 1, 2]
    assert a != c
    assert len({tuple(v) for v in a.values()}) > 1


def test_stop_tokens_and_length(llama, make_scheduler):
    sched = make_scheduler()
    ids = prompt(llama, "hello")
    first = run(sched, ids, max_tokens=1)[0][0]
    gen = sched.submit(GenerationRequest(ids, SamplingParams(
        max_tokens=10, temperature=0, stop_token_ids=frozenset({first}))))
    events = list(gen.events())
    assert [(e.token_id, e.finish_reason) for e in events] == [(first, "stop")]
    events = list(sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=5, temperature=0))).events())
    assert len(events) == 5 and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1])


def test_logprobs_and_logit_bias(llama, make_scheduler):
    sched = make_scheduler()
    ids = prompt(llama, "hello")
    events = list(sched.submit(GenerationRequest(ids, SamplingParams(
        max_tokens=4, temperature=0, logprobs=3))).events())
    for e in events:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.token_id == e.top_logprobs[0][0]
        assert e.logprob == pytest.approx(max(lp for _, lp in e.top_logprobs))
    forced = run(sched, ids, max_tokens=4, logit_bias={42: 100.0})[0]
    assert forced == [42, 42, 42, 42]


def test_cancel_frees_the_slot(llama, make_scheduler):
    sched = make_scheduler()
    gen = sched.submit(GenerationRequest(prompt(llama, "go"), SamplingParams(max_tokens=100000,
                                                                            temperature=0)))
    events = gen.events()
    next(events)
    assert sched.stats()["running"] == 1
    gen.cancel()
    deadline = time.monotonic() + 5
    while sched.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = sched.stats()
    assert (stats["queued"], stats["running"]) == (0, 0)
    assert sum(1 for _ in events) < 1000  # the stream ends instead of running to max_tokens


def test_finish_one_choice_keeps_the_others(llama, make_scheduler):
    sched = make_scheduler()
    gen = sched.submit(GenerationRequest(prompt(llama, "go"), SamplingParams(
        max_tokens=12, temperature=1.0, seed=3), n=2))
    counts = {0: 0, 1: 0}
    for e in gen.events():
        counts[e.index] += 1
        if e.index == 0 and counts[0] == 2:
            gen.finish(0)
    assert counts[1] == 12 and counts[0] <= 4


def test_queue_full_is_429_and_queue_timeout_is_503(llama, make_scheduler):
    sched = make_scheduler(MAX_BATCH=1, MAX_QUEUE=1, QUEUE_TIMEOUT=0.3)
    ids = prompt(llama, "go")
    long = sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=100000, temperature=0)))
    long_events = long.events()
    next(long_events)  # running: the batch (1 row) is full
    waiting = sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=2, temperature=0)))
    with pytest.raises(QueueFull) as full:
        sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=2, temperature=0)))
    full = from_engine(full.value)
    assert full.status == 429 and full.headers["Retry-After"]
    with pytest.raises(QueueTimeout) as timed_out:
        list(waiting.events())
    timed_out = from_engine(timed_out.value)
    assert timed_out.status == 503 and "LLMHOST_QUEUE_TIMEOUT" in timed_out.message
    long.cancel()


def test_close_fails_running_and_waiting_requests(llama, make_scheduler):
    sched = make_scheduler(MAX_BATCH=1)
    ids = prompt(llama, "go")
    running = sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=100000, temperature=0)))
    running_events = running.events()
    next(running_events)
    waiting = sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=3, temperature=0)))
    sched.close("The model 'tiny' was unloaded while this request was running.")
    for events in (running_events, waiting.events()):
        with pytest.raises(ModelClosed) as err:
            list(events)
        err = from_engine(err.value)
        assert err.status == 503 and "unloaded" in err.message
    with pytest.raises(ModelClosed):
        sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=1)))


def test_threads_per_step_follow_the_rule_and_the_override(llama, make_scheduler):
    """Every step uses all of torch's threads; LLMHOST_LONE_ROW_THREADS sets a
    lone row's count (up to torch's). The answer is the same with any thread
    count."""
    from llmhost.engine.scheduler import step_threads

    for rows in (0, 1, 4, 8):
        assert step_threads(rows, 2) == 2
    assert step_threads(1, 1) == 1
    assert step_threads(1, 2, lone_row=1) == 1
    assert step_threads(1, 8, lone_row=3) == 3
    assert step_threads(1, 8, lone_row=99) == 8
    assert step_threads(4, 8, lone_row=1) == 8

    # The scheduler's own choice, applied before each step.
    before = torch.get_num_threads()
    sched = Scheduler("tiny", llama, TestConfig(LONE_ROW_THREADS=1))   # not started: called here
    try:
        torch.set_num_threads(2)
        sched.threads = 2
        sched._threads(1)
        assert torch.get_num_threads() == 1
        sched._threads(4)
        assert torch.get_num_threads() == 2
    finally:
        sched.close("test over")
        torch.set_num_threads(before)
    ids = prompt(llama, "the quick brown fox")
    assert run(make_scheduler(LONE_ROW_THREADS=1), ids)[0] == reference(llama, ids)
