"""One request never fails another (issue 9, section 1): numeric fields are
checked at the edge, and inside the scheduler a failure caused by one row
(sampling NaN, an empty prompt, a seed torch cannot take) ends that request
only while the rest of the batch finishes with the text it gives alone."""
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from llmhost.config import TestConfig
from llmhost.engine.sampling import RowSampler, SamplingParams

LOGPROB_FLOOR = -9999.0   # OpenAI's floor, documented in README
from llmhost.engine.scheduler import GenerationRequest, Scheduler
from llmhost.engine.errors import EngineError
from llmhost.http.errors import from_engine
from llmhost.models.loading import LoadSpec, load
from support import assert_error, validate


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load(LoadSpec(model=tiny_models["llama"]), TestConfig())


@pytest.fixture()
def scheduler(llama):
    sched = Scheduler("tiny", llama, TestConfig(BATCH_WAIT_MS=200))
    sched.start()
    yield sched
    sched.close("test over")


def collect(gen) -> list[int]:
    return [event.token_id for event in gen.events()]


PROMPTS = ["hello world", "the quick brown fox", "what is the capital of france", "one two three"]


def solo(scheduler, llama) -> list[list[int]]:
    params = SamplingParams(max_tokens=12, temperature=0)
    return [collect(scheduler.submit(GenerationRequest(llama.tokenizer(t)["input_ids"], params)))
            for t in PROMPTS]


@pytest.mark.parametrize("poison", [
    # NaN probabilities: the penalty divides logits into inf (found through the API)
    GenerationRequest([], SamplingParams(max_tokens=12, temperature=1.0,
                                         repetition_penalty=1e-300)),
    # an empty prompt (a chat template that renders to nothing)
    GenerationRequest([], SamplingParams(max_tokens=12, temperature=0)),
    # a token id the model has no embedding for
    GenerationRequest([10 ** 6], SamplingParams(max_tokens=12, temperature=0)),
], ids=["nan-probabilities", "empty-prompt", "token-outside-vocab"])
def test_poisoned_row_fails_alone(scheduler, llama, poison):
    expected = solo(scheduler, llama)
    if poison.params.repetition_penalty != 1.0:
        poison.prompt_ids = llama.tokenizer("poison")["input_ids"]
    # All five arrive within the batching window: one prefill, one batch.
    gens = [scheduler.submit(GenerationRequest(llama.tokenizer(t)["input_ids"],
                                               SamplingParams(max_tokens=12, temperature=0)))
            for t in PROMPTS[:2]]
    bad = scheduler.submit(poison)
    gens += [scheduler.submit(GenerationRequest(llama.tokenizer(t)["input_ids"],
                                                SamplingParams(max_tokens=12, temperature=0)))
             for t in PROMPTS[2:]]
    with pytest.raises(EngineError) as err:
        collect(bad)
    assert from_engine(err.value).status in (400, 500)
    assert [collect(g) for g in gens] == expected


def test_any_64_bit_seed_samples(scheduler, llama):
    ids = llama.tokenizer("hello")["input_ids"]
    for seed in (2 ** 63 - 1, -2 ** 63, 2 ** 70):   # the engine reduces any int modulo 2**64
        out = [collect(scheduler.submit(GenerationRequest(
            ids, SamplingParams(max_tokens=6, temperature=1.0, seed=seed)))) for _ in range(2)]
        assert len(out[0]) == 6 and out[0] == out[1]


def test_tiny_temperature_is_greedy(scheduler, llama):
    ids = llama.tokenizer("hello")["input_ids"]
    greedy = collect(scheduler.submit(GenerationRequest(ids, SamplingParams(max_tokens=8, temperature=0))))
    tiny = collect(scheduler.submit(GenerationRequest(ids, SamplingParams(max_tokens=8, temperature=1e-300))))
    assert tiny == greedy


# -- through gunicorn ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(server, tiny_models):
    server.load(tiny_models["llama"], id="iso-llama")
    return "iso-llama"


@pytest.mark.parametrize("field,value", [
    ("seed", 2 ** 64), ("seed", 2 ** 70), ("seed", -2 ** 70), ("seed", 2 ** 63),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 0), ("temperature", 2.5),
    ("logit_bias", {"²": 1}), ("logit_bias", {"1" * 5000: 1}), ("logit_bias", {"-1": 1}),
    ("top_p", -0.1), ("presence_penalty", 3),
])
def test_out_of_range_is_400_naming_the_field(server, tiny, field, value):
    for route, body in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = requests.post(server.url + route,
                          json={"model": tiny, "max_tokens": 4, **body, field: value}, timeout=60)
        error = assert_error(r, 400)
        assert field in (error["param"] or "") or field in error["message"], error


@pytest.mark.parametrize("extra", [
    {"seed": 2 ** 63 - 1, "temperature": 1}, {"seed": -2 ** 63, "temperature": 1},
    {"temperature": 1e-300}, {"top_p": 0, "temperature": 1}, {"repetition_penalty": 0.01},
    {"logit_bias": {" 12 ": 5}},
])
def test_edge_values_are_served(server, tiny, extra):
    r = requests.post(server.url + "/v1/completions",
                      json={"model": tiny, "prompt": "hi", "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateCompletionResponse")


def test_logprobs_are_finite(server, tiny):
    """-inf (a token with no chance) and NaN log probabilities answer as the
    finite floor: JSON has neither."""
    sampler = RowSampler(SamplingParams(max_tokens=1, logprobs=3), [1], 5, 0)
    logits = torch.tensor([0.0, float("-inf"), float("nan"), 1.0, float("-inf")])
    lp, top = sampler.logprobs(logits, 1)
    assert lp == LOGPROB_FLOOR and all(math.isfinite(v) for _, v in top)
    body = {"model": tiny, "prompt": "hi", "max_tokens": 4, "logprobs": 5, "temperature": 0}
    text = requests.post(server.url + "/v1/completions", json=body, timeout=60).text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON body"))


def test_streams_finish_beside_a_failing_request(server, tiny):
    """Four greedy streams and a chat whose template fails at render time, at
    once: the four give their solo text, the bad one a 4xx envelope."""
    url = server.url + "/v1/completions"

    def stream(prompt):
        r = requests.post(url, json={"model": tiny, "prompt": prompt, "max_tokens": 12,
                                     "temperature": 0, "stream": True}, stream=True, timeout=120)
        assert r.status_code == 200, r.text
        text = ""
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
        return text

    alone = [stream(p) for p in PROMPTS]
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(stream, p) for p in PROMPTS]
        bad = pool.submit(requests.post, url, json={"model": tiny, "prompt": "x", "seed": 2 ** 64,
                                                    "temperature": 1, "max_tokens": 12}, timeout=60)
        assert [f.result() for f in futures] == alone
    assert_error(bad.result(), 400, "seed")
