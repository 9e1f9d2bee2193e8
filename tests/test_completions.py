"""POST /v1/completions: end to end through gunicorn and the official openai
client, and every bad input through the Flask test client."""
import pytest
from transformers import AutoTokenizer

from genutil import eos_ids, post, reference, sse
from llmhost.generation.text import token_string
from support import assert_error, counts, validate

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gpt2(server, tiny_models):
    server.load(tiny_models["gpt2"], id="tiny-gpt2")
    return AutoTokenizer.from_pretrained(tiny_models["gpt2"])


def validate_chunk(chunk: dict) -> dict:
    """Streamed completions have the CreateCompletionResponse shape, but OpenAI
    sends `finish_reason: null` until a choice's last chunk while that schema
    lists no null: validate with the null left out."""
    body = {**chunk, "choices": [{k: v for k, v in c.items() if v is not None or k != "finish_reason"}
                                 for c in chunk["choices"]]}
    for choice in body["choices"]:
        choice.setdefault("finish_reason", "length")
    validate(body, "CreateCompletionResponse")
    return chunk


# -- SmolLM2: exactly what transformers generates --------------------------------

@pytest.mark.parametrize("kind", ["token ids", "text"])
def test_greedy_completion_equals_transformers_generate(server, smollm2, smollm2_reference, kind):
    tok, _ = smollm2_reference
    if kind == "token ids":
        ids = tok.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        prompt = ids
    else:
        prompt = "The capital of France is"
        ids = tok(prompt)["input_ids"]
    expected = reference(smollm2_reference, ids, 10)
    r = post(server, "/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": 10,
                                         "temperature": 0, "logprobs": 0})
    body = validate(r.json(), "CreateCompletionResponse")
    choice = body["choices"][0]
    visible = [i for i in expected if i not in eos_ids(smollm2_reference)]
    assert choice["logprobs"]["tokens"] == [token_string(tok, i) for i in visible]
    assert choice["text"] == tok.decode(expected, skip_special_tokens=True)
    assert counts(body["usage"]) == {"prompt_tokens": len(ids),
                                     "completion_tokens": len(expected),
                                     "total_tokens": len(ids) + len(expected)}
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"

    # The same request streamed gives the same text, and ends with usage.
    _, chunks = sse(server, "/v1/completions", {"model": "smollm2", "prompt": prompt,
                                                "max_tokens": 10, "temperature": 0,
                                                "stream_options": {"include_usage": True}})
    for chunk in chunks[:-1]:
        validate_chunk(chunk)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == choice["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and counts(chunks[-1]["usage"]) == counts(body["usage"])


# -- tiny GPT-2 ---------------------------------------------------------------------------

def greedy(openai_client, prompt="hello world", **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return openai_client.completions.create(model="tiny-gpt2", prompt=prompt, temperature=0,
                                            **kwargs)


def test_stop_strings_spanning_tokens_in_both_modes(openai_client, gpt2):
    full = greedy(openai_client, logprobs=0)
    text, tokens = full.choices[0].text, full.choices[0].logprobs.tokens
    # A stop string made of the end of token 2 and the start of token 3.
    boundary = len("".join(tokens[:3]))
    stop = text[boundary - 2:boundary + 2]
    assert len(stop) == 4 and text.find(stop) < boundary
    before = text[:text.find(stop)]
    r = greedy(openai_client, stop=["never", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (before, "stop")
    streamed, reasons = "", []
    for chunk in greedy(openai_client, stop=stop, stream=True):
        validate_chunk(chunk.model_dump(exclude_unset=True))
        streamed += chunk.choices[0].text
        reasons.append(chunk.choices[0].finish_reason)
    assert streamed == before and reasons[-1] == "stop"
    # A stop string that never shows up changes nothing.
    assert greedy(openai_client, stop="zzzz").choices[0].text == text


def test_several_prompts_and_n(openai_client, gpt2):
    r = greedy(openai_client, prompt=["hello world", "the quick"], n=2, max_tokens=5)
    validate(r.model_dump(exclude_unset=True), "CreateCompletionResponse")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]       # greedy: same per prompt
    assert texts[0] == greedy(openai_client, max_tokens=5).choices[0].text
    prompt_ids = [gpt2("hello world")["input_ids"], gpt2("the quick")["input_ids"]]
    assert r.usage.prompt_tokens == sum(map(len, prompt_ids))
    assert r.usage.completion_tokens == 4 * 5
    by_ids = greedy(openai_client, prompt=prompt_ids, n=2, max_tokens=5)
    assert [c.text for c in by_ids.choices] == texts


def test_echo_and_legacy_logprobs(openai_client, gpt2):
    prompt = "héllo 🙂 日本語"
    r = greedy(openai_client, prompt=prompt, echo=True, logprobs=2, max_tokens=6)
    validate(r.model_dump(exclude_unset=True), "CreateCompletionResponse")
    choice = r.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, logprob, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                           lp.text_offset):
        assert len(top) == 2 and logprob == pytest.approx(max(top.values()), abs=1e-5)
        assert choice.text[offset:].startswith(token)
    assert lp.text_offset[0] == len(prompt)
    # Streamed with echo: the prompt comes first, then the same completion.
    chunks = list(greedy(openai_client, prompt=prompt, echo=True, max_tokens=6, stream=True))
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == choice.text


def test_emoji_and_cjk_stream_whole(server, gpt2):
    """Tokens forced by logit_bias: the emoji and CJK tokens come out whole,
    each delta valid text."""
    forced = {str(gpt2(" 🙂")["input_ids"][-1]): 100, str(gpt2(" 日本語")["input_ids"][-1]): 100}
    _, chunks = sse(server, "/v1/completions", {
        "model": "tiny-gpt2", "prompt": "hi", "max_tokens": 8, "logit_bias": forced})
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert all(p and "\ufffd" not in p for p in pieces)
    assert set("".join(pieces).split()) <= {"🙂", "日本語"} and "".join(pieces).strip()


def distinct_tokens(openai_client, **penalty) -> int:
    if "repetition_penalty" in penalty:       # an llmhost extra: the SDK sends it in extra_body
        penalty = {"extra_body": penalty}
    r = greedy(openai_client, max_tokens=16, logprobs=0, **penalty)
    assert len(r.choices[0].logprobs.tokens) == 16
    return len(set(r.choices[0].logprobs.tokens))


@pytest.mark.parametrize("name, low, high", [
    ("frequency_penalty", -2.0, 2.0),
    ("presence_penalty", -2.0, 2.0),
    ("repetition_penalty", 1.0, 3.0),
])
def test_penalties_reduce_repetition(openai_client, gpt2, name, low, high):
    """The tiny model repeats itself greedily; a stronger penalty on tokens
    already generated gives more distinct tokens."""
    repetitive = distinct_tokens(openai_client, **{name: low})
    varied = distinct_tokens(openai_client, **{name: high})
    assert varied > repetitive, (name, repetitive, varied)


def test_empty_prompt_starts_from_bos(openai_client, gpt2):
    r = greedy(openai_client, prompt="", max_tokens=3)
    assert r.usage.prompt_tokens == 1 and 1 <= r.usage.completion_tokens <= 3


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("change, param", [
    ({"prompt": 3}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], "a"]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"suffix": "tail"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": -1}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"echo": "yes please"}, "echo"),
])
def test_bad_input(client, change, param):
    body = {"model": "m", "prompt": "hi", **change}
    if change.get("prompt", "") is None:
        del body["prompt"]
    error = assert_error(client.post("/v1/completions", json=body), 400, param)
    if error["code"] == "unsupported_parameter":
        assert "not supported" in error["message"]


def test_token_ids_outside_vocabulary(client, local_gpt2):
    r = client.post("/v1/completions", json={"model": local_gpt2, "prompt": [1, 2, 10**6]})
    assert "vocabulary" in assert_error(r, 400, "prompt")["message"]
    r = client.post("/v1/completions", json={"model": local_gpt2, "prompt": [[1], [10**6]]})
    assert_error(r, 400, "prompt[1]")


def test_max_tokens_beyond_context(client, local_gpt2):
    r = client.post("/v1/completions", json={"model": local_gpt2, "prompt": "hello",
                                             "max_tokens": 256})
    error = assert_error(r, 400, "max_tokens")
    assert "maximum context length is 256 tokens" in error["message"]
    assert "in the prompt" in error["message"] and error["code"] == "context_length_exceeded"
