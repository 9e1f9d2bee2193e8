"""Bad input is a 4xx, never a 5xx, and runaway work is bounded (issue 9,
sections 2 and 3): hostile bodies, load requests and chat templates through
a real gunicorn. Every case here answered 5xx (or hung) before."""
import json
import os
import time

import pytest
import requests

from support import assert_error

CHAT = "/v1/chat/completions"
LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def gen(server, tiny_models):
    server.load(tiny_models["llama"], id="bad-llama")
    return "bad-llama"


@pytest.fixture(scope="module")
def emb(server, minilm_dir):
    server.load(minilm_dir, id="bad-minilm")
    return "bad-minilm"


def post(server, path, body: bytes | dict, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.url + path, data=data, timeout=60,
                         headers={"Content-Type": "application/json"}, **kw)


def test_lone_surrogates_are_400(server, gen, emb):
    cases = [
        (CHAT, b'{"model": "bad-llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
         "messages[0].content"),
        ("/v1/completions", b'{"model": "bad-llama", "prompt": "\\udfff"}', "prompt"),
        ("/v1/completions", b'{"model": "bad-llama", "prompt": ["ok", "x\\ud800"]}', "prompt[1]"),
        ("/v1/embeddings", b'{"model": "bad-minilm", "input": "\\ud800"}', "input"),
        ("/v1/embeddings", b'{"model": "bad-minilm", "input": ["a", "\\ud8ff"]}', "input[1]"),
    ]
    for path, body, param in cases:
        assert_error(post(server, path, body), 400, param)
    # a real pair (an emoji written as two escapes) is text, and served
    ok = post(server, "/v1/completions",
              b'{"model": "bad-llama", "prompt": "\\ud83d\\ude42", "max_tokens": 2}')
    assert ok.status_code == 200, ok.text


def test_deep_json_is_400(server, gen):
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_error(post(server, CHAT, deep), 400)
    metadata = b'{"a": ' * 5000 + b"{}" + b"}" * 5000
    body = b'{"model": "bad-llama", "messages": [{"role": "user", "content": "hi"}], "metadata": ' \
        + metadata + b"}"
    assert_error(post(server, CHAT, body), 400, "metadata")
    # ordinary nesting is fine
    body = {"model": gen, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "metadata": {"a": {"b": {"c": [1, 2, {"d": "e"}]}}}}
    assert post(server, CHAT, body).status_code == 200


def test_bad_load_requests_are_4xx(server, gen, tiny_models, tmp_path):
    truncated, garbage = tmp_path / "truncated.gguf", tmp_path / "garbage.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")   # was a 500 (struct.error)
    garbage.write_bytes(os.urandom(4096))
    cases = [
        ({"model": "/dev/null"}, 400, "model"),
        ({"model": str(truncated), "id": "t6"}, 400, "model"),
        ({"model": str(garbage), "id": "t7"}, 400, "model"),
        ({"model": tiny_models["llama"] + "\x00x"}, 400, "model"),
        ({"model": tiny_models["llama"], "id": "t1", "gguf_file": "/etc/passwd"}, 400, "gguf_file"),
        ({"model": tiny_models["llama"], "id": "t2", "gguf_file": "../x.gguf"}, 400, "gguf_file"),
        ({"model": tiny_models["llama"], "id": "t3", "chat_template": "{% for %}"}, 400,
         "chat_template"),
        ({"model": tiny_models["llama"], "id": "t4",
          "chat_template": "{{ messages[0]['content'] + 1 }}"}, 400, "chat_template"),
        ({"model": tiny_models["llama"], "id": "t5", "chat_template": "{{ '' }}"}, 400,
         "chat_template"),
        # already loaded: validated as a new load would be
        ({"model": tiny_models["llama"], "id": gen, "device": "cuda:7"}, 400, "device"),
        ({"model": tiny_models["llama"], "id": gen, "trust_remote_code": True}, 403,
         "trust_remote_code"),
        ({"model": tiny_models["llama"], "id": gen, "chat_template": "{{ 'x' }}"}, 409, "model"),
    ]
    for body, status, param in cases:
        error = assert_error(post(server, "/v1/models", body), status, param)
        if param == "device":
            assert "cpu" in error["message"]
    listed = {m["id"] for m in requests.get(server.url + "/v1/models", timeout=10).json()["data"]}
    assert not listed & {"t1", "t2", "t3", "t4", "t5", "t6", "t7"}


def test_template_that_fails_on_some_messages_is_400(server, tiny_models):
    # renders the load-time sample, fails (or renders nothing) for a lone message
    template = ("{% if messages|length == 1 %}{{ messages[0]['content'] + 1 }}{% endif %}"
                "{% if messages|length == 2 %}{% else %}{{ 'x' }}{% endif %}")
    server.load(tiny_models["llama"], id="tmpl-llama", chat_template=template)
    one = [{"role": "user", "content": "hi"}]
    assert_error(post(server, CHAT, {"model": "tmpl-llama", "messages": one}), 400, "messages")
    two = one + [{"role": "assistant", "content": "yo"}]
    assert_error(post(server, CHAT, {"model": "tmpl-llama", "messages": two}), 400, "messages")
    requests.delete(server.url + "/v1/models/tmpl-llama", timeout=60)


def test_request_that_can_never_fit_is_400(server, gen):
    r = post(server, "/v1/completions", {"model": gen, "prompt": ["a"] * 100, "max_tokens": 1})
    assert "LLMHOST_MAX_QUEUE" in assert_error(r, 400, "prompt")["message"]


def test_chunked_body_over_the_limit_is_413(server, gen):
    def chunks():
        piece = b" " * (1 << 20)
        yield b'{"model": "bad-llama", "prompt": "'
        for _ in range(9):
            yield piece
        yield b'"}'

    r = requests.post(server.url + "/v1/completions", data=chunks(), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert_error(r, 413)
    small = requests.post(server.url + "/v1/completions", timeout=60,
                          data=iter([b'{"model": "bad-llama", ', b'"prompt": "hi", "max_tokens": 2}']),
                          headers={"Content-Type": "application/json"})
    assert small.status_code == 200, small.text


# -- runaway work ------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def test_looping_template_stops(server, tiny_models):
    pid = server.worker_pid()
    # at load: the sample conversation loops
    started = time.monotonic()
    assert_error(post(server, "/v1/models", {"model": tiny_models["llama"], "id": "loop1",
                                             "chat_template": LOOP}), 400, "chat_template")
    assert time.monotonic() - started < 10
    # at chat time: loops only for a lone message
    server.load(tiny_models["llama"], id="loop2",
                chat_template="{% if messages|length == 1 %}" + LOOP + "{% endif %}{{ 'x' }}")
    started = time.monotonic()
    r = post(server, CHAT, {"model": "loop2", "messages": [{"role": "user", "content": "hi"}]})
    assert_error(r, 400, "messages")
    assert time.monotonic() - started < 10
    before = cpu_seconds(pid)
    time.sleep(1.0)
    assert cpu_seconds(pid) - before < 0.3, "the render still runs"
    started = time.monotonic()
    assert requests.delete(server.url + "/v1/models/loop2", timeout=60).status_code == 200
    assert time.monotonic() - started < 5


def test_huge_prompt_is_refused_before_tokenizing(server, gen):
    big = "word " * (6 * 1024 * 1024 // 5)
    rss = server.worker_rss()
    started = time.monotonic()
    for body in ({"model": gen, "prompt": big}, {"model": gen, "prompt": ["hi", big]},
                 {"model": gen, "messages": [{"role": "user", "content": big}]}):
        path = CHAT if "messages" in body else "/v1/completions"
        error = assert_error(post(server, path, body), 400)
        assert error["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 10
    assert server.worker_rss() - rss < 200 * 1024 * 1024


def test_huge_embedding_input_is_refused_before_tokenizing(server, emb):
    big = "word " * (6 * 1024 * 1024 // 5)
    rss = server.worker_rss()
    error = assert_error(post(server, "/v1/embeddings", {"model": emb, "input": ["hi", big]}), 400,
                         "input")
    assert error["code"] == "context_length_exceeded" and "input[1]" in error["message"]
    r = post(server, "/v1/embeddings", {"model": emb, "input": big, "truncate": True})
    assert r.status_code == 200, r.text
    assert server.worker_rss() - rss < 200 * 1024 * 1024

