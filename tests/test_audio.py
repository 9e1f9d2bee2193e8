"""/v1/audio/transcriptions and /v1/audio/translations with a tiny random
Whisper built offline: the text equals transformers' own ASR pipeline on the
same audio (a tone made with numpy, encoded by PyAV), in every response
format, streamed or not, through the official OpenAI SDK too; long audio goes
window by window; bad input is a 4xx naming the field."""
import io
import json
import os

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from support import assert_error

RATE = 16_000
SCHEMAS = os.path.join(os.path.dirname(__file__), "data", "openai_audio_schemas.json")


def validate(body: dict, name: str) -> dict:
    """Against the official OpenAI schema `name` (the audio schemas, copied from
    OpenAI's openapi.json into tests/data)."""
    with open(SCHEMAS) as fh:
        resource = DRAFT202012.create_resource(json.load(fh))
    registry = Registry().with_resource("openai", resource)
    Draft202012Validator({"$ref": f"openai#/components/schemas/{name}"}, registry=registry).validate(body)
    return body


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def encode(samples: np.ndarray, fmt: str) -> bytes:
    """`samples` as a file: wav (16-bit PCM), flac, mp3, ogg and webm (opus)."""
    import av

    codec, rate = {"wav": ("pcm_s16le", RATE), "flac": ("flac", RATE), "mp3": ("libmp3lame", RATE),
                   "ogg": ("libopus", 48_000), "webm": ("libopus", 48_000)}[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None, :],
                                           format="s16", layout="mono")
        frame.sample_rate = RATE
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    from llmhost.dev.tinymodels import build_whisper
    root = tmp_path_factory.mktemp("whisper")
    return {"multi": build_whisper(str(root / "tiny-whisper")),
            "en": build_whisper(str(root / "tiny-whisper-en"), multilingual=False)}


@pytest.fixture(scope="module")
def pipe(whisper):
    from transformers import pipeline
    return pipeline("automatic-speech-recognition", model=whisper["multi"], device="cpu")


@pytest.fixture(scope="module")
def app(whisper):
    """An app that loaded both Whisper models (at most 70 s and 1 MiB of audio)."""
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.models.registry import registry

    app = create_app(TestConfig(MAX_AUDIO_SECONDS=70, MAX_AUDIO_BYTES=1024 * 1024,
                                MAX_BODY_BYTES=256 * 1024))
    client = app.test_client()
    for name, model_id in (("multi", "tiny-whisper"), ("en", "tiny-whisper-en")):
        response = client.post("/v1/models", json={"model": whisper[name], "id": model_id})
        assert response.status_code == 201, response.get_json()
        assert response.get_json()["task"] == "transcribe"
    yield app
    registry.unload("tiny-whisper")
    registry.unload("tiny-whisper-en")


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def post(client, data: bytes, path="/v1/audio/transcriptions", name="audio.wav", **form):
    form = {k: v for k, v in {"model": "tiny-whisper", **form}.items() if v is not None}
    if data is not None:
        form["file"] = (io.BytesIO(data), name)
    return client.post(path, data=form, content_type="multipart/form-data")


def decoded(data: bytes) -> np.ndarray:
    from llmhost.engine.speech import decode_audio
    return decode_audio(data, 3600)


def reference(pipe, audio: np.ndarray, **generate_kwargs) -> str:
    """The pipeline's text, greedy (the server decodes greedily at temperature 0;
    the pipeline's own default is 5 beams)."""
    return pipe(audio.copy(), generate_kwargs={"num_beams": 1, **generate_kwargs})["text"]


CLIP = tone(2.5)
WAV = encode(CLIP, "wav")


def test_json_equals_pipeline(client, pipe):
    response = post(client, WAV)
    assert response.status_code == 200, response.get_json()
    body = validate(response.get_json(), "CreateTranscriptionResponseJson")
    assert body["text"] and body["text"] == reference(pipe, decoded(WAV))
    # the server's decode of 16-bit PCM is the samples as float, to the last bit
    np.testing.assert_array_equal(decoded(WAV), (CLIP * 32767).astype(np.int16) / 32768)
    assert body["usage"] == {"type": "duration", "seconds": 3}


def test_every_format(client, pipe):
    text = reference(pipe, decoded(WAV))
    plain = post(client, WAV, response_format="text")
    assert plain.mimetype == "text/plain" and plain.get_data(as_text=True) == text + "\n"
    srt = post(client, WAV, response_format="srt").get_data(as_text=True)
    assert srt == f"1\n00:00:00,000 --> 00:00:02,500\n{text.strip()}\n\n"
    vtt = post(client, WAV, response_format="vtt").get_data(as_text=True)
    assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:02.500\n{text.strip()}\n\n"
    verbose = post(client, WAV, response_format="verbose_json", timestamp_granularities="segment",
                   language="fr").get_json()
    validate(verbose, "CreateTranscriptionResponseVerboseJson")
    assert verbose["language"] == "french" and verbose["duration"] == 2.5
    assert verbose["text"] == reference(pipe, decoded(WAV), language="fr")
    (segment,) = verbose["segments"]
    assert (segment["start"], segment["end"], segment["text"]) == (0.0, 2.5, verbose["text"])
    assert segment["avg_logprob"] <= 0 and segment["tokens"]


def test_long_audio_in_windows(client, pipe):
    audio = tone(65, 300.0)
    data = encode(audio, "flac")
    body = post(client, data, response_format="verbose_json", language="en").get_json()
    samples = decoded(data)
    windows = [samples[i:i + 30 * RATE] for i in range(0, len(samples), 30 * RATE)]
    assert [(s["start"], s["end"]) for s in body["segments"]] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    assert [s["text"] for s in body["segments"]] == [reference(pipe, w, language="en") for w in windows]
    assert body["text"] == "".join(s["text"] for s in body["segments"])


@pytest.mark.parametrize("fmt", ["mp3", "ogg", "webm", "flac"])
def test_encodings(client, pipe, fmt):
    data = encode(CLIP, fmt)
    response = post(client, data, name=f"audio.{fmt}")
    assert response.status_code == 200, response.get_json()
    assert abs(len(decoded(data)) / RATE - 2.5) < 0.1
    assert response.get_json()["text"] == reference(pipe, decoded(data))


def events(response) -> list[dict]:
    text = response.get_data(as_text=True)
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_stream(client, pipe):
    response = post(client, WAV, stream="true")
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    got = events(response)
    deltas = [e for e in got if e["type"] == "transcript.text.delta"]
    for event in deltas:
        validate(event, "TranscriptTextDeltaEvent")
    done = validate(got[-1], "TranscriptTextDoneEvent")
    assert len(deltas) > 1 and "".join(e["delta"] for e in deltas) == done["text"]
    assert done["text"] == reference(pipe, decoded(WAV))


def test_translation(client, pipe):
    response = post(client, WAV, path="/v1/audio/translations", response_format="verbose_json")
    assert response.status_code == 200, response.get_json()
    body = validate(response.get_json(), "CreateTranslationResponseVerboseJson")
    language = pipe.model.detect_language(pipe.feature_extractor(decoded(WAV), sampling_rate=RATE,
                                                                 return_tensors="pt").input_features)
    code = pipe.tokenizer.convert_ids_to_tokens(int(language[0])).strip("<|>")
    assert body["text"] == reference(pipe, decoded(WAV), task="translate", language=code)
    assert_error(post(client, WAV, path="/v1/audio/translations", model="tiny-whisper-en"), 400, "model")
    english = post(client, WAV, model="tiny-whisper-en", language="en")
    assert english.status_code == 200, english.get_json()


def test_prompt_and_temperature(client):
    assert post(client, WAV, prompt="hello world").status_code == 200
    sampled = post(client, WAV, temperature="0.8")
    assert sampled.status_code == 200 and isinstance(sampled.get_json()["text"], str)


def test_openai_sdk(app, pipe):
    import httpx
    import openai

    sdk = openai.OpenAI(base_url="http://llmhost/v1", api_key="unused", max_retries=0,
                        http_client=httpx.Client(transport=httpx.WSGITransport(app=app)))
    expected = reference(pipe, decoded(WAV))
    result = sdk.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", WAV))
    assert result.text == expected
    verbose = sdk.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", WAV),
                                              response_format="verbose_json",
                                              timestamp_granularities=["segment"])
    assert verbose.segments[0].text == expected and verbose.duration == 2.5
    text = sdk.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", WAV),
                                           response_format="text")
    assert text.strip() == expected.strip()
    stream = sdk.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", WAV), stream=True)
    streamed = list(stream)
    assert streamed[-1].type == "transcript.text.done" and streamed[-1].text == expected
    assert "".join(e.delta for e in streamed if e.type == "transcript.text.delta") == expected
    translated = sdk.audio.translations.create(model="tiny-whisper", file=("a.wav", WAV))
    assert isinstance(translated.text, str)


@pytest.mark.parametrize("form, param", [
    ({"model": None}, "model"),
    ({"response_format": "xml"}, "response_format"),
    ({"temperature": "2"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"stream": "true", "response_format": "srt"}, "stream"),
    ({"timestamp_granularities": "word", "response_format": "verbose_json"}, "timestamp_granularities"),
    ({"timestamp_granularities": "segment"}, "timestamp_granularities"),
    ({"language": "xx"}, "language"),
])
def test_bad_fields(client, form, param):
    assert_error(post(client, WAV, **form), 400, param)


def test_bad_files(client):
    assert_error(post(client, None), 400, "file")
    assert_error(post(client, b"this is not audio at all", name="a.wav"), 400, "file")
    assert_error(post(client, encode(np.zeros(8, np.float32), "wav")[:40]), 400, "file")
    assert_error(post(client, encode(tone(71), "mp3"), name="a.mp3"), 400, "file")       # > 70 s
    assert_error(post(client, encode(tone(40), "wav")), 413, "file")                     # > 1 MiB
    assert_error(post(client, WAV, model="nope"), 404, "model")
    assert_error(client.post("/v1/audio/transcriptions", json={"model": "tiny-whisper"}), 400, "model")
    big = b"x" * (3 * 1024 * 1024)   # over the audio limit plus its form room: 413 before parsing
    assert_error(post(client, big), 413)


def test_wrong_task(client):
    assert_error(client.post("/v1/embeddings", json={"model": "tiny-whisper", "input": "x"}), 400, "model")
