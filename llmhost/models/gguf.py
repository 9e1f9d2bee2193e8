"""Load a GGUF causal LM one tensor at a time.

transformers' own GGUF path (``from_pretrained(gguf_file=...)``) dequantizes
every tensor of the file to float32 into one state dict and only then builds
the model from it: for a moment the whole model exists twice in float32, and a
model meant to end up in int8 or bfloat16 peaks at several times its final
size. Here the model is built with empty (meta) parameters and each GGUF
tensor is dequantized, converted to the target dtype and, for a Linear layer
that is to be quantized, quantized as soon as that layer has all its
parameters; only one float32 tensor exists at any time, and its memory goes
back to the OS before the next (glibc would keep it): the load peaks a few tens
of MiB above where it ends (docs/performance.md), in float32 too.

The reading is gguf's (the tensor list from ``gguf.GGUFReader``, in a child
process: ``header`` below; each tensor memory-mapped on its own,
``gguf.dequantize``); the GGUF -> HF name map and the per-architecture tensor
fix-ups (Llama's q/k permutation, ...) are transformers' own functions, so the
weights equal those of
``from_pretrained`` (state dicts compared equal in float32 and bfloat16 for
SmolLM2; tests/test_fast.py checks that greedy answers through the server equal
transformers' in-process ones for bfloat16 and int8).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import progress
from .reclaim import trim

# Architectures whose tensor processor maps one GGUF tensor to one HF tensor.
STREAMABLE = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "starcoder2", "stablelm"}


def load_causal_lm(folder: str, gguf_file: str, dtype: torch.dtype,
                   quantize_module: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                   int4: str = ""):
    """The model of `folder/gguf_file` in `dtype`, Linear layers passed through
    `quantize_module` (it returns the replacement module) as they complete, or
    with `int4` (a kernel of quantize.KERNELS) their Q4_0 / Q4_1 weights kept
    4-bit (quantize.Int4Linear);
    None for an architecture not in STREAMABLE (the MoE processors split and
    merge tensors across calls): transformers' own path loads those."""
    from accelerate import init_empty_weights
    from gguf import GGMLQuantizationType, dequantize
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    path = os.path.join(folder, gguf_file)
    # what AutoConfig.from_pretrained(gguf_file=...) does, without parsing the file again
    config_dict = json.loads(header(path).config_json)
    if config_dict.get("model_type") not in STREAMABLE:
        return None
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    parsed = {"config": config_dict}
    # buffers (rotary) are computed for real; every parameter comes from the file, so
    # torch's initializers are skipped (on the meta device they run torch's Python
    # reference ops, whose first call imports torch._dynamo: about 30 MiB, models/lean.py)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config_dict)
    _memoize_name_maps()
    key_map = get_gguf_hf_weights_map(model, processor)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}

    tied = False
    for info in progress.counted(tensor_infos(path), "Converting and de-quantizing GGUF tensors"):
        gguf_name, qtype = info[0], GGMLQuantizationType(info[1])
        # one memory map per tensor: its file pages leave the RSS with it (a map of the
        # whole file would hold every page read, ~94 MiB for SmolLM2, until the end)
        data = np.memmap(path, dtype=np.dtype(info[3]), mode="r", offset=info[2], shape=tuple(info[4]))
        if int4 and qtype.name in ("Q4_0", "Q4_1") and \
                _keep_int4(model, data, qtype.name, gguf_name, processor, key_map, parsed, dtype, linears,
                           int4):
            del data
            continue
        if int4 == "llmhost" and qtype.name == "Q8_0" and \
                _keep_q8_embedding(model, data, gguf_name, processor, key_map, parsed, dtype):
            del data
            tied = True   # the head reads the embedding's blocks: nothing left to tie
            continue
        name, value = _tensor(dequantize, gguf_name, qtype, data, processor, key_map, parsed, dtype)
        del data
        if name in key_map:
            _place(model, key_map[name], value, gguf_name, linears, quantize_module)
        del value
        # glibc keeps the freed float32 copies (a few MiB each, above its dynamic mmap
        # threshold once one was freed) in its heap: without this the RSS grew by each
        # Linear's float32 size and the int8 load peaked ~400 MiB above where it ended
        trim()
    if not tied:
        model.tie_weights()
    missing = {n for n, p in model.named_parameters() if p.is_meta}
    if missing:
        raise ValueError(f"the GGUF file has no tensor for {sorted(missing)[:5]}")
    if int4 == "llmhost":
        from .quantize import group_q4
        group_q4(model)   # q/k/v and gate/up: one kernel call each (quantize.Q4Group)
    trim()
    return model


def _place(model, hf_name: str, value: torch.Tensor, gguf_name: str, linears, quantize_module) -> None:
    """Put one converted tensor into the model; quantize its Linear layer once
    the layer has all its parameters (the float copy is then dropped)."""
    module_name, _, attr = hf_name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"GGUF tensor {gguf_name} has shape {tuple(value.shape)}, "
                         f"the model expects {tuple(old.shape)} for {hf_name}")
    setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    if quantize_module is not None and module_name in linears and \
            not any(p.is_meta for p in module.parameters()) and not _tied(model, module):
        _replace(model, module_name, quantize_module(module))


def _row_order(data, gguf_name: str, processor, key_map, parsed) -> tuple[str, np.ndarray | None]:
    """(the HF name of a GGUF tensor kept in its blocks, the output-row order the
    architecture wants: int64 [rows], or None when its processor reshapes the
    tensor). The processor is run on the row numbers, so that its renaming and
    row permutation (Llama's q/k) come out without dequantizing the tensor."""
    rows = np.arange(data.shape[0], dtype=np.float32).reshape(-1, 1)
    result = processor.process(weights=rows, name=gguf_name, tensor_key_mapping=key_map,
                               parsed_parameters=parsed)
    order = np.asarray(result.weights)
    return key_map.get(result.name, ""), \
        order[:, 0].astype(np.int64) if order.shape == rows.shape else None


def _keep_int4(model, data, kind: str, gguf_name: str, processor, key_map, parsed, dtype,
               linears, kernel: str) -> bool:
    """Put a Q4_0 / Q4_1 Linear weight into the model as a quantize.Int4Linear;
    False (dequantize it as usual) for anything else."""
    from .quantize import int4_from_gguf

    hf_name, order = _row_order(data, gguf_name, processor, key_map, parsed)
    module_name, _, attr = hf_name.rpartition(".")
    module = linears.get(module_name)
    if attr != "weight" or module is None or _tied(model, module) or order is None:
        return False
    new = int4_from_gguf(kind, data, order, dtype, kernel)
    if module.bias is not None:
        new.bias = module.bias       # meta until its own tensor arrives (_place sets it)
    _replace(model, module_name, new)
    linears[module_name] = new
    return True


def _keep_q8_embedding(model, data, gguf_name: str, processor, key_map, parsed, dtype) -> bool:
    """Keep a Q8_0 token embedding tied to the output head as the file stores
    it (quantize.Q8Embedding), the head reading the same blocks with
    llmhost's kernel (quantize.Q8Head): SmolLM2's head was a fifth of a decode
    step in float32 and its embedding 113 MiB. False for anything else."""
    from .quantize import Q8Head, q8_embedding

    embedding = model.get_input_embeddings()
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False) or \
            not isinstance(embedding, torch.nn.Embedding):
        return False
    hf_name, order = _row_order(data, gguf_name, processor, key_map, parsed)
    names = {name for name, module in model.named_modules() if module is embedding}
    if hf_name.rpartition(".")[0] not in names or order is None or \
            not np.array_equal(order, np.arange(data.shape[0])) or \
            (data.shape[0], data.shape[1] // 34 * 32) != tuple(embedding.weight.shape):
        return False
    new = q8_embedding(data, dtype)
    model.set_input_embeddings(new)
    model.set_output_embeddings(Q8Head(new))
    return True


def _tensor(dequantize, gguf_name, qtype, data, processor, key_map, parsed, dtype, rows: int = 4096):
    """(mapped GGUF name, torch tensor in `dtype`) of one GGUF tensor. A large
    tensor the architecture's processor leaves as it is (the embedding, the
    output head) is dequantized a few thousand rows at a time straight into
    `dtype`: gguf's dequantize on a whole tensor makes temporaries several
    times its float32 size."""
    kwargs = {"tensor_key_mapping": key_map, "parsed_parameters": parsed}
    if data.ndim >= 2 and data.shape[0] > rows:
        first = dequantize(data[:rows], qtype)
        result = processor.process(weights=first, name=gguf_name, **kwargs)
        if result.weights is first:
            out = torch.empty((data.shape[0],) + first.shape[1:], dtype=dtype)
            out[:rows] = torch.from_numpy(first)
            for start in range(rows, data.shape[0], rows):
                out[start:start + rows] = torch.from_numpy(
                    dequantize(data[start:start + rows], qtype))
            return result.name, out
    result = processor.process(weights=dequantize(data, qtype), name=gguf_name, **kwargs)
    # a copy: float32 GGUF tensors come back as views of the read-only memory map
    return result.name, torch.from_numpy(np.array(result.weights, copy=True)).to(dtype)


# -- the file's metadata, read by a child process -------------------------------------
# Reading a GGUF's metadata makes hundreds of thousands of small Python objects (gguf's
# reader: numpy views of every field; the tokenizer's 49k-token vocabulary and merges for
# SmolLM2). Freed, they leave Python's memory arenas half used: a worker that read the
# file itself (the tensor list, the config and the tokenizer: three parses, 2-3 s each)
# held 458 MiB after an int4 SmolLM2 load, against 439 when a child read it. The child
# opens it with gguf's reader once (6 s for SmolLM2 in all) and hands over what the
# load keeps: the tensor list and transformers' config as JSON on its stdout, the
# tokenizer as transformers' own save_pretrained files in a temporary folder, which the
# worker loads without parsing the GGUF (0.3 s). A parser that fails or crashes on a
# file takes the child down, not the worker. Cached per file (path, size, mtime): in the
# process (loading the same file again, another dtype, another id, runs no child) and on
# disk, in the cache folder gguf (config.cache_dir), so that the next process (a restart,
# another replica on the machine) runs none either; without a cache the folder is a
# temporary one, which goes with its entry (at most 8) or when the worker exits.

def architecture(path: str) -> str | None:
    """The file's ``general.architecture`` ("llama", "qwen2", ...) from its first
    metadata entries, where llama.cpp's writers put it, without the child (a
    load's start wants it before the header is read); None when it is not
    among the first few string entries, or the file is no GGUF."""
    import struct

    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF" or struct.unpack("<I", fh.read(4))[0] < 2:
                return None
            fh.read(16)   # the tensor and metadata counts
            for _ in range(4):
                (size,) = struct.unpack("<Q", fh.read(8))
                key = fh.read(min(size, 256)).decode()
                (kind,) = struct.unpack("<I", fh.read(4))
                if size > 256 or kind != 8:   # gguf's type 8: a string
                    return None
                (size,) = struct.unpack("<Q", fh.read(8))
                value = fh.read(min(size, 256)).decode()
                if key == "general.architecture":
                    return value if size <= 256 else None
    except (OSError, struct.error, UnicodeDecodeError):
        pass
    return None


def _file_key(path: str) -> tuple:
    """(real path, size, mtime): what the cache below is keyed on."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Header:
    """What a load keeps of a GGUF file's metadata."""
    config_json: str     # transformers' config dict (each load gets its own copy)
    tensors: tuple       # (name, GGML type, byte offset, numpy dtype, shape, elements) per tensor
    tokenizer_dir: str   # the tokenizer's files: in the cache, or a temporary folder


_reading = threading.Lock()   # one child at a time: a load waits for its prefetch, not runs another


def prefetch(path: str) -> None:
    """Start the child now, in a thread (a load's other work, the int4 kernel's
    build, runs meanwhile); header() waits for it."""
    def read() -> None:
        try:
            header(path)
        except (OSError, ValueError):   # the load's own header() call reports it
            pass
    threading.Thread(target=read, name="llmhost-gguf-header", daemon=True).start()


def header(path: str) -> Header:
    with _reading:
        got = _header(_file_key(path))
    if isinstance(got, str):   # what the child could not read (kept: a failed load runs one child)
        raise ValueError(f"reading the GGUF file failed: {got}")
    return got


def tensor_infos(path: str) -> tuple:
    """(name, GGML type, byte offset, numpy dtype, shape, elements) of each tensor in the file."""
    return header(path).tensors


KEPT = 32   # files' headers kept in the cache, the least recently used removed first


@functools.lru_cache(maxsize=8)
def _header(key: tuple) -> Header | str:
    from ..engine.native import cache_folder, prune

    folder = cache_folder("gguf")
    # a folder per file, named by its key; header.json, written last, says it is whole
    kept = os.path.join(folder, hashlib.sha256(repr(key).encode()).hexdigest()[:24]) if folder else ""
    got = _kept_header(kept) if kept else None
    if got:
        return got
    files = tempfile.mkdtemp(prefix="llmhost-gguf-", dir=folder or None)
    # the child imports llmhost from where this worker did, whatever its sys.path was
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", __name__, key[0], files],
                          capture_output=True, text=True, env=env)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):   # it died: its last words
        out = {"error": proc.stderr.strip()[-500:] or f"exit status {proc.returncode}"}
    if "error" in out:   # not kept: a file that fails is read again, and fails again
        shutil.rmtree(files, ignore_errors=True)
        return out["error"]
    if kept:
        try:
            with open(os.path.join(files, "header.json"), "w") as fh:
                json.dump(out, fh)
            for _ in range(2):
                try:
                    os.replace(files, kept)   # where nothing is, or an empty folder
                    prune(folder, KEPT)
                    return _from(out, kept)
                except OSError:
                    got = _kept_header(kept)
                    if got:   # another process kept the same file's meanwhile
                        shutil.rmtree(files, ignore_errors=True)
                        return got
                    shutil.rmtree(kept, ignore_errors=True)   # a damaged entry
        except OSError:   # a full disk
            pass
    # not kept: the tokenizer's folder goes with the header (its entry above, or at exit)
    header = _from(out, files)
    weakref.finalize(header, shutil.rmtree, files, True)
    return header


def _from(out: dict, folder: str) -> Header:
    """The Header of the child's result `out`, its tokenizer's files in `folder`."""
    return Header(json.dumps(out["config"]), tuple(tuple(t) for t in out["tensors"]), folder)


def _kept_header(kept: str) -> Header | None:
    """The header kept in the cache folder `kept`, or None (not there, or damaged)."""
    try:
        with open(os.path.join(kept, "header.json")) as fh:
            out = json.load(fh)
        os.utime(kept)   # recently used
        return _from(out, kept)
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _ArrayReader:
    """Makes gguf's reader slice its file as a plain numpy array: it reads each
    of the metadata's values (SmolLM2: 250k, most of them its vocabulary) as a
    slice of its ``numpy.memmap``, whose bookkeeping per slice (``__getitem__``,
    ``__array_finalize__``) was 2.4 of the child's 7 s (cProfile); a plain array
    view of the same map reads the same bytes without it."""

    @property
    def data(self):
        return self._array

    @data.setter
    def data(self, value) -> None:
        self._array = value.view(np.ndarray)


def _read_in_child(path: str, out_dir: str) -> dict:
    """The child's work: one gguf reader for the tensor list, transformers' config
    and the config lookup of its tokenizer loading (transformers' GGUF functions
    open the file with gguf's reader again each time; here they get this one
    back, and the second parse of its metadata, the tokenizer's, gets the first's
    result). The tokenizer's vocabulary goes through transformers' own, faster
    reader."""
    import copy

    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoTokenizer

    class Reader(_ArrayReader, gguf.GGUFReader):
        pass

    reader = Reader(path)
    opened = gguf.GGUFReader
    gguf.GGUFReader = lambda p, *a, **k: reader if p == path else opened(p, *a, **k)
    gguf_utils.load_gguf_checkpoint = functools.lru_cache(maxsize=1)(gguf_utils.load_gguf_checkpoint)
    tensors = [[t.name, int(t.tensor_type), int(t.data_offset), t.data.dtype.str,
                list(t.data.shape), int(t.n_elements)] for t in reader.tensors]
    # a copy: the tokenizer's loading gets (and may change) the same parse
    config = copy.deepcopy(gguf_utils.load_gguf_checkpoint(path, return_tensors=False)["config"])
    folder, name = os.path.split(path)
    AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True).save_pretrained(out_dir)
    return {"config": config, "tensors": tensors}


@functools.lru_cache(maxsize=1)
def _memoize_name_maps() -> None:
    """transformers' get_gguf_hf_weights_map builds gguf's TensorNameMap again
    for every submodule it recurses into (397 times for SmolLM2: 6 s of a 25 s
    load, against 0.02 s with this). The map is a function of (architecture,
    block count) alone and is only read, so gguf's constructor function, which
    transformers imports at each call, is memoized once per process."""
    import gguf

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(gguf.get_tensor_name_map)


def _tied(model, module) -> bool:
    """The output head shares the input embedding: it stays as it is."""
    out = model.get_output_embeddings()
    return out is module


def _replace(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


if __name__ == "__main__":   # the child of _header: python -m llmhost.models.gguf FILE OUT_DIR
    try:
        result = _read_in_child(sys.argv[1], sys.argv[2])
    except Exception as exc:   # noqa: BLE001  (reported to the worker, which raises it)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
