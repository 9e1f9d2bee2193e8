"""The tasks beyond generation and embeddings: rerank (cross-encoders) and
transcribe (Whisper-family speech recognition). How a folder is recognised as
one, and how it is loaded; loading.py calls in here."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.errors import InvalidInput
from .quantize import model_bytes

RERANK, TRANSCRIBE = "rerank", "transcribe"


def detect(folder: str, cfg: dict) -> str | None:
    """'rerank' for a sentence-transformers CrossEncoder folder or a sequence
    classifier with one label (how cross-encoders are published), 'transcribe'
    for Whisper-family models; None for the tasks loading.py knows itself."""
    try:
        with open(os.path.join(folder, "config_sentence_transformers.json")) as fh:
            if json.load(fh).get("model_type") == "CrossEncoder":
                return RERANK
    except (OSError, ValueError, AttributeError):
        pass
    archs = cfg.get("architectures") or []
    labels = cfg.get("id2label") or {}
    if any(a.endswith("ForSequenceClassification") for a in archs) and \
            (cfg.get("num_labels") or len(labels) or 2) == 1:
        return RERANK
    if cfg.get("model_type") == "whisper" or any(a.endswith("ForSpeechSeq2Seq") for a in archs):
        return TRANSCRIBE
    return None


@dataclass
class Speech:
    """A speech model's pipeline: the model and its processor (feature
    extractor + tokenizer). Not transformers' ASR pipeline: the speech worker
    runs generate itself, window by window (engine/speech.py)."""

    model: Any
    processor: Any

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def sentence_transformers(cls, what: str, folder: str, spec, device: str, device_map, dtype,
                          no_memory):
    """A SentenceTransformer or CrossEncoder (`cls`) loaded offline as the
    library loads it, in eval mode; failures are 400s saying it is not `what`."""
    kwargs = {} if dtype == "auto" else {"dtype": dtype}
    try:
        model = cls(folder, device="cuda" if device_map == "auto" else device,
                    local_files_only=True, trust_remote_code=spec.trust_remote_code,
                    model_kwargs=kwargs)
    except torch.OutOfMemoryError:
        raise no_memory(device, spec)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError) as exc:
        raise InvalidInput(f"Could not load '{spec.model}' as {what}: {exc}",
                           param="model", code="model_load_failed")
    return model.eval()


def load_cross_encoder(folder: str, spec, device: str, device_map, dtype, no_memory) -> dict:
    """A CrossEncoder, loaded by sentence-transformers as `CrossEncoder(folder)`
    is, so scores equal its `predict`."""
    from sentence_transformers import CrossEncoder

    ce = sentence_transformers(CrossEncoder, "a cross-encoder (reranker)", folder, spec, device,
                               device_map, dtype, no_memory)
    if ce.num_labels != 1 or ce.tokenizer is None:
        raise InvalidInput(f"'{spec.model}' has {ce.num_labels} labels; a reranker scores a pair with "
                           "one number (num_labels=1).", param="model", code="model_load_failed")
    max_len = ce.max_seq_length
    if not isinstance(max_len, int) or not 0 < max_len < 10**7:
        max_len = 512
    return {"pipeline": ce, "dtype": next(ce.parameters()).dtype,
            "parameters": sum(p.numel() for p in ce.parameters()),
            "memory_bytes": model_bytes(ce), "max_context": max_len}


def load_speech(folder: str, spec, device: str, device_map, dtype, no_memory) -> dict:
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True,
                                                  trust_remote_code=spec.trust_remote_code)
        model = AutoModelForSpeechSeq2Seq.from_pretrained(
            folder, dtype=dtype, device_map=device_map, local_files_only=True,
            trust_remote_code=spec.trust_remote_code)
    except torch.OutOfMemoryError:
        raise no_memory(device, spec)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as exc:
        raise InvalidInput(f"Could not load '{spec.model}' as a speech recognition model: {exc}",
                           param="model", code="model_load_failed")
    if model.config.model_type != "whisper" or not hasattr(processor, "feature_extractor"):
        raise InvalidInput(f"'{spec.model}' is a {model.config.model_type} model; llmhost transcribes "
                           "with Whisper-family models only.", param="model", code="model_load_failed")
    model.eval()
    return {"pipeline": Speech(model, processor), "dtype": model.dtype,
            "parameters": model_bytes(model, count=True), "memory_bytes": model_bytes(model),
            "max_context": model.config.max_target_positions}
