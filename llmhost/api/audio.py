"""Speech to text: POST /v1/audio/transcriptions and /v1/audio/translations
(OpenAI's multipart requests), with Whisper-family models."""
from __future__ import annotations

import math
from contextlib import ExitStack

from flask import Response, jsonify

from ..config import settings
from ..engine.speech import SpeechOptions, decode_audio
from ..http import sse
from ..http.errors import APIError, invalid, not_supported
from ..http.extensions import Blueprint
from ..http.observability import log_fields
from ..schemas.audio import (AudioFileSchema, TranscriptionFormSchema, TranscriptionRequestSchema,
                             TranscriptionSchema, TranslationFormSchema, TranslationRequestSchema)
from .access import use_model

blp = Blueprint("audio", __name__, url_prefix="/v1/audio",
                description="Speech to text with Whisper-family models.")

TEXT_FORMATS = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _form(schema) -> dict:
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


@blp.route("/transcriptions", methods=["POST"])
@blp.arguments(TranscriptionFormSchema, location="form")
@blp.arguments(AudioFileSchema, location="files")
@blp.response(200, TranscriptionSchema)
@blp.doc(responses={200: {"content": {**_TEXT, "text/event-stream": {"schema": {"type": "string"}}}}},
         requestBody=_form(TranscriptionRequestSchema))
@blp.errors(400, 404, 413, 429, 503)
def create_transcription(form, files):
    """Transcribe audio

    The text of the audio in its language, as OpenAI's endpoint; long audio is
    transcribed in 30-second windows.
    """
    granularities = form.get("timestamp_granularities") or []
    if "word" in granularities:
        raise not_supported("timestamp_granularities", " with value 'word' (segments only)")
    if granularities and form["response_format"] != "verbose_json":
        raise invalid("'timestamp_granularities' needs \"response_format\": \"verbose_json\".",
                      param="timestamp_granularities")
    if form["stream"] and form["response_format"] not in ("json", "text"):
        raise invalid("'stream' works with the json and text formats only.", param="stream")
    return _serve(form, files["file"], "transcribe")


@blp.route("/translations", methods=["POST"])
@blp.arguments(TranslationFormSchema, location="form")
@blp.arguments(AudioFileSchema, location="files")
@blp.response(200, TranscriptionSchema)
@blp.doc(responses={200: {"content": _TEXT}}, requestBody=_form(TranslationRequestSchema))
@blp.errors(400, 404, 413, 429, 503)
def create_translation(form, files):
    """Translate audio into English

    With multilingual Whisper models, whose `translate` task writes English text.
    """
    return _serve({**form, "stream": False}, files["file"], "translate")


def _serve(form: dict, upload, task: str):
    config = settings()
    data = upload.read(config.MAX_AUDIO_BYTES + 1)
    if len(data) > config.MAX_AUDIO_BYTES:
        raise APIError(413, f"'file' is larger than {config.MAX_AUDIO_BYTES} bytes, the most this "
                            "server takes (LLMHOST_MAX_AUDIO_BYTES).", param="file",
                       code="file_too_large")
    options = SpeechOptions(task=task, language=form.get("language"), prompt=form.get("prompt"),
                            temperature=form["temperature"],
                            report_language=form["response_format"] == "verbose_json")
    stack = ExitStack()
    try:
        entry = stack.enter_context(use_model(form["model"], task="transcribe"))
        entry.engine.check(options)   # before the audio is decoded
        audio = decode_audio(data, config.MAX_AUDIO_SECONDS)
        seconds = len(audio) / 16_000
        events = entry.engine.transcribe(audio, options)
        stack.callback(events.close)
        _, language = next(events)   # admitted: queue errors are still statuses
    except BaseException:
        stack.close()
        raise
    log_fields().update(model=entry.id, audio_seconds=round(seconds, 3))
    usage = {"type": "duration", "seconds": math.ceil(seconds)}
    if form["stream"]:
        return sse.stream(_stream(events, stack))
    with stack:
        segments = [value for kind, value in events if kind == "segment"]
    text = "".join(s.text for s in segments)
    fmt = form["response_format"]
    if fmt in TEXT_FORMATS:
        body = {"text": text + "\n", "srt": _srt, "vtt": _vtt}[fmt]
        return Response(body if isinstance(body, str) else body(segments), mimetype=TEXT_FORMATS[fmt])
    if fmt == "json":
        return jsonify({"text": text, "usage": usage})
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    return jsonify({"task": task, "language": LANGUAGES.get(language, language),
                    "duration": round(seconds, 3), "text": text,
                    "segments": [s.to_openai(form["temperature"]) for s in segments], "usage": usage})


def _stream(events, stack: ExitStack):
    """OpenAI's transcription events (its done event has no duration usage)."""
    with stack:
        text = ""
        for kind, value in events:
            if kind == "delta":
                text += value
                yield {"type": "transcript.text.delta", "delta": value}
        yield {"type": "transcript.text.done", "text": text}


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _srt(segments) -> str:
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(segments, 1))


def _vtt(segments) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in segments)
