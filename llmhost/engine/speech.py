"""Speech to text: Whisper-family models behind one thread per model.

Audio is decoded on the request thread (``decode_audio``: PyAV, whose wheel
bundles FFmpeg's libraries, so wav, mp3, flac, ogg/opus and webm decode with no
system FFmpeg and no network), then cut into 30-second windows, Whisper's
input length. The model's thread transcribes one request at a time, window by
window, each as transformers' ASR pipeline transcribes a clip of up to 30 s
(the feature extractor with its attention mask, then ``generate``), so the
text of a clip equals the pipeline's. Requests wait in the bounded queue
(LLMHOST_MAX_QUEUE); this thread is the speech model's own and never holds up
a generation model's scheduler.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .errors import EngineError, InvalidInput, failure
from .queueing import ModelWorker

log = logging.getLogger("llmhost.engine")

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30


def decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    """Mono float32 samples at 16 kHz. Anything PyAV cannot read as audio is an
    InvalidInput on `file`; audio longer than `max_seconds` is refused while
    decoding, so a long file costs no more than the limit."""
    import av

    limit = int(max_seconds * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidInput("'file' holds no audio stream.", param="file", code="invalid_audio")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            frames = container.decode(container.streams.audio[0])
            for frame in [*frames, None]:   # None flushes the resampler
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    total += len(samples)
                    if total > limit:
                        raise InvalidInput(f"'file' is longer than {max_seconds:g} seconds, the most "
                                           "this server transcribes (LLMHOST_MAX_AUDIO_SECONDS).",
                                           param="file", code="audio_too_long")
                    parts.append(samples)
    except av.FFmpegError as exc:
        raise InvalidInput(f"'file' is not audio llmhost can decode ({type(exc).__name__}). Send "
                           "wav, mp3, flac, ogg, webm or another common audio format.",
                           param="file", code="invalid_audio")
    if not total:
        raise InvalidInput("'file' holds no audio samples.", param="file", code="invalid_audio")
    return np.concatenate(parts).astype(np.float32, copy=False)


@dataclass
class SpeechOptions:
    task: str = "transcribe"            # or "translate" (into English)
    language: str | None = None         # ISO code; None: detected by generate, window by window
    report_language: bool = False       # say which language (detected on the first window)
    prompt: str | None = None
    temperature: float = 0.0


@dataclass
class Segment:
    """One 30-second window's text."""

    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float

    def to_openai(self, temperature: float) -> dict:
        raw = self.text.encode("utf-8")
        return {"id": self.id, "seek": int(self.start * 100), "start": self.start, "end": self.end,
                "text": self.text, "tokens": self.tokens, "temperature": temperature,
                "avg_logprob": self.avg_logprob,
                "compression_ratio": len(raw) / len(zlib.compress(raw)) if raw else 0.0,
                "no_speech_prob": 0.0}


@dataclass(eq=False)
class _Job:
    windows: list[np.ndarray]
    options: SpeechOptions
    events: queue.Queue = field(default_factory=queue.Queue)
    admitted: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    def fail(self, err: EngineError) -> None:
        self.admitted.set()
        self.events.put(("error", err))


class _Deltas:
    """A transformers streamer: the text each new token adds, as it comes."""

    def __init__(self, tokenizer, job: _Job) -> None:
        self.tokenizer, self.job = tokenizer, job
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:            # the first call holds the decoder prompt
            self.prompt_seen = True
            return
        self.ids += [int(t) for t in value.reshape(-1)]
        self._send(final=False)

    def end(self) -> None:
        self._send(final=True)

    def _send(self, final: bool) -> None:
        """The new text; held back while it ends in half a character (a byte-level
        token that needs the next), except at the end."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent) and text.startswith(self.sent) and \
                (final or not text.endswith("\ufffd")):
            self.job.events.put(("delta", text[len(self.sent):]))
            self.sent = text


class _Cancelled:
    """A stopping criterion: stop generating once the client is gone or the
    model is being unloaded."""

    def __init__(self, job: _Job, worker: "SpeechWorker") -> None:
        self.job, self.worker = job, worker

    def __call__(self, input_ids, scores, **kwargs):
        stop = self.job.cancelled or bool(self.worker._closing)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class SpeechWorker(ModelWorker):
    def __init__(self, model_id: str, loaded, config) -> None:
        super().__init__(model_id, config, "speech")
        self.model = loaded.pipeline.model
        self.processor = loaded.pipeline.processor
        self.tokenizer = loaded.pipeline.tokenizer
        self.max_seconds = float(config.MAX_AUDIO_SECONDS)
        gen = self.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False))
        self.languages = {token.strip("<|>"): token for token in (getattr(gen, "lang_to_id", None) or {})}
        self.can_translate = self.multilingual and "translate" in (getattr(gen, "task_to_id", None) or {})
        self._busy = 0

    # -- request threads ------------------------------------------------------
    def check(self, options: SpeechOptions) -> None:
        """Refuse what this model cannot do, before any audio is decoded."""
        if options.task == "translate" and not self.can_translate:
            raise InvalidInput(f"'{self.model_id}' cannot translate (an English-only or "
                               "transcription-only model); use /v1/audio/transcriptions.",
                               param="model", code="translation_unsupported")
        lang = options.language
        if lang is not None and lang not in self.languages and not (lang == "en" and not self.multilingual):
            known = ", ".join(sorted(self.languages)) or "en"
            raise InvalidInput(f"'language' is '{lang}', which '{self.model_id}' does not know "
                               f"(ISO-639-1 codes it knows: {known}).", param="language")

    def transcribe(self, audio: np.ndarray, options: SpeechOptions) -> Iterator[tuple[str, object]]:
        """Events of one transcription: ("language", code) once, ("delta", text)
        per token, ("segment", Segment) per window, then ("done", None). Closing
        the iterator (a client gone) stops the work at the next token."""
        self.check(options)
        step = WINDOW_SECONDS * SAMPLE_RATE
        job = _Job([audio[i:i + step] for i in range(0, len(audio), step)], options)
        self._enqueue(job)
        if not job.admitted.wait(self.queue_timeout):
            with self._cond:
                if job in self._waiting:
                    self._waiting.remove(job)
                    job.fail(self._timeout_error())
        try:
            while True:
                kind, value = job.events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    return
                yield kind, value
        finally:
            job.cancelled = True

    def stats(self) -> dict:
        return {"queued": len(self._waiting), "running": self._busy}

    # -- the model's thread -------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._waiting:
                        self._idle_wait()
                    if self._closing:
                        break
                    job = self._waiting.popleft()
                job.admitted.set()
                self._busy = 1
                try:
                    self._transcribe(job)
                    job.events.put(("error", self._closed_error()) if self._closing else ("done", None))
                except Exception as exc:   # a bug or OOM must reach the request, not hang it
                    log.exception("transcription failed on %s", self.model_id)
                    job.fail(failure(exc, self.model_id, "transcribing",
                                     "a shorter file, or fewer requests at once"))
                finally:
                    self._busy = 0
        finally:
            err = self._closed_error()
            with self._cond:
                jobs = list(self._waiting)
                self._waiting.clear()
            for job in jobs:
                job.fail(err)
            self.model = None

    def _features(self, window: np.ndarray) -> dict:
        """As the ASR pipeline prepares a clip of up to 30 s."""
        features = self.processor.feature_extractor(window, sampling_rate=SAMPLE_RATE,
                                                    return_tensors="pt", return_attention_mask=True)
        return {"input_features": features.input_features.to(self.model.device, self.model.dtype),
                "attention_mask": features.attention_mask.to(self.model.device)}

    @torch.inference_mode()
    def _transcribe(self, job: _Job) -> None:
        options = job.options
        language = options.language
        if language is None and self.multilingual and options.report_language:
            detected = self.model.detect_language(self._features(job.windows[0])["input_features"])
            language = self.tokenizer.convert_ids_to_tokens(int(detected.reshape(-1)[0])).strip("<|>")
        job.events.put(("language", language or "en"))
        # Greedy (one beam) at temperature 0, as OpenAI's whisper.transcribe(); the
        # ASR pipeline's default of 5 beams costs 5x the compute on a CPU.
        kwargs: dict = {"return_dict_in_generate": True, "output_scores": True, "num_beams": 1}
        if self.multilingual and options.language:
            kwargs["language"] = options.language
        if options.task == "translate":
            kwargs["task"] = "translate"
        if options.prompt:
            kwargs["prompt_ids"] = torch.tensor(self.processor.get_prompt_ids(options.prompt),
                                                device=self.model.device)
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature)
        else:
            kwargs["do_sample"] = False
        for number, window in enumerate(job.windows):
            if job.cancelled or self._closing:
                return
            out = self.model.generate(**self._features(window), **kwargs,
                                      streamer=_Deltas(self.tokenizer, job),
                                      stopping_criteria=[_Cancelled(job, self)])
            steps = len(out.scores)
            ids = out.sequences[0, -steps:] if steps else out.sequences[0, :0]
            logprobs = [torch.log_softmax(score[0].float(), -1)[int(t)].item()
                        for score, t in zip(out.scores, ids)]
            logprobs = [lp for lp in logprobs if lp > float("-inf")]
            special = set(self.tokenizer.all_special_ids)
            start = number * WINDOW_SECONDS
            job.events.put(("segment", Segment(
                id=number, start=float(start), end=round(start + len(window) / SAMPLE_RATE, 3),
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                tokens=[int(t) for t in ids if int(t) not in special],
                avg_logprob=float(np.mean(logprobs)) if logprobs else 0.0)))
