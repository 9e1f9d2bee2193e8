"""Load a GGUF causal LM one tensor at a time.

transformers' own GGUF path (``from_pretrained(gguf_file=...)``) dequantizes
every tensor of the file to float32 into one state dict and only then builds
the model from it: for a moment the whole model exists twice in float32, and a
model meant to end up in int8 or bfloat16 peaks at several times its final
size. Here the model is built with empty (meta) parameters and each GGUF
tensor is dequantized, converted to the target dtype and, for a Linear layer
that is to be quantized, quantized as soon as that layer has all its
parameters; only one float32 tensor exists at any time.

The GGUF reading (file memory-mapped by ``gguf.GGUFReader``), the GGUF -> HF
name map and the per-architecture tensor fix-ups (Llama's q/k permutation, ...)
are transformers' own functions, so the weights equal those of
``from_pretrained``; the equality is tested in float32.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

# Architectures whose tensor processor maps one GGUF tensor to one HF tensor.
STREAMABLE = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "starcoder2", "stablelm"}


def load_causal_lm(folder: str, gguf_file: str, dtype: torch.dtype,
                   quantize_module: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
    """The model of `folder/gguf_file` in `dtype`, Linear layers passed through
    `quantize_module` (it returns the replacement module) as they complete;
    None for an architecture not in STREAMABLE (the MoE processors split and
    merge tensors across calls): transformers' own path loads those."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint)

    path = os.path.join(folder, gguf_file)
    parsed = load_gguf_checkpoint(path, return_tensors=False)  # metadata only
    # what AutoConfig.from_pretrained(gguf_file=...) does, without parsing the file again
    config_dict = parsed["config"]
    if config_dict.get("model_type") not in STREAMABLE:
        return None
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    with init_empty_weights(include_buffers=False):  # buffers (rotary) are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    architecture = parsed.get("config", {}).get("model_type", config.model_type)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    key_map = get_gguf_hf_weights_map(model, processor)
    missing = {name for name, _ in model.named_parameters()}
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}

    reader = GGUFReader(path)
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=key_map,
                                   parsed_parameters=parsed)
        if result.name not in key_map:
            continue
        hf_name = key_map[result.name]
        # a copy: float32 GGUF tensors come back as views of the read-only memory map
        value = torch.from_numpy(np.array(result.weights, copy=True)).to(dtype)
        del weights, result
        module_name, _, attr = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"GGUF tensor {tensor.name} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(old.shape)} for {hf_name}")
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
        missing.discard(hf_name)
        if quantize_module is not None and module_name in linears and \
                not any(p.is_meta for p in module.parameters()) and not _tied(model, module):
            _replace(model, module_name, quantize_module(module))
    model.tie_weights()
    missing = {n for n, p in model.named_parameters() if p.is_meta}
    if missing:
        raise ValueError(f"the GGUF file has no tensor for {sorted(missing)[:5]}")
    return model


def _tied(model, module) -> bool:
    """The output head shares the input embedding: it stays as it is."""
    out = model.get_output_embeddings()
    return out is module


def _replace(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
