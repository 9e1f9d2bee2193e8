"""Embeddings: sentence-transformers models behind one batching thread per model.

Vectors come out of the model's own sentence-transformers modules (its pooling,
normalisation, dense layers), so they equal ``SentenceTransformer.encode``. The
server takes over only two things: tokenisation, done on the request thread so
that over-long inputs are refused (or truncated) and counted before anything is
queued, and batching, so that the inputs of many concurrent requests share
forward passes. The batching (BatchScheduler) serves rerankers too
(engine/rerank.py): any model whose requests are lists of inputs scored
independently in padded forward passes.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import EngineError, InvalidInput, failure
from .queueing import ModelWorker

log = logging.getLogger("llmhost.engine")


@dataclass
class Embeddings:
    """One request's result: a float32 row per input, in input order."""

    vectors: np.ndarray
    prompt_tokens: int


@dataclass(eq=False)  # a job is itself, never equal to another with the same inputs
class _Job:
    seqs: list                            # the inputs, as _forward takes them
    order: list[int]                      # input indices, longest first (less padding)
    submitted: float = field(default_factory=time.monotonic)
    scheduled: int = 0                    # items of `order` handed to a forward pass
    vectors: np.ndarray | None = None
    error: EngineError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def fail(self, err: EngineError) -> None:
        if not self.done.is_set():
            self.error = err
            self.done.set()


class BatchScheduler(ModelWorker):
    """One thread per model. Each step it runs one forward pass (``_forward``,
    a row of results per input) of up to LLMHOST_EMBED_BATCH inputs, taken from
    every admitted request (each gets a fair share first, so a small request
    never waits for a large one to end)."""

    doing = "embedding"   # what a failure says the model was doing
    hint = "fewer or shorter inputs (or a smaller LLMHOST_EMBED_BATCH)"

    def __init__(self, model_id: str, loaded, config, kind: str) -> None:
        super().__init__(model_id, config, kind)
        self.st = loaded.pipeline
        self.tokenizer = loaded.tokenizer
        self.max_len: int = loaded.max_context
        self.device = self.st.device
        self.batch_size = max(1, int(config.EMBED_BATCH))
        self._running: list[_Job] = []

    @staticmethod
    def _length(item) -> int:
        return len(item)

    def _forward(self, items: list) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _submit(self, seqs: list) -> _Job:
        job = _Job(seqs, sorted(range(len(seqs)), key=lambda i: -self._length(seqs[i])))
        self._enqueue(job)
        return job

    def _wait(self, job: _Job) -> np.ndarray:
        if not job.done.wait(self.queue_timeout):
            with self._cond:
                if job in self._waiting:
                    self._waiting.remove(job)
                    job.fail(self._timeout_error())
            job.done.wait()  # admitted: its forward passes are under way
        if job.error is not None:
            raise job.error
        return job.vectors

    def stats(self) -> dict:
        return {"queued": len(self._waiting), "running": len(self._running)}

    # -- scheduler thread -----------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._waiting and not self._running:
                        self._idle_wait()
                    if self._closing:
                        break
                    # Up to one request per batch slot runs at once; the rest wait
                    # in the bounded queue.
                    while self._waiting and len(self._running) < self.batch_size:
                        self._running.append(self._waiting.popleft())
                    batch = self._take_batch()
                self._step(batch)
        finally:
            err = self._closed_error()
            with self._cond:
                jobs = list(self._waiting) + self._running
                self._waiting.clear()
                self._running.clear()
            for job in jobs:
                job.fail(err)
            self.st = None

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """(job, input index) pairs for the next forward pass: a fair share of the
        batch for every running request, then what is left in arrival order."""
        batch: list[tuple[_Job, int]] = []
        share = max(1, self.batch_size // len(self._running))
        for limit in (share, self.batch_size):
            for job in self._running:
                take = min(limit, len(job.order) - job.scheduled, self.batch_size - len(batch))
                batch += [(job, i) for i in job.order[job.scheduled:job.scheduled + take]]
                job.scheduled += take
        return batch

    def _step(self, batch: list[tuple[_Job, int]]) -> None:
        try:
            vectors = self._forward([job.seqs[i] for job, i in batch])
        except Exception as exc:  # a bug or OOM must not hang the waiting threads
            log.exception("%s failed on %s", self.doing, self.model_id)
            jobs = {job for job, _ in batch}
            err = failure(exc, self.model_id, self.doing, self.hint)
            for job in jobs:
                job.fail(err)
            with self._cond:
                self._running = [job for job in self._running if job not in jobs]
            return
        for (job, i), vector in zip(batch, vectors):
            if job.vectors is None:
                job.vectors = np.empty((len(job.seqs),) + vectors.shape[1:], dtype=np.float32)
            job.vectors[i] = vector
        with self._cond:
            finished = [job for job in self._running if job.scheduled == len(job.order)]
            self._running = [job for job in self._running if job.scheduled < len(job.order)]
        for job in finished:
            job.done.set()

    def _padded(self, seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of `seqs` padded to the longest, on the model's device."""
        width = max(map(len, seqs))
        pad = [[pad_id] * (width - len(seq)) for seq in seqs]
        rows = [p + s for p, s in zip(pad, seqs)] if left else [s + p for s, p in zip(seqs, pad)]
        masks = [[0] * len(p) + [1] * len(s) if left else [1] * len(s) + [0] * len(p)
                 for s, p in zip(seqs, pad)]
        return (torch.tensor(rows, dtype=torch.long, device=self.device),
                torch.tensor(masks, dtype=torch.long, device=self.device))


class EmbedScheduler(BatchScheduler):
    """The embedding model's thread: vectors as ``SentenceTransformer.encode``."""

    def __init__(self, model_id: str, loaded, config) -> None:
        super().__init__(model_id, loaded, config, "embed")
        self.dimensions: int = loaded.extra["dimensions"]
        self.max_inputs = max(1, int(config.MAX_EMBED_INPUTS))

        tok = self.tokenizer
        # An id past the embedding matrix would fail the whole shared batch: refuse it up front.
        self.vocab_size = min(len(tok), self.st[0].auto_model.get_input_embeddings().num_embeddings)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.left_pad = tok.padding_side == "left"
        self.token_types = "token_type_ids" in tok.model_input_names
        # The model's default prompt, which encode() puts before every text.
        self.prompt = self.st.prompts.get(self.st.default_prompt_name) if self.st.default_prompt_name else None
        self.prompt_ids = tok(self.prompt, add_special_tokens=False)["input_ids"] if self.prompt else []
        self.prompt_length = self.st[0]._get_prompt_length(self.prompt) if self.prompt else None
        self.prefix, self.suffix = self._special_tokens()

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts around a text ([CLS] ... [SEP], <s> ... </s>),
        to wrap token-id inputs the same way."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start], full[start + len(plain):]
        return [], []

    # -- request threads ------------------------------------------------------
    def embed(self, inputs: list[str] | list[list[int]], truncate: bool = False,
              dimensions: int | None = None) -> Embeddings:
        """Vectors for `inputs` (texts, or token-id lists without special tokens)."""
        if len(inputs) > self.max_inputs:
            raise InvalidInput(f"'input' has {len(inputs)} items; at most {self.max_inputs} are allowed "
                          "per request (LLMHOST_MAX_EMBED_INPUTS).", param="input")
        if dimensions is not None and dimensions > self.dimensions:
            raise InvalidInput(f"'dimensions' is {dimensions}, but '{self.model_id}' makes vectors of "
                          f"{self.dimensions} dimensions.", param="dimensions")
        seqs = self._tokenize(inputs) if isinstance(inputs[0], str) else self._wrap_ids(inputs)
        seqs = self._fit(seqs, truncate)
        vectors = self._wait(self._submit(seqs))
        if dimensions is not None and dimensions < self.dimensions:
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return Embeddings(np.ascontiguousarray(vectors, dtype=np.float32), sum(map(len, seqs)))

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # Always the same settings: a fast tokenizer shared by request threads
        # fails ("Already borrowed") when one call changes its truncation while
        # another encodes, so truncation is done on the ids in _fit.
        if self.prompt:
            texts = [self.prompt + text for text in texts]
        return self.tokenizer(texts, add_special_tokens=True, return_attention_mask=False,
                              return_token_type_ids=False, verbose=False)["input_ids"]

    def _wrap_ids(self, id_lists: list[list[int]]) -> list[list[int]]:
        for i, ids in enumerate(id_lists):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidInput(f"'input[{i}]' holds token id {bad}, outside the vocabulary of "
                              f"'{self.model_id}' (0 to {self.vocab_size - 1}).", param="input")
        return [self.prefix + self.prompt_ids + ids + self.suffix for ids in id_lists]

    def _fit(self, seqs: list[list[int]], truncate: bool) -> list[list[int]]:
        """Refuse inputs longer than the model's maximum, or with `truncate` cut
        them as encode() does: the end of the text goes (the start, for a tokenizer
        that truncates on the left), the special tokens stay."""
        too_long = [i for i, seq in enumerate(seqs) if len(seq) > self.max_len]
        if not too_long:
            return seqs
        if not truncate:
            i = too_long[0]
            raise InvalidInput(f"'input[{i}]' is {len(seqs[i])} tokens, more than the {self.max_len} "
                          f"'{self.model_id}' reads ({len(too_long)} input(s) too long). Shorten it, "
                          "or send \"truncate\": true to cut inputs at the model's maximum length.",
                          param="input", code="context_length_exceeded")
        room = self.max_len - len(self.prefix) - len(self.suffix)
        for i in too_long:
            body = seqs[i][len(self.prefix):len(seqs[i]) - len(self.suffix)]
            body = body[-room:] if self.tokenizer.truncation_side == "left" else body[:room]
            seqs[i] = self.prefix + body + self.suffix
        return seqs

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]]) -> np.ndarray:
        """Pad to the longest input and run the model's sentence-transformers
        modules on the features encode() would have built."""
        input_ids, mask = self._padded(seqs, self.pad_id, self.left_pad)
        features = {"input_ids": input_ids, "modality": "text", "attention_mask": mask}
        if self.token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        if self.prompt_length is not None:
            features["prompt_length"] = self.prompt_length
        out = self.st(features)["sentence_embedding"]
        return out.float().cpu().numpy()
