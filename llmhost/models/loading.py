"""Where a model comes from and how it becomes a ready pipeline.

A model already in the Hugging Face cache is resolved to its snapshot folder
first and loaded with ``local_files_only``: transformers otherwise asks the Hub
for optional files and, offline, retries for minutes. Only a model missing from
the cache goes to the Hub, after a short reachability check.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
# Imported once at start-up rather than inside the first load, so that the code
# (not the weights) is not counted as a model's memory, and loads start faster.
import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (GGUF support)
# Not transformers' `pipeline` (about 230 MiB more per worker): see TextGeneration.
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import gguf, lean, memory as memcheck, progress, tasks
from ..engine.errors import InvalidInput, NotFound, NotPermitted, Unavailable
from .quantize import Int4Linear, Q4Linear, auto_cpu_dtype, model_bytes, quantize_linear, quantize_model

log = logging.getLogger("llmhost")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IGNORE_WEIGHTS = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "onnx/*", "*.tflite", "flax_model*",
                  "tf_model*", "rust_model*", "openvino/*", "coreml/*"]


@dataclass
class LoadSpec:
    """What a client asked for in ``POST /v1/models``."""

    model: str
    id: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    task: str | None = None
    chat_template: str | None = None
    keep_alive: float | None = None
    quantization: str | None = None
    base: str | None = None        # a LoRA adapter's loaded base model (models/adapters.py)
    allow_control_tokens: bool = False   # generation/prompt.py: clients may write control tokens
    aliases: list[str] | None = None    # other names that reach it (never over a loaded id)

    @property
    def served_id(self) -> str:
        return self.id or self.model


@dataclass
class Source:
    folder: str
    gguf_file: str | None = None
    repo_id: str | None = None
    revision: str | None = None


@dataclass
class TextGeneration:
    """A generation model's pipeline: the model and its tokenizer, the two
    attributes of a transformers text-generation pipeline that llmhost reads.
    Not ``transformers.pipeline("text-generation")``: the scheduler runs the
    model itself, and importing transformers.pipelines adds about 230 MiB to
    every worker (measured here)."""

    model: Any
    tokenizer: Any
    processor: Any = None    # a vision-language model's (images and its chat template)


@dataclass
class Loaded:
    """A ready model: its pipeline (the one object that holds the model: a
    TextGeneration for generation, or the SentenceTransformer for embeddings)
    plus what the Model object reports."""

    task: str
    pipeline: Any
    device: str
    dtype: str
    parameters: int
    memory_bytes: int
    revision: str | None
    max_context: int
    gguf_file: str | None = None
    extra: dict = field(default_factory=dict)
    quantization: str | None = None

    @property
    def model(self):
        """The torch module the engine drives: the pipeline's model for generation;
        for embeddings the SentenceTransformer (its modules pool and normalise)."""
        return self.pipeline.model if self.task in ("generate", tasks.TRANSCRIBE) else self.pipeline

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def kernel(self) -> str:
        """What a decode step's matmuls run (benchmarks and tests report it):
        the quantization ("int4" is torch's int4 kernel, "int4-llmhost"
        llmhost's: quantize.Q4Linear) or the dtype."""
        if self.quantization == "int4" and any(isinstance(m, Q4Linear) for m in self.model.modules()):
            return "int4-llmhost"
        return self.quantization or str(self.dtype).replace("torch.", "")


# -- source ------------------------------------------------------------------

def _is_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "\\")) or os.path.exists(name)
            or not HUB_ID.match(name))


def _has_model(folder: str) -> bool:
    names = set(os.listdir(folder))
    return bool(names & {"config.json", "modules.json", "adapter_config.json"})


def _local_source(spec: LoadSpec, config) -> Source:
    path = os.path.abspath(os.path.expanduser(spec.model))
    check_model_dirs(path, config)
    if not os.path.exists(path):
        raise NotFound(f"No file or folder at '{spec.model}' on the server.", param="model",
                  code="model_not_found")
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise InvalidInput(f"'{spec.model}' is neither a model folder nor a GGUF file.", param="model")
    gguf = spec.gguf_file
    if gguf:   # the file opened must be inside LLMHOST_MODEL_DIRS too (symlinks followed)
        check_model_dirs(os.path.join(path, gguf), config)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise InvalidInput(f"'{spec.model}' is a file but not a GGUF file; give a model folder, "
                               "a .gguf file or a Hugging Face hub id.", param="model")
        return Source(folder=os.path.dirname(path), gguf_file=os.path.basename(path))
    if gguf:
        if not os.path.isfile(os.path.join(path, gguf)):
            raise NotFound(f"No GGUF file '{gguf}' in folder '{spec.model}'.",
                      param="gguf_file", code="model_not_found")
        return Source(folder=path, gguf_file=gguf)
    if not _has_model(path):
        ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        if len(ggufs) == 1:
            return Source(folder=path, gguf_file=ggufs[0])
        hint = f" It holds several GGUF files ({', '.join(ggufs)}): name one in 'gguf_file'." if ggufs else ""
        raise InvalidInput(f"The folder '{spec.model}' holds no model (no config.json).{hint}", param="model")
    return Source(folder=path)


def check_model_dirs(path: str, config) -> None:
    """With LLMHOST_MODEL_DIRS set, a local path must resolve inside one of them."""
    roots = config.MODEL_DIRS
    if not roots:
        return
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(os.path.expanduser(root))
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return
    raise NotPermitted(f"Local path '{path}' is outside the folders models may be loaded from "
                       "(LLMHOST_MODEL_DIRS).", param="model", code="path_not_allowed")


def cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _hub_source(spec: LoadSpec, config) -> Source:
    from huggingface_hub import constants
    folder = cached_snapshot(spec.model, spec.revision)
    if folder is None:
        folder = _download(spec, config)
    source = Source(folder=folder, repo_id=spec.model, revision=os.path.basename(folder))
    if spec.gguf_file:
        if not os.path.isfile(os.path.join(folder, spec.gguf_file)):
            raise NotFound(f"No GGUF file '{spec.gguf_file}' in '{spec.model}'.",
                      param="gguf_file", code="model_not_found")
        source.gguf_file = spec.gguf_file
    elif not _has_model(folder):
        raise InvalidInput(f"The cached repository '{spec.model}' at {constants.HF_HUB_CACHE} holds no "
                           "model (no config.json); name a GGUF file in 'gguf_file'.", param="model")
    return source


def _download(spec: LoadSpec, config) -> str:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub import errors as hub_errors
    where = f"'{spec.model}' is not in the local Hugging Face cache at {constants.HF_HUB_CACHE}"
    if not config.ALLOW_DOWNLOADS:
        raise NotPermitted(f"{where}, and downloads are disabled (LLMHOST_ALLOW_DOWNLOADS=0).",
                      param="model", code="downloads_disabled")
    if constants.HF_HUB_OFFLINE:
        raise NotFound(f"{where}, and the server is offline (HF_HUB_OFFLINE=1). Download it "
                       "where there is network, or load a local folder.",
                  param="model", code="model_not_found")
    try:  # fail in seconds when the Hub cannot be reached, instead of retrying
        HfApi().model_info(spec.model, revision=spec.revision, timeout=config.HUB_TIMEOUT)
    except hub_errors.GatedRepoError:
        raise NotPermitted(f"'{spec.model}' is gated on the Hugging Face Hub: accept its licence "
                           "and set HF_TOKEN on the server.", param="model")
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError):
        raise NotFound(f"{where}, and the Hub has no model '{spec.model}'"
                       f"{' at revision ' + spec.revision if spec.revision else ''}.",
                  param="model", code="model_not_found")
    except Exception as exc:  # network: DNS, refused, timeout, proxy
        log.warning("hub unreachable for %s: %s", spec.model, exc)
        raise NotFound(f"{where}, and the Hugging Face Hub cannot be reached ({type(exc).__name__}). "
                       "Load it where there is network first, or load a local folder.",
                  param="model", code="model_not_found")
    allow = [spec.gguf_file, "*.json", "*.txt", "*.model", "*.jinja"] if spec.gguf_file else None
    ignore = None if spec.gguf_file else IGNORE_WEIGHTS + ["*.gguf"]
    log.info("downloading %s from the Hub into %s", spec.model, constants.HF_HUB_CACHE)
    # The Hub's byte counts feed GET /v1/models and streamed loads.
    return snapshot_download(spec.model, revision=spec.revision, allow_patterns=allow,
                             ignore_patterns=ignore, etag_timeout=config.HUB_TIMEOUT,
                             tqdm_class=progress.hub_tqdm(progress.current()))


def resolve_source(spec: LoadSpec, config) -> Source:
    if _is_path(spec.model):
        return _local_source(spec, config)
    return _hub_source(spec, config)


# -- device and dtype -------------------------------------------------------

def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def choose_device(requested: str) -> tuple[str, Any]:
    """(device reported to clients, device_map for from_pretrained)."""
    devices = available_devices()
    if requested == "auto":
        if torch.cuda.is_available():
            if torch.cuda.device_count() > 1:
                return "cuda", "auto"
            return "cuda:0", "cuda:0"
        if "mps" in devices:
            return "mps", "mps"
        return "cpu", "cpu"
    if requested == "cuda" and "cuda" in devices:
        return "cuda:0", "cuda:0"
    if requested in devices:
        return requested, requested
    raise InvalidInput(f"Device '{requested}' is not available on this server; available devices: "
                       f"{', '.join(['auto'] + devices)}.", param="device", code="device_unavailable")


def choose_dtype(requested: str, device: str, task: str = "generate") -> Any:
    """`auto`: the checkpoint's dtype on CUDA; on CPU bfloat16 for generation
    where the CPU computes it natively (quantize.auto_cpu_dtype), else float32;
    float32 for embedding models on CPU and on MPS."""
    if requested == "auto":
        if device == "cpu" and task == "generate":
            return auto_cpu_dtype()
        return torch.float32 if device in ("cpu", "mps") else "auto"
    return DTYPES[requested]


def int8_compute_dtype(requested: str) -> torch.dtype:
    """int8 weights compute in float32: with bfloat16 activations SmolLM2 gave a
    degenerate answer on 1 of the 20 quality prompts (python -m llmhost.dev.bench
    quality), so that combination is not offered."""
    if requested not in ("auto", "float32"):
        raise InvalidInput(f"quantization 'int8' computes in float32; dtype '{requested}' with int8 "
                           "weights gave degenerate answers in our quality check. Leave dtype out "
                           "(or use 'float32'), or load without quantization.", param="dtype")
    return torch.float32


def int4_kernel(config) -> str:
    """The int4 kernel of this process's loads (quantize.KERNELS): llmhost's
    where it runs (q4kernel.available: AVX2, FMA, F16C and a C compiler), unless
    LLMHOST_INT4_KERNEL=torch; torch's otherwise."""
    from . import q4kernel

    return "llmhost" if config.INT4_KERNEL == "auto" and q4kernel.available()[0] else "torch"


def int4_compute_dtype(requested: str, task: str, gguf_file: str | None, kernel: str) -> torch.dtype:
    """int4 keeps a GGUF file's Q4_0 / Q4_1 weights. llmhost's kernel takes
    activations of any dtype (it quantizes them to 8 bits), so the rest of the
    model computes in the dtype asked for, `auto` choosing as for float loads
    (float32 on a CPU without native bfloat16, where bfloat16 is emulated).
    torch's kernel computes in bfloat16: with float32 activations it ran 5x
    slower (SmolLM2, batch 1: 126 against 24 ms a step)."""
    if task != "generate" or not gguf_file:
        raise InvalidInput("quantization 'int4' keeps a GGUF file's own 4-bit (Q4_0 / Q4_1) weights; "
                           "load a .gguf generation model with it, or use 'int8'.",
                           param="quantization")
    if kernel == "llmhost":
        if requested not in ("auto", "float32", "bfloat16"):
            raise InvalidInput(f"quantization 'int4' computes in float32 or bfloat16, not '{requested}'.",
                               param="dtype")
        return auto_cpu_dtype() if requested == "auto" else getattr(torch, requested)
    if requested not in ("auto", "bfloat16"):
        raise InvalidInput(f"quantization 'int4' computes in bfloat16 with torch's int4 kernel "
                           f"(LLMHOST_INT4_KERNEL=torch, or a CPU without AVX2); leave dtype out "
                           f"(or use 'bfloat16') instead of '{requested}'.", param="dtype")
    return torch.bfloat16


def check_quantization(quantization: str | None, device: str) -> None:
    if quantization and device != "cpu":
        raise InvalidInput(f"quantization '{quantization}' runs on the CPU only; load with "
                           "device 'cpu', or without quantization on a GPU (float16/bfloat16).",
                           param="quantization", code="device_unavailable")


# -- task ---------------------------------------------------------------------

GENERATE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def detect_task(source: Source) -> str:
    """'generate' for causal LMs, 'embed' for sentence-transformers folders and
    bare encoders, 'rerank' and 'transcribe' as tasks.detect says."""
    if source.gguf_file:
        return "generate"
    folder = source.folder
    try:
        with open(os.path.join(folder, "config.json")) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        cfg = None
    other = tasks.detect(folder, cfg if isinstance(cfg, dict) else {})
    if other:
        return other
    if os.path.exists(os.path.join(folder, "modules.json")):
        return "embed"
    if not isinstance(cfg, dict):
        return "generate"
    archs = cfg.get("architectures") or []
    if "vision_config" in cfg and any(a.endswith("ForConditionalGeneration") for a in archs):
        return "vision"
    if any(a.endswith(GENERATE_SUFFIXES) for a in archs):
        return "generate"
    if archs or cfg.get("model_type") in ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert",
                                          "electra", "deberta", "deberta-v2", "nomic_bert", "modernbert"):
        return "embed"
    return "generate"


def _architecture(source: Source) -> str | None:
    """The model's architecture as its config or GGUF file names it ("llama"),
    read without loading anything; None when unknown."""
    if source.gguf_file:
        return gguf.architecture(os.path.join(source.folder, source.gguf_file))
    try:
        with open(os.path.join(source.folder, "config.json")) as fh:
            model_type = json.load(fh).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


# -- loading ------------------------------------------------------------------

def _memory_bytes(model) -> int:
    return model_bytes(model)


def _max_context(model, tokenizer) -> int:
    cfg = getattr(model, "config", model)   # a model, or a (text) config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else 2048


def load(spec: LoadSpec, config, in_use: int = 0) -> Loaded:
    """Resolve, choose device and dtype, and build the pipeline. `in_use`: bytes
    the loaded models hold (counted against LLMHOST_MEMORY_LIMIT)."""
    lean.prepare()  # transformers' model code without torchao, scipy, triton (lean.py)
    if spec.trust_remote_code and not config.ALLOW_REMOTE_CODE:
        raise NotPermitted("'trust_remote_code' runs Python code from the model repository on "
                           "this server; an operator must allow it with LLMHOST_ALLOW_REMOTE_CODE=1.",
                      param="trust_remote_code", code="remote_code_not_allowed")
    device, device_map = choose_device(spec.device)
    check_quantization(spec.quantization, device)
    source = resolve_source(spec, config)
    if not os.path.isfile(os.path.join(source.folder, "config.json")) and os.path.isfile(
            os.path.join(source.folder, "adapter_config.json")) and not source.gguf_file:
        raise InvalidInput(f"'{spec.model}' is a PEFT adapter, not a model: load it onto a loaded "
                           "base model by naming that model in 'base'.", param="base")
    task = spec.task or detect_task(source)
    dtype = choose_dtype(spec.dtype, device, task)
    if spec.quantization == "int8":
        dtype = int8_compute_dtype(spec.dtype)
    if source.gguf_file:   # its header (a child process, 4 s for SmolLM2) meanwhile
        gguf.prefetch(os.path.join(source.folder, source.gguf_file))
    if device == "cpu" and task == "generate":   # and the kernels its steps will ask for
        from ..engine import attention, llamastep, native, omp
        from . import q4kernel

        # engine/llamastep.py's step (its attention and layers) runs Llama models only; any
        # int4 model runs q4kernel. An architecture not known yet (None) is built for. Every
        # step spreads its threads (engine/omp.c).
        llama = _architecture(source) in ("llama", None)
        builds = [omp._library] + ([attention._library] if llama else [])
        if spec.quantization == "int4" and config.INT4_KERNEL == "auto":
            builds += [q4kernel._build] + ([llamastep._library] if llama else [])
        native.prebuild(*builds)
    int4 = int4_kernel(config) if spec.quantization == "int4" else ""
    if int4:
        dtype = int4_compute_dtype(spec.dtype, task, source.gguf_file, int4)
    # a load that cannot fit is a 507, not an OOM-killed worker (int8 is estimated at its
    # float32 compute dtype: an upper bound, the weights are quantized layer by layer)
    memcheck.check(spec.model, source.folder, source.gguf_file, device, dtype, config, in_use)
    progress.step("loading", "tokenizer and weights")
    if task in (tasks.RERANK, tasks.TRANSCRIBE):
        return _load_other(task, source, spec, device, device_map, dtype)
    if task == "embed":
        loaded = _load_embedding(source, spec, device, device_map, dtype)
        if spec.quantization:
            quantize_model(loaded.model, spec.quantization)
            loaded.quantization = spec.quantization
            loaded.memory_bytes = _memory_bytes(loaded.model)
        return loaded
    if task == "vision":
        return _load_vision(source, spec, device, device_map, dtype)
    return _load_causal_lm(source, spec, device, device_map, dtype, int4)


def _no_memory(device: str, spec: LoadSpec) -> Unavailable:
    return Unavailable(f"Not enough memory on {device} to load '{spec.model}'. Unload a model "
                       "or pick a smaller dtype or another device.", param="model",
                  code="out_of_memory")


def _load_causal_lm(source: Source, spec: LoadSpec, device: str, device_map, dtype, int4: str) -> Loaded:
    kwargs: dict = {"local_files_only": True, "trust_remote_code": spec.trust_remote_code}
    try:
        if source.gguf_file:
            # the tokenizer as transformers reads it from the file, read by a child process
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.header(os.path.join(source.folder, source.gguf_file)).tokenizer_dir, **kwargs)
            kwargs["gguf_file"] = source.gguf_file
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        model = _stream_gguf(source, spec, dtype, device, int4)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype,
                                                         device_map=device_map, **kwargs)
            if spec.quantization == "int8":
                quantize_model(model, spec.quantization)
        if spec.quantization == "int4" and not any(isinstance(m, Int4Linear) for m in model.modules()):
            raise ValueError("quantization 'int4' keeps Q4_0 / Q4_1 weights as they are, and this "
                             "file has none that llmhost can keep (load it without quantization)")
    except torch.OutOfMemoryError:
        raise _no_memory(device, spec)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise InvalidInput(f"Could not load '{spec.model}' as a causal language model: {exc}",
                           param="model", code="model_load_failed")
    return _generation(model, tokenizer, source, spec, device)


def _generation(model, tokenizer, source: Source, spec: LoadSpec, device: str,
                processor=None) -> Loaded:
    """A loaded generation model: a causal LM, or a vision-language model
    with its processor."""
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(
        task="generate", pipeline=TextGeneration(model, tokenizer, processor), device=device,
        dtype=str(model.dtype).replace("torch.", ""),
        parameters=model_bytes(model, count=True),
        memory_bytes=_memory_bytes(model), revision=source.revision,
        max_context=_max_context(model.config.get_text_config(), tokenizer),
        gguf_file=source.gguf_file, quantization=spec.quantization,
        extra={"input_modalities": ["text", "image"]} if processor is not None else {},
    )


def _load_vision(source: Source, spec: LoadSpec, device: str, device_map, dtype) -> Loaded:
    """An image-text-to-text model with its processor (image processor,
    tokenizer and chat template), served as a generation model whose prompts
    may hold images (generation/prompt.py renders them through the processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if source.gguf_file or spec.quantization:
        raise InvalidInput("Vision-language models load from safetensors folders, without "
                           "quantization.", param="quantization" if spec.quantization else "model")
    kwargs: dict = {"local_files_only": True, "trust_remote_code": spec.trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(source.folder, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(source.folder, dtype=dtype,
                                                            device_map=device_map, **kwargs)
    except torch.OutOfMemoryError:
        raise _no_memory(device, spec)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise InvalidInput(f"Could not load '{spec.model}' as a vision-language model: {exc}",
                           param="model", code="model_load_failed")
    return _generation(model, processor.tokenizer, source, spec, device, processor)


def _stream_gguf(source: Source, spec: LoadSpec, dtype, device: str, int4: str):
    """A GGUF model loaded on the CPU is read one tensor at a time (gguf_stream),
    so that the whole model never exists in float32 next to the result; float32
    too (transformers' loader peaked 237 MiB above its end for SmolLM2, the
    stream about 30; same weights, compared equal). None where transformers'
    own path is used (other devices, architectures gguf_stream does not know).
    `int4`: the int4 kernel of an int4 load (int4_kernel), "" otherwise."""
    if not source.gguf_file or device != "cpu":
        return None
    return gguf.load_causal_lm(source.folder, source.gguf_file, dtype,
                                      quantize_linear if spec.quantization == "int8" else None,
                                      int4=int4)


def _load_embedding(source: Source, spec, device: str, device_map, dtype) -> Loaded:
    """Load with sentence-transformers, the field's own loader: a folder with
    modules.json gets its pooling and normalisation from there; a bare encoder
    gets sentence-transformers' default (mean pooling, or last-token pooling for
    a causal LM loaded with task=embed)."""
    from sentence_transformers import SentenceTransformer

    if source.gguf_file:
        raise InvalidInput("GGUF files hold generation models; embeddings need a sentence-transformers "
                           "folder or an encoder model.", param="model", code="model_load_failed")
    st = tasks.sentence_transformers(SentenceTransformer, "an embedding model", source.folder, spec,
                                     device, device_map, dtype, _no_memory)
    _check_text_model(st, spec.model)
    first = st[0]
    max_len = st.max_seq_length
    if not isinstance(max_len, int) or not 0 < max_len < 10**7:
        max_len = _max_context(first.auto_model, st.tokenizer)
    return Loaded(
        task="embed", pipeline=st, device=device,
        dtype=str(next(st.parameters()).dtype).replace("torch.", ""),
        parameters=sum(p.numel() for p in st.parameters()), memory_bytes=_memory_bytes(st),
        revision=source.revision, max_context=max_len,
        extra={"dimensions": st.get_embedding_dimension()},
    )


def _load_other(task: str, source: Source, spec: LoadSpec, device: str, device_map, dtype) -> Loaded:
    """A reranker or a speech model (models/tasks.py)."""
    if source.gguf_file or spec.quantization:
        what = "a GGUF file" if source.gguf_file else f"quantization '{spec.quantization}'"
        raise InvalidInput(f"Task '{task}' cannot load {what}; give a model folder or hub id without "
                           "it.", param="gguf_file" if source.gguf_file else "quantization")
    loader = tasks.load_cross_encoder if task == tasks.RERANK else tasks.load_speech
    got = loader(source.folder, spec, device, device_map, dtype, _no_memory)
    return Loaded(task=task, pipeline=got["pipeline"], device=device,
                  dtype=str(got["dtype"]).replace("torch.", ""), parameters=got["parameters"],
                  memory_bytes=got["memory_bytes"], revision=source.revision,
                  max_context=got["max_context"])


def _check_text_model(st, name: str) -> None:
    """The server builds the model's input itself (token ids, padding), which is
    only what sentence-transformers does for a plain text tokenizer; refuse the
    rest (chat-template, multimodal, flattened flash-attention inputs) rather
    than return vectors that differ from ``encode``."""
    from sentence_transformers.models import Transformer

    first = st[0]
    config = getattr(first, "modality_config", {"text": {}})
    if (not isinstance(first, Transformer) or first.tokenizer is None or "text" not in config
            or "message" in config or getattr(first, "can_flatten_inputs", False)):
        raise InvalidInput(f"'{name}' is not a text sentence-transformers model llmhost can serve "
                           "(its input is not plain tokenized text).", param="model",
                           code="model_load_failed")
