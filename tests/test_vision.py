"""Vision-language models: a tiny random LLaVA (llmhost/dev/tinymodels.py)
answers a chat with a data-URL PNG exactly as transformers' own `generate`
does on the same processor inputs, streamed and not, through the OpenAI SDK's
typed content parts too; bad images are a 400 naming the part."""
import base64
import io

import pytest
import requests
import torch

from genutil import post, sse
from support import assert_error, validate

QUESTION = "what is this"


def png_url(size=(40, 30), color=(200, 30, 60)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from llmhost.dev.tinymodels import build_llava

    return build_llava(str(tmp_path_factory.mktemp("vlm") / "tiny-llava"))


@pytest.fixture(scope="module")
def vlm(server, llava):
    body = server.load(llava, id="tiny-vlm", dtype="float32")
    assert body["input_modalities"] == ["text", "image"]
    yield "tiny-vlm"
    requests.delete(server.url + "/v1/models/tiny-vlm", timeout=60)


@pytest.fixture(scope="module")
def expected(llava):
    """(prompt ids, answer text): transformers' processor + generate in-process."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(llava)
    model = AutoModelForImageTextToText.from_pretrained(llava, dtype=torch.float32).eval()
    image = Image.open(io.BytesIO(base64.b64decode(png_url().split(",", 1)[1]))).convert("RGB")
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image},
                                      {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    text = processor.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert prompt.count(model.config.image_token_id) == 4     # the image is in the prompt
    return prompt, text


def test_greedy_equals_transformers(server, vlm, expected):
    prompt, text = expected
    r = post(server, "/v1/chat/completions", {"model": vlm, "messages": image_message(png_url()),
                                              "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = validate(r.json(), "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"]["prompt_tokens"] == len(prompt)     # image tokens counted
    _, chunks = sse(server, "/v1/chat/completions",
                    {"model": vlm, "messages": image_message(png_url()), "temperature": 0,
                     "max_tokens": 12, "stream_options": {"include_usage": True}},
                    schema="CreateChatCompletionStreamResponse")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == text
    assert chunks[-1]["usage"]["prompt_tokens"] == len(prompt)
    # another image gives another answer: the pixels reach the model
    other = post(server, "/v1/chat/completions",
                 {"model": vlm, "messages": image_message(png_url(color=(0, 250, 10))),
                  "temperature": 0, "max_tokens": 12}).json()
    assert other["choices"][0]["message"]["content"] != text


def test_tokenize_counts_image_tokens(server, vlm, expected):
    r = post(server, "/tokenize", {"model": vlm, "messages": image_message(png_url())})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == expected[0]


def test_openai_sdk_typed_parts(openai_client, vlm, expected):
    from openai.types.chat import (ChatCompletionContentPartImageParam,
                                   ChatCompletionContentPartTextParam,
                                   ChatCompletionUserMessageParam)

    content = [ChatCompletionContentPartImageParam(type="image_url",
                                                   image_url={"url": png_url(), "detail": "low"}),
               ChatCompletionContentPartTextParam(type="text", text=QUESTION)]
    answer = openai_client.chat.completions.create(
        model=vlm, messages=[ChatCompletionUserMessageParam(role="user", content=content)],
        temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == expected[1]
    assert answer.usage.prompt_tokens == len(expected[0])


def test_anthropic_image_blocks(server, vlm, expected):
    """Anthropic's Messages API with an image block (the official SDK): the
    same answer as transformers' generate, as the chat path gives."""
    import anthropic

    data = png_url().split(",", 1)[1]
    claude = anthropic.Anthropic(base_url=server.url, api_key="none")
    message = claude.messages.create(
        model=vlm, max_tokens=12, extra_body={"temperature": 0},
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": data}},
            {"type": "text", "text": QUESTION}]}])
    assert message.content[0].text == expected[1]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(expected[0])
    with pytest.raises(anthropic.BadRequestError, match="source"):
        claude.messages.create(model=vlm, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}])


def test_text_and_images_in_one_batch(server, vlm, expected):
    """A text-only request and image requests at once: all answered right."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(messages):
        return post(server, "/v1/chat/completions", {"model": vlm, "messages": messages,
                                                     "temperature": 0, "max_tokens": 12}).json()

    text_only = [{"role": "user", "content": QUESTION}]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [image_message(png_url()), text_only,
                                      image_message(png_url()), text_only]))
    assert answers[0]["choices"][0]["message"]["content"] == expected[1]
    assert answers[2]["choices"][0]["message"]["content"] == expected[1]
    assert answers[1]["choices"][0]["message"] == answers[3]["choices"][0]["message"]


# -- bad images: in-process apps with small limits ------------------------------------

@pytest.fixture(scope="module")
def local_models(llava, tiny_models):
    """The tiny VLM and the tiny Llama loaded once in this process's registry for
    this file's in-process apps (set up before any test's make_app, which then
    leaves them loaded), unloaded after the module."""
    from support import load_local

    from llmhost.models.registry import registry

    load_local(llava, "local-vlm", dtype="float32")
    load_local(tiny_models["llama"], "local-text")
    yield "local-vlm"
    registry.unload("local-vlm")
    registry.unload("local-text")


@pytest.fixture()
def vision_app(local_models, make_app):
    return make_app(MAX_IMAGE_PIXELS=64 * 64, MAX_IMAGES=2).test_client()


def chat(client, messages, model="local-vlm"):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages,
                                                     "max_tokens": 2})


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "not an image"),
    ("data:image/png;base64,@@@", "base64"),
    ("data:text/plain;base64,aGk=", "data URL"),
    ("ftp://example.com/cat.png", "data URL"),
    ("http://example.com/cat.png", "LLMHOST_IMAGE_URLS"),
])
def test_bad_image_names_the_part(vision_app, url, words):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "look"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    err = assert_error(chat(vision_app, messages), 400, "messages[1].content[1].image_url")
    assert words in err["message"], err


def test_image_limits(vision_app):
    err = assert_error(chat(vision_app, image_message(png_url(size=(100, 100)))), 400,
                       "messages[0].content[0].image_url")
    assert "LLMHOST_MAX_IMAGE_PIXELS" in err["message"]
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}}] * 3}]
    err = assert_error(chat(vision_app, three), 400, "messages[0].content[2].image_url")
    assert "LLMHOST_MAX_IMAGES" in err["message"]
    err = assert_error(chat(vision_app, image_message(png_url()), model="local-text"), 400,
                       "messages[0].content[0].image_url")
    assert "text only" in err["message"]
    bad_shape = [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]
    assert_error(chat(vision_app, bad_shape), 400)


def test_private_image_urls_refused(local_models, make_app):
    client = make_app(IMAGE_URLS=True).test_client()
    for url in ("http://127.0.0.1:9/cat.png", "http://localhost/cat.png", "http://[::1]/x.png",
                "http://169.254.169.254/latest/meta-data"):
        err = assert_error(chat(client, image_message(url)), 400, "messages[0].content[0].image_url")
        assert "private or local" in err["message"], err


def test_responses_input_image(server, vlm, expected):
    r = post(server, "/v1/responses", {
        "model": vlm, "temperature": 0, "max_output_tokens": 12, "store": False,
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": png_url()},
                                               {"type": "input_text", "text": QUESTION}]}]})
    assert r.status_code == 200, r.text
    body = validate(r.json(), "Response")
    assert body["output"][0]["content"][0]["text"] == expected[1]
    assert body["usage"]["input_tokens"] == len(expected[0])
    bad = post(server, "/v1/responses", {
        "model": vlm, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]})
    assert_error(bad, 400, "input[0].content[1].image_url")
