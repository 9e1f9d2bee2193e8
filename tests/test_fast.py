"""bfloat16 and int8 on CPU: the server's greedy answers equal in-process
transformers running the same model (README's recipe), the Model object says
what was chosen, a GGUF load peaks near its final size."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import requests
import torch

from genutil import post
from support import ROOT, assert_error, validate

from llmhost.engine.kvcache import growing_cache
from llmhost.engine.llamastep import LlamaStep
from llmhost.models.quantize import auto_cpu_dtype, cpu_has_native_bf16

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


def recipe(gguf: str, dtype: torch.dtype, quantization: str | None, reference, request):
    """README's in-process recipe: transformers' own GGUF loader, then torchao;
    for int4, llmhost's GGUF reader (the int4 layers are llmhost's: the session's
    smollm2_int4) and transformers' generate. `reference` is transformers' loader's
    model already loaded (smollm2_reference, float32): a copy with its parameters
    cast to `dtype` is what loading again with `dtype=` gives (the GGUF's weights
    are dequantized to float32, then cast)."""
    if quantization == "int4":
        return request.getfixturevalue("smollm2_int4").model
    if reference.dtype == torch.float32:
        # parameters only: the rotary buffers stay float32, as from_pretrained(dtype=) keeps them
        # (state dicts and buffers compared equal to a bfloat16 from_pretrained)
        model = copy.deepcopy(reference).eval()
        for param in model.parameters():
            param.data = param.data.to(dtype)
        model.config.dtype = dtype
    else:  # a CPU with native bfloat16: the reference is bfloat16, load again
        from transformers import AutoModelForCausalLM

        folder, name = os.path.split(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
    if quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    return model


@torch.inference_mode()
def _greedy_steps(step, model, ids: list[int], count: int, banned: int) -> list[int]:
    """`count` greedy tokens (`banned` never) by the engine's Llama step: the prompt
    in one forward, then one decode step a token."""
    cache = growing_cache(model.config)
    logits = step(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                  torch.arange(len(ids)).unsqueeze(0), cache)
    out: list[int] = []
    while len(out) < count:
        scores = logits[0, -1].float()
        scores[banned] = float("-inf")
        out.append(int(scores.argmax()))
        length = len(ids) + len(out)
        logits = step(torch.tensor([[out[-1]]]), torch.ones(1, length, dtype=torch.long),
                      torch.tensor([[length - 1]]), cache, True)
    return out


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"quantization": "int8"},
                                     {"quantization": "int4"}], ids=["bfloat16", "int8", "int4"])
def test_greedy_through_the_server_equals_in_process(server, smollm2_gguf, smollm2_reference, options,
                                                    request):
    tok, reference = smollm2_reference
    served = "smollm2-" + "-".join(str(v) for v in options.values())
    body = server.load(smollm2_gguf, id=served, **options)
    validate(body, "Model")
    from llmhost.models import q4kernel

    # int4 computes in float32 with llmhost's kernel on a CPU without native bfloat16
    int4 = "float32" if q4kernel.available()[0] and not cpu_has_native_bf16() else "bfloat16"
    want_dtype = {"int8": "float32", "int4": int4}.get(options.get("quantization"), options.get("dtype"))
    assert body["dtype"] == want_dtype and body["quantization"] == options.get("quantization")
    model = recipe(smollm2_gguf, getattr(torch, want_dtype), options.get("quantization"), reference, request)
    # The engine runs llmhost's attention in decode steps (and, where the rows are computed
    # alone, in every forward: engine/attention.py), which rounds otherwise than
    # transformers': in-process means the engine's Llama step there. Where only the decode
    # steps' attention differs, transformers' generate must agree with it up to a near
    # tie (bfloat16 logits one rounding apart: on an AMX CPU "that" and "steeped" tie to
    # the bit in the first prompt's 12th token). The int4 step's layers (llamastep.c)
    # round in float32 where transformers rounds each op to bfloat16: not compared.
    step = LlamaStep.for_model(model)
    step = step if step is not None and step.own_attention else None
    try:
        for text in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                     pad_token_id=tok.eos_token_id, output_scores=True,
                                     return_dict_in_generate=True)
            expected = generated = out.sequences[0, len(ids):].tolist()
            if step is not None:
                expected = _greedy_steps(step, model, ids, 12, tok.eos_token_id)
                differ = next((i for i, (a, b) in enumerate(zip(expected, generated)) if a != b), None)
                if differ is not None and not step.rows_alone:
                    top = out.scores[differ][0].float().topk(2).values
                    assert top[0] - top[1] <= 0.125, (text, differ, expected, generated)
            r = post(server, "/v1/completions", {"model": served, "prompt": ids, "max_tokens": 12,
                                                 "temperature": 0, "logprobs": 0,
                                                 "logit_bias": {str(tok.eos_token_id): -100}})
            assert r.status_code == 200, r.text
            got = r.json()["choices"][0]["text"]
            assert got == tok.decode(expected, skip_special_tokens=True), (text, options)
    finally:
        requests.delete(server.url + f"/v1/models/{served}", timeout=60)


def test_quantization_is_validated_and_cpu_only(client, tiny_models, smollm2_gguf):
    assert_error(client.post("/v1/models", json={"model": "x", "quantization": "int3"}), 400,
                 "quantization")
    # int4 keeps a GGUF's own 4-bit weights: not for other models; it computes in float32 or
    # bfloat16 (torch's kernel: bfloat16 only)
    assert_error(client.post("/v1/models", json={"model": tiny_models["gpt2"], "quantization": "int4"}),
                 400, "quantization")
    assert_error(client.post("/v1/models", json={"model": smollm2_gguf, "quantization": "int4",
                                                 "dtype": "float16"}), 400, "dtype")
    # int8 with bfloat16 activations failed the quality check: refused, naming dtype
    assert_error(client.post("/v1/models", json={"model": tiny_models["gpt2"], "quantization": "int8",
                                                 "dtype": "bfloat16"}), 400, "dtype")
    if torch.cuda.is_available():
        assert_error(client.post("/v1/models", json={"model": "x", "device": "cuda",
                                                     "quantization": "int8"}), 400, "quantization")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_torch_int4_layer_computes_the_dequantized_gguf_weights(kind):
    """quantize.TorchInt4Linear (torch's kernel) on a Q4_0 / Q4_1 tensor
    (gguf-py's own quantizer) equals a float32 matmul with gguf's dequantized
    weights, rows reordered as asked, on both of its paths: the int4 kernel (a
    decode step's few rows) and the weights dequantized for a prefill's many
    rows; and the two paths agree on the same rows."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quantize

    from llmhost.models.quantize import int4_from_gguf

    rng = np.random.default_rng(0)
    qtype = GGMLQuantizationType[kind]
    blocks = quantize(rng.standard_normal((192, 96)).astype(np.float32), qtype)
    weight = torch.from_numpy(dequantize(blocks, qtype).copy())
    rows = rng.permutation(192)
    layer = int4_from_gguf(kind, blocks, rows, torch.float32, kernel="torch")
    assert layer.block, "this CPU's int4 packing was not recognised: prefill falls back to the kernel"
    torch.testing.assert_close(layer.dequantized(), weight[rows], rtol=0, atol=1e-6)
    few, many = torch.randn(5, 96), torch.randn(layer.dense_rows + 3, 96)
    torch.testing.assert_close(layer(few), few @ weight[rows].T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(many), many @ weight[rows].T, rtol=1e-5, atol=1e-4)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(many, layer.packed, 32, layer.scales_zeros)
    torch.testing.assert_close(layer(many), kernel, rtol=1e-5, atol=1e-4)
    assert layer(few.unsqueeze(0)).shape == (1, 5, 192)
    assert layer(many.unsqueeze(0)).shape == (1, many.shape[0], 192)
    # 48 rows are not whole 32-row (AVX2) or 64-row (AVX-512) blocks: the probe finds no
    # layout it reads back and the layer stays on the kernel, still right
    blocks = quantize(rng.standard_normal((48, 96)).astype(np.float32), qtype)
    odd = int4_from_gguf(kind, blocks, np.arange(48), torch.float32, kernel="torch")
    assert odd.block is None or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
    torch.testing.assert_close(odd(many), many @ torch.from_numpy(dequantize(blocks, qtype).copy()).T,
                               rtol=1e-5, atol=1e-4)


def _llmhost_kernel():
    """Skip where llmhost's kernel cannot run; on an x86 CPU with AVX2, FMA and
    F16C and a C compiler (this project's machines, CI) it must."""
    from llmhost.models import q4kernel

    ok, why = q4kernel.available()
    if not ok and set(q4kernel.CPU_FLAGS) <= q4kernel.cpu_flags() and shutil.which("cc"):
        pytest.fail(f"llmhost's int4 kernel should build here: {why}")
    if not ok:
        pytest.skip(f"llmhost's int4 kernel is unavailable: {why}")
    return q4kernel


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("width", [96, 160, 576])   # 3, 5, 18 blocks: pairs, groups, an odd block
def test_llmhost_int4_layer_computes_the_dequantized_gguf_weights(kind, width):
    """quantize.Q4Linear (llmhost's AVX2 kernel, q4kernel.c) on a Q4_0 / Q4_1
    tensor keeps the file's weights exactly (dequantized: gguf's values, rows
    reordered as asked) and computes what its 8-bit activations times those
    weights give, on both paths (kernel for a decode step's rows, a dense
    matmul for a prefill's); within 8-bit rounding of the float32 product; a
    row's result is the same alone as batched with others (bitwise)."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quantize

    from llmhost.models.quantize import Q4Linear, int4_from_gguf

    q4kernel = _llmhost_kernel()
    rng = np.random.default_rng(width)
    qtype = GGMLQuantizationType[kind]
    blocks = quantize(rng.standard_normal((64, width)).astype(np.float32), qtype)
    weight = torch.from_numpy(dequantize(blocks, qtype).copy())
    rows = rng.permutation(64)
    layer = int4_from_gguf(kind, blocks, rows, torch.float32)
    assert isinstance(layer, Q4Linear)
    torch.testing.assert_close(layer.dequantized(), weight[rows], rtol=0, atol=0)
    layer.dense_rows = 64   # the dense path too (bench int4-prefill's; the default never takes it)
    for x in (torch.randn(5, width), torch.randn(layer.dense_rows + 3, width)):
        exact = q4kernel.requantized(x).double() @ weight[rows].double().T
        torch.testing.assert_close(layer(x).double(), exact, rtol=1e-5, atol=1e-4)
        plain = x @ weight[rows].T   # activations in 8 bits: about 0.5% of the product's scale
        assert (layer(x) - plain).norm() / plain.norm() < 0.02
    few = torch.randn(7, width)
    together = layer(few)
    for i in range(7):
        assert torch.equal(layer(few[i:i + 1]), together[i:i + 1])
    assert layer(few.unsqueeze(0).bfloat16()).dtype == torch.bfloat16
    assert layer(few.unsqueeze(0)).shape == (1, 7, 64)


def test_int4_falls_back_to_torchs_kernel_where_llmhosts_cannot_build(monkeypatch):
    """No working C compiler: the kernel says why, and int4 loads choose torch's
    kernel (LLMHOST_INT4_KERNEL=auto) instead of failing."""
    from llmhost.config import TestConfig
    from llmhost.models import q4kernel
    from llmhost.models.loading import int4_kernel

    monkeypatch.setenv("CC", "false")            # a "compiler" that always fails
    lib, why = q4kernel._build.__wrapped__()     # the build itself, not the process's cached one
    assert lib is None and ("false failed" in why or "the CPU lacks" in why)
    monkeypatch.setattr(q4kernel, "_build", lambda: (None, why))
    assert q4kernel.available() == (False, why)
    assert int4_kernel(TestConfig()) == "torch"
    assert int4_kernel(TestConfig(INT4_KERNEL="torch")) == "torch"


def test_q8_embedding_and_its_head_keep_the_files_blocks():
    """A Q8_0 token embedding kept as the file stores it: looked-up rows equal
    gguf's dequantized ones exactly; the tied head (llmhost's kernel) computes
    the 8-bit activations times those weights, whatever rows are batched."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quantize

    from llmhost.models.quantize import Q8Head, model_bytes, q8_embedding

    q4kernel = _llmhost_kernel()
    rng = np.random.default_rng(1)
    qtype = GGMLQuantizationType.Q8_0
    blocks = quantize(rng.standard_normal((40, 96)).astype(np.float32), qtype)
    weight = torch.from_numpy(dequantize(blocks, qtype).copy())
    embedding = q8_embedding(blocks, torch.float32)
    ids = torch.tensor([[3, 0, 39], [1, 1, 2]])
    assert torch.equal(embedding(ids), weight[ids])
    head = Q8Head(embedding)
    x = torch.randn(6, 96)
    exact = q4kernel.requantized(x).double() @ weight.double().T
    torch.testing.assert_close(head(x).double(), exact, rtol=1e-5, atol=1e-4)
    assert torch.equal(head(x[2:3]), head(x)[2:3])
    both = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    assert model_bytes(both, count=True) == 40 * 96          # tied: counted once
    assert model_bytes(both) == 40 * 96 + 40 * 3 * 2         # int8 weights, float16 scales


def test_the_vnni_build_computes_what_the_avx2_build_computes():
    """Where the CPU has VNNI the kernel is built with it (vpdpbusd); its
    integers are vpmaddubsw + vpmaddwd's, so every product is bit-identical to
    the plain AVX2 build's: Q4_0, Q4_1 (whole groups, pairs and an odd last block)
    and Q8_0, 1 to 130 rows."""
    import numpy as np
    from gguf import GGMLQuantizationType, quantize

    from llmhost.models.quantize import int4_from_gguf, q8_embedding

    q4kernel = _llmhost_kernel()
    flags = q4kernel.compile_flags(q4kernel.cpu_flags())
    if flags == q4kernel.COMPILE:
        pytest.skip("this CPU has no VNNI: the one build is the plain one")
    assert "-mavxvnni" in flags or "-mavx512vnni" in flags
    plain, why = q4kernel.build(q4kernel.COMPILE)
    assert plain is not None, why
    rng = np.random.default_rng(2)
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        # 1,024: whole groups only; 960: 6 blocks after them; 4,640: passes over k
        for width in (96, 160, 576, 960, 1024, 4640):
            blocks = quantize(rng.standard_normal((24, width)).astype(np.float32),
                              GGMLQuantizationType[kind])
            layer = q8_embedding(blocks, torch.float32) if kind == "Q8_0" else \
                int4_from_gguf(kind, blocks, np.arange(24), torch.float32)
            for rows in (1, 4, 7, 130):
                x = torch.randn(rows, width)
                assert torch.equal(q4kernel.matmul(x, layer.qs, layer.dm),
                                   q4kernel.matmul(x, layer.qs, layer.dm, lib=plain)), (kind, width, rows)


def test_q4_0_keeps_no_m_plane():
    """A Q4_0 weight (w = d * (q - 8)) keeps d alone, 18 bytes a block as in the file, and the
    kernel computes m = -8 d: the same bits as with the m plane stored (lone rows, tiles of
    several rows, passes over wide k; the product, the dequantized weight; packed in the AVX2
    build's 8-feature lanes, the file's layout with AVX-512's 16), and a Q4Group of
    a Q4_0 and a Q4_1 layer gives each layer's own bits."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from llmhost.models.quantize import Q4Group, int4_from_gguf

    q4kernel = _llmhost_kernel()
    rng = np.random.default_rng(4)
    for width in (96, 576, 1568, 4640):
        blocks = quantize(rng.standard_normal((40, width)).astype(np.float32), GGMLQuantizationType.Q4_0)
        layer = int4_from_gguf("Q4_0", blocks, np.arange(40), torch.bfloat16)
        assert layer.dm.shape == (1, 40, width // 32)
        assert layer.qs.nbytes + layer.dm.nbytes == blocks.nbytes
        stored = torch.cat([layer.dm, (-8 * layer.dm.float()).half()])
        for rows in (1, 2, 7, 130):
            x = torch.randn(rows, width).bfloat16()
            assert torch.equal(q4kernel.matmul(x, layer.qs, layer.dm, lanes=layer.lanes),
                               q4kernel.matmul(x, layer.qs, stored, lanes=layer.lanes)), (width, rows)
        assert torch.equal(layer.dequantized(), q4kernel.dequantize(layer.qs, stored, lanes=layer.lanes))
        other = int4_from_gguf("Q4_1", quantize(rng.standard_normal((24, width)).astype(np.float32),
                                                GGMLQuantizationType.Q4_1), np.arange(24), torch.bfloat16)
        x = torch.randn(3, width).bfloat16()
        alone = [layer(x), other(x)]
        group = Q4Group([layer, other])
        assert all(torch.equal(a, b) for a, b in zip(group(x), alone)), width
        assert all(torch.equal(a, b) for a, b in zip([layer(x), other(x)], alone)), width


def _random_blocks(bits: int, k: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(qs, dm) of a random [n, k] weight as q4kernel.matmul takes it: Q4 (bits 4) or Q8_0."""
    if bits == 4:
        return torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g), \
            (torch.rand(2, n, k // 32, generator=g) * 0.02 - 0.01).half()
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), \
        (torch.rand(1, n, k // 32, generator=g) * 0.01).half()


def test_llmhost_kernel_computes_each_row_alone_bitwise():
    """q4kernel.c's tiles (several rows x features, edge tiles smaller) run the same float
    operations for every (row, feature): a row's output is the same bits alone (a decode
    step) as in calls of 2 to 300 rows at any position, with 1 or 2 threads; Q4 and Q8_0,
    k with whole groups of 8 blocks, a partial one of 2 to 7 blocks (576, 960; 96 and 224
    alone), an odd last block (1,568), feature counts that are no multiple of a tile; k wide
    enough (4,640) that tiles of several rows go over it in passes, a row alone in one. Also
    within 8-bit rounding of the float64 product."""
    q4kernel = _llmhost_kernel()
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        for bits, k, n in ((4, 96, 37), (4, 224, 13), (4, 576, 70), (4, 960, 21), (4, 1536, 45), (4, 1568, 9),
                           (4, 4640, 11), (8, 96, 37), (8, 576, 70), (8, 1568, 9)):
            qs, dm = _random_blocks(bits, k, n, g)
            if bits == 4:
                q = torch.cat([(qs & 15).view(n, -1, 16), (qs >> 4).view(n, -1, 16)], 2).double()
                weight = (q * dm[0, ..., None].double() + dm[1, ..., None].double()).view(n, k)
            else:
                weight = (qs.view(n, -1, 32).double() * dm[0, ..., None].double()).view(n, k)
            x = torch.randn(300, k, generator=g)
            exact = q4kernel.requantized(x).double() @ weight.T
            for nt in (1, 2):
                torch.set_num_threads(nt)
                alone = torch.cat([q4kernel.matmul(x[i:i + 1], qs, dm) for i in range(300)])
                torch.testing.assert_close(alone.double(), exact, rtol=1e-5, atol=1e-4)
                for m in (2, 3, 5, 8, 37, 300):
                    for start in (0, 300 - m, (300 - m) // 2):
                        batch = q4kernel.matmul(x[start:start + m], qs, dm)
                        assert torch.equal(batch, alone[start:start + m]), (bits, k, n, nt, m, start)
    finally:
        torch.set_num_threads(threads)


def test_llmhost_kernel_reads_and_writes_bfloat16_as_torch_rounds():
    """bfloat16 activations go into the library as they are and come out in bfloat16: the
    same bits as the float32 product rounded by torch (to nearest even), Q4 and Q8_0, one
    row (a decode step) to 130."""
    q4kernel = _llmhost_kernel()
    g = torch.Generator().manual_seed(3)
    for bits, k, n in ((4, 96, 37), (4, 1536, 45), (4, 4640, 11), (8, 576, 70), (8, 1568, 9)):
        qs, dm = _random_blocks(bits, k, n, g)
        for m in (1, 3, 8, 130):
            x = (torch.randn(m, k, generator=g) * 10 ** torch.randint(-3, 4, (m, 1), generator=g)).bfloat16()
            got = q4kernel.matmul(x, qs, dm)
            assert got.dtype == torch.bfloat16, got.dtype
            assert torch.equal(got, q4kernel.matmul(x.float(), qs, dm).bfloat16()), (bits, k, n, m)


def test_auto_dtype_follows_the_cpu_flags():
    with open("/proc/cpuinfo") as fh:
        flags = set(next(line for line in fh if line.startswith(("flags", "Features"))).split(":")[1].split())
    only = os.environ.get("LLMHOST_CPU_FLAGS", "").replace(",", " ").split()
    if only:   # a CPU emulated with fewer flags (docs/configuration.md)
        flags &= set(only)
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert cpu_has_native_bf16() == native
    assert auto_cpu_dtype() == (torch.bfloat16 if native else torch.float32)


# The peak is the process's VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec,
# so a child of the test process (1-2 GiB with the suite's models) reported the parent's peak
# (that was the 0.8-1.5 GiB "peak" of whole-file runs); VmHWM belongs to the child's own memory.
LOAD_RSS = """
import json, sys
sys.path.insert(0, {root!r})
def status(key):
    with open("/proc/self/status") as fh:
        return int(fh.read().split(key + ":")[1].split()[0]) * 1024
from llmhost.config import TestConfig
from llmhost.models.loading import LoadSpec, load
before = status("VmRSS")
loaded = load(LoadSpec(model={gguf!r}, **{options!r}), TestConfig())
import gc; gc.collect()
print(json.dumps({{"before": before, "after": status("VmRSS"), "peak": status("VmHWM"),
                   "weights": loaded.memory_bytes}}))
"""


@pytest.mark.slow  # loads SmolLM2 in two subprocesses, side by side
def test_gguf_load_peaks_near_its_final_size(smollm2_gguf):
    """A fresh subprocess does only the load and reads its own RSS: just before
    the load, just after, and its peak (VmHWM). The peak stays within an
    eighth of the float32 weights (64 MiB) of where the load ends: room for one
    tensor being converted (at most a 4096-row chunk of the embedding, 9 MiB in
    float32) and gguf's dequantize temporaries several times over, not for the
    model, or a quarter of it, in float32 next to the result (transformers'
    GGUF loader peaked 237 MiB above its end here, the stream before malloc_trim
    370-530 MiB; now about 25 for int8 and 10 for float32). The int8 weights end
    under half of float32's (the tied embedding/head stays float32) and what the
    int8 load keeps (weights, tokenizer, torchao's import) under the float32
    weights alone."""
    # int8 and float32 in two processes at once: each measures only its own memory
    procs = {}
    for options in ({"quantization": "int8"}, {"dtype": "float32"}):
        code = LOAD_RSS.format(root=ROOT, gguf=smollm2_gguf, options=options)
        procs[json.dumps(options)] = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": ROOT})
    outs = {}
    try:
        for key, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            outs[key] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    float32_bytes = 134_515_008 * 4  # SmolLM2-135M's parameters in float32
    for key, (returncode, stdout, stderr) in outs.items():
        options = json.loads(key)
        assert returncode == 0, (options, stderr[-2000:])
        m = json.loads(stdout.strip().splitlines()[-1])
        print(f"{options} GGUF load: peak {(m['peak'] - m['before']) >> 20} MiB above the start, "
              f"{(m['after'] - m['before']) >> 20} MiB kept, peak - end {(m['peak'] - m['after']) >> 20} MiB")
        assert m["peak"] - m["after"] < float32_bytes / 8, (options, m)
        if options.get("quantization"):
            assert m["after"] - m["before"] < float32_bytes, (options, m)
            assert m["weights"] < float32_bytes / 2, (options, m)


def test_int8_embeddings_equal_the_in_process_recipe_and_stay_close_to_float32(server, minilm_dir):
    """The server's int8 vectors equal sentence-transformers with the same torchao
    quantization, and stay close to float32's (cosine), which is the quality figure."""
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    texts = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.",
             "Quantized weights keep most of the meaning."]
    body = server.load(minilm_dir, id="minilm-int8", quantization="int8")
    assert body["quantization"] == "int8" and body["dtype"] == "float32"
    try:
        r = post(server, "/v1/embeddings", {"model": "minilm-int8", "input": texts})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in validate(r.json(), "CreateEmbeddingResponse")["data"]])
    finally:
        requests.delete(server.url + "/v1/models/minilm-int8", timeout=60)
    st = SentenceTransformer(minilm_dir, device="cpu", local_files_only=True)
    full = st.encode(texts)
    quantize_(st, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    np.testing.assert_allclose(got, st.encode(texts), atol=1e-5)
    cosine = (got * full).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(full, axis=1)
    assert cosine.min() > 0.99, cosine
