"""POST /v1/audio/transcriptions and /v1/audio/translations: the multipart
form (OpenAI's fields), the file, and the documented responses."""
from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from ..http.extensions import Schema

FORMATS = ["json", "text", "srt", "vtt", "verbose_json"]


class FormSchema(Schema):
    """A multipart form: every value arrives as a string, an array as repeated
    fields (OpenAI's SDKs send `timestamp_granularities[]`). Loads from a plain
    dict: arrays as lists, other fields as their last value, booleans from
    `true` / `false` only."""

    @ma.pre_load
    def _strict_booleans(self, data, **kwargs):   # replaces the JSON schemas' hook of this name
        out = {}
        for key in data:
            name = key[:-2] if key.endswith("[]") else key
            values = data.getlist(key) if hasattr(data, "getlist") else [data[key]]
            field = self.fields.get(name)
            if isinstance(field, fields.List):
                out.setdefault(name, []).extend(values)
                continue
            value = values[-1]
            if isinstance(field, fields.Boolean):
                if value not in ("true", "false"):
                    raise ma.ValidationError({name: ["Not a valid boolean: use true or false."]})
                value = value == "true"
            out[name] = value
        return out


class TranslationFormSchema(FormSchema):
    model = fields.String(required=True, validate=validate.Length(min=1), metadata={
        "description": "A loaded speech model (task `transcribe`: Whisper).", "example": "whisper"})
    prompt = fields.String(validate=validate.Length(max=4096), metadata={
        "description": "Text that comes before the audio (names, spelling, style), given to "
                       "Whisper as its previous-text prompt."})
    response_format = fields.String(load_default="json", validate=validate.OneOf(FORMATS), metadata={
        "description": "`json`, `text`, `srt`, `vtt` or `verbose_json` (with `segments`)."})
    temperature = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=1), metadata={
        "description": "0 (default): greedy decoding; above: sampling at that temperature."})


class TranscriptionFormSchema(TranslationFormSchema):
    language = fields.String(validate=validate.Length(min=2, max=8), metadata={
        "description": "ISO-639-1 code of the spoken language (default: detected from the first "
                       "30 seconds)."})
    timestamp_granularities = fields.List(fields.String(validate=validate.OneOf(["segment", "word"])),
                                          metadata={"description": "`segment` (with `verbose_json`). "
                                                    "`word` is not supported."})
    stream = fields.Boolean(load_default=False, metadata={
        "description": "`true`: server-sent `transcript.text.delta` events as text comes, then "
                       "`transcript.text.done` (with `json` and `text` formats)."})


class AudioFileSchema(Schema):
    file = fields.Raw(required=True, metadata={
        "type": "string", "format": "binary",
        "description": "The audio: wav, mp3, flac, ogg, webm, m4a and what else FFmpeg reads, at "
                       "most LLMHOST_MAX_AUDIO_BYTES bytes and LLMHOST_MAX_AUDIO_SECONDS long."})


class TranscriptionRequestSchema(TranscriptionFormSchema, AudioFileSchema):
    """The whole form, for the OpenAPI document (flask-smorest documents one
    `arguments` per route; the form and the file are parsed separately)."""


class TranslationRequestSchema(TranslationFormSchema, AudioFileSchema):
    """As TranscriptionRequestSchema."""


# -- responses (documentation; the bodies are built in llmhost/api/audio.py) ---

class DurationUsageSchema(Schema):
    type = fields.String(required=True, metadata={"enum": ["duration"]})
    seconds = fields.Integer(required=True, metadata={"description": "Seconds of audio, rounded up."})


class SegmentSchema(Schema):
    id = fields.Integer(required=True)
    seek = fields.Integer(required=True)
    start = fields.Float(required=True)
    end = fields.Float(required=True)
    text = fields.String(required=True)
    tokens = fields.List(fields.Integer(), required=True)
    temperature = fields.Float(required=True)
    avg_logprob = fields.Float(required=True)
    compression_ratio = fields.Float(required=True)
    no_speech_prob = fields.Float(required=True, metadata={"description": "Not computed: 0."})


class TranscriptionSchema(Schema):
    text = fields.String(required=True)
    usage = fields.Nested(DurationUsageSchema)
    task = fields.String(metadata={"description": "`verbose_json` only, as the fields below."})
    language = fields.String()
    duration = fields.Float()
    segments = fields.List(fields.Nested(SegmentSchema), metadata={
        "description": "One per 30-second window of the audio."})
