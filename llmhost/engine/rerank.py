"""Rerankers: sentence-transformers CrossEncoder models behind the embedding
models' batching thread (embed.BatchScheduler).

A pair is tokenized on the request thread exactly as ``CrossEncoder.predict``
tokenizes it (the tokenizer's pair encoding, truncated ``longest_first`` to
the model's maximum length: the longer text loses tokens first), so that it is
counted and limited before anything is queued; the forward pass runs the
model's own modules and activation, so scores equal ``predict``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .embed import BatchScheduler
from .errors import InvalidInput


@dataclass
class Scores:
    """One request's result: a score per pair, in pair order."""

    scores: np.ndarray
    prompt_tokens: int


class RerankScheduler(BatchScheduler):
    doing = "reranking"
    hint = "fewer or shorter documents (or a smaller LLMHOST_EMBED_BATCH)"

    def __init__(self, model_id: str, loaded, config) -> None:
        super().__init__(model_id, loaded, config, "rerank")
        self.max_pairs = max(1, int(config.MAX_RERANK_DOCUMENTS))
        self.max_tokens = max(1, int(config.MAX_RERANK_TOKENS))
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.left_pad = tok.padding_side == "left"
        self.token_types = "token_type_ids" in tok.model_input_names
        self.activation = self.st.activation_fn
        # One tokenizer call at a time: a fast tokenizer fails ("Already borrowed")
        # when threads encode with truncation at once.
        self._tok_lock = threading.Lock()

    @staticmethod
    def _length(item) -> int:
        return len(item[0])

    # -- request threads ------------------------------------------------------
    def score(self, pairs: list[tuple[str, str]], param: str) -> Scores:
        """Scores of (first, second) text pairs; `param` is the request field the
        limits name."""
        if len(pairs) > self.max_pairs:
            raise InvalidInput(f"'{param}' makes {len(pairs)} pairs to score; at most "
                               f"{self.max_pairs} are allowed per request "
                               "(LLMHOST_MAX_RERANK_DOCUMENTS).", param=param,
                               code="too_many_documents")
        with self._tok_lock:
            enc = self.tokenizer([a for a, _ in pairs], [b for _, b in pairs],
                                 truncation="longest_first", max_length=self.max_len,
                                 return_attention_mask=False,
                                 return_token_type_ids=self.token_types, verbose=False)
        types = enc["token_type_ids"] if self.token_types else [None] * len(pairs)
        items = list(zip(enc["input_ids"], types))
        tokens = sum(len(ids) for ids, _ in items)
        if tokens > self.max_tokens:
            raise InvalidInput(f"'{param}' makes {tokens} tokens of pairs to score (each pair cut "
                               f"to {self.max_len} tokens); at most {self.max_tokens} are allowed "
                               "per request (LLMHOST_MAX_RERANK_TOKENS). Send fewer or shorter "
                               "documents.", param=param, code="context_length_exceeded")
        return Scores(self._wait(self._submit(items)), tokens)

    # -- scheduler thread -----------------------------------------------------
    @torch.inference_mode()
    def _forward(self, items: list) -> np.ndarray:
        """The features ``CrossEncoder.preprocess`` builds, through the model's
        modules, then its activation (``predict``'s steps)."""
        input_ids, mask = self._padded([ids for ids, _ in items], self.pad_id, self.left_pad)
        features = {"input_ids": input_ids, "attention_mask": mask, "modality": "text"}
        if self.token_types:
            features["token_type_ids"] = self._padded([t for _, t in items], 0, self.left_pad)[0]
        scores = self.st(features)["scores"].float()
        if self.activation is not None:
            scores = self.activation(scores)
        return scores.reshape(len(items), -1)[:, 0].cpu().numpy()
