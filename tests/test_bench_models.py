"""`bench build-model --shape llama-*`: the Llama-shaped benchmark model as an HF
folder and a GGUF of the same weights (llmhost/dev/llamagguf.py), built at the
tests' size (`llama-tiny`) through the same code as `llama-1b`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llmhost.dev import bench


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_gguf) -> tuple[str, str]:
    folder = str(tmp_path_factory.mktemp("bench-llama") / "llama-tiny")
    assert bench.main(["build-model", folder, "--shape", "llama-tiny", "--gguf", "q4_0"]) == 0
    return folder, folder + ".Q4_0.gguf"


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF's row order of a q/k projection from llama.cpp's (the inverse of
    convert_hf_to_gguf.py's permute)."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def test_llama_tiny_gguf_reads_back_as_the_folders_model(built):
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    folder, path = built
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (2, 64, 4, 2)
    assert len(field("tokenizer.ggml.tokens")) == field("llama.vocab_size") == 49152  # SmolLM2's
    assert "im_start" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 1 + 2 * 9 + 1 and "output.weight" not in tensors  # tied
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output_norm.weight"] == "F32"

    hf = load_file(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as fh:
        assert json.load(fh)["vocab_size"] == 49152
    for name, hf_name, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2), ("attn_v", "v_proj", 0)):
        t = tensors[f"blk.1.{name}.weight"]
        rows = dequantize(t.data, t.tensor_type)
        rows = _unpermute(rows, heads) if heads else rows
        # the folder holds the dequantized GGUF weights in bfloat16 (relative error 2**-8)
        folder_rows = hf[f"model.layers.1.self_attn.{hf_name}.weight"].float().numpy()
        np.testing.assert_allclose(folder_rows, rows, rtol=2**-7, atol=1e-6)


def test_llmhost_loads_the_folder(built):
    import torch

    from llmhost.config import Config
    from llmhost.models.loading import LoadSpec, load

    loaded = load(LoadSpec(model=built[0], dtype="float32"), Config())
    ids = torch.tensor([loaded.tokenizer("hello there")["input_ids"]])
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert loaded.model.config.num_hidden_layers == 2


@pytest.mark.slow  # a folder load and two GGUF loads (each parses the 49k-token vocabulary)
def test_llmhost_loads_the_gguf_as_the_same_model_parsing_it_once_per_need(built, tmp_path, monkeypatch):
    """Greedy tokens from the GGUF (float32 and int4 loads) equal the folder's, and
    so does the parameter count the int4 load reports.
    The first load has a child process read the file's metadata (the tensor list,
    the config and the tokenizer: models/gguf.py), the worker parses none of it,
    and the later loads of the file run no child; gguf's tensor name map is built
    once, not once per submodule."""
    import shutil

    import gguf
    import torch

    from llmhost.config import Config, TestConfig
    from llmhost.models.loading import LoadSpec, load
    from llmhost.models import q4kernel
    from llmhost.models.gguf import _header as header_cache
    from llmhost.models.quantize import Int4Linear

    def greedy(loaded) -> list[int]:
        ids = torch.tensor([loaded.tokenizer("the quick brown fox")["input_ids"]])
        with torch.inference_mode():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                        min_new_tokens=6, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    folder = load(LoadSpec(model=built[0], dtype="float32"), Config())
    reference = greedy(folder)
    path = str(tmp_path / "copy.gguf")     # a file no earlier load in this process has seen
    shutil.copyfile(built[1], path)
    parses = []
    original = gguf.GGUFReader.__init__

    def counted(self, file, *args, **kwargs):
        parses.append(os.path.realpath(file))
        original(self, file, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted)
    children = header_cache.cache_info().misses
    loaded = load(LoadSpec(model=path, dtype="float32"), Config())
    assert parses == [] and header_cache.cache_info().misses == children + 1
    assert loaded.model.config.num_hidden_layers == 2
    assert greedy(loaded) == reference
    maps = gguf.get_tensor_name_map.cache_info()
    int4 = load(LoadSpec(model=path, quantization="int4"), Config())
    assert greedy(int4) == reference
    # Model.parameters of an int4 load is the model's parameter count (each Int4Linear
    # counts in x out), not the number of its packed bytes and scales
    assert sum(isinstance(m, Int4Linear) for m in int4.model.modules()) == 2 * 7
    # llmhost's kernel where it runs (AVX2 + a C compiler: this project's machines)
    assert int4.kernel == ("int4-llmhost" if q4kernel.available()[0] else "int4")
    assert int4.parameters == folder.parameters
    # LLMHOST_INT4_KERNEL=torch: torch's int4 kernel, computing in bfloat16, the same answer
    torch_int4 = load(LoadSpec(model=path, quantization="int4"), TestConfig(INT4_KERNEL="torch"))
    assert torch_int4.kernel == "int4" and torch_int4.dtype == "bfloat16"
    assert greedy(torch_int4) == reference
    with pytest.raises(ValueError, match="LLMHOST_INT4_KERNEL"):
        Config({"LLMHOST_INT4_KERNEL": "fast"})
    after = gguf.get_tensor_name_map.cache_info()
    assert after.misses == maps.misses and after.hits - maps.hits > 10
    assert parses == [] and header_cache.cache_info().misses == children + 1


@pytest.mark.slow  # a GGUF load (the child parses the 49k-token vocabulary)
def test_a_q4_0_model_runs_its_layers_in_one_native_call(built):
    """A Q4_0 load keeps d alone (the kernel computes m = -8 d) and llamastep.c runs
    its layers with that (q_linear gets no m plane): a prefill's logits are the torch
    loop's (bfloat16: the same bits; float32: within the kernel's 8-bit noise)."""
    import torch

    from llmhost.config import TestConfig
    from llmhost.engine.kvcache import growing_cache
    from llmhost.engine.llamastep import LlamaStep
    from llmhost.models.loading import LoadSpec, load

    loaded = load(LoadSpec(model=built[1], quantization="int4"), TestConfig())
    if loaded.kernel != "int4-llmhost":
        pytest.skip("llmhost's int4 kernel does not run here")
    model = loaded.model
    assert model.model.layers[0].mlp.down_proj.dm.shape[0] == 1          # d alone
    step = LlamaStep.for_model(model)
    assert step.native is not None
    ids = torch.tensor([loaded.tokenizer("the quick brown fox jumps")["input_ids"]])

    def logits(native) -> torch.Tensor:
        step.native = native
        with torch.inference_mode():
            return step(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None],
                        growing_cache(model.config)).float()

    ours, theirs = logits(step.native), logits(None)
    if model.dtype == torch.bfloat16:
        assert torch.equal(ours, theirs)
    else:
        assert ((ours - theirs).norm() / theirs.norm()).item() < 0.02


@pytest.mark.slow  # two servers, each an int4 load
def test_bench_load_a_restarted_server_builds_nothing(built, tmp_path, monkeypatch, capsys):
    """`bench load`: a new server with an empty LLMHOST_CACHE_DIR builds the int4
    load's three kernels and engine/omp.c; the restarted one, given that folder, builds none (the
    compiler, through a wrapper that logs each call, is asked only its version)."""
    import shutil

    from llmhost.models import q4kernel

    if not q4kernel.available()[0]:
        pytest.skip("llmhost's int4 kernel does not build here")
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert bench.main(["load", "--model", built[1], "--load-options", '{"quantization": "int4"}',
                       "--rounds", "1"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| llama-tiny")]
    assert len(row) == 1 and row[0].count(" s |") == 2, row
    sources = sorted(line.split()[-3] for line in log.read_text().splitlines() if "-o" in line.split())
    assert [os.path.basename(s) for s in sources] == ["attention.c", "llamastep.c", "omp.c", "q4kernel.c"]


@pytest.mark.slow  # two servers
def test_bench_generate_against_another_server_prints_ratios_and_memory(built, capsys):
    """`bench generate --compare-url`, issue 20's comparison (there against
    llama.cpp's servers; here against a second llmhost): alternated rounds, the
    ratios, both workers' RSS with their file pages (code; llama.cpp's mapped
    weights) and the table row."""
    import re

    from support import Server

    folder, path = built
    other = Server(env={"LLMHOST_MODELS": ""}).start()
    try:
        other.load(path, id="other", quantization="int4")
        assert bench.main(["generate", "--serve", "--model", path, "--tokenizer", folder,
                           "--load-options", '{"quantization": "int4"}', "--compare-url", other.url,
                           "--compare-model", "other", "--compare-pid", str(other.worker_pid()),
                           "--concurrency", "1", "--requests", "1", "--rounds", "1",
                           "--max-tokens", "8", "--label", "tiny vs tiny"]) == 0
    finally:
        other.stop()
    out = capsys.readouterr().out
    assert re.search(r"  1 clients: tok/s \d+\.\d\dx   TTFT p50 \d+\.\d\dx", out), out
    memory = re.search(r"worker RSS: llmhost (\d+) MiB, compare (\d+) MiB \(pid \d+\): \d+\.\d\dx; of "
                       r"them file pages \(code, mapped weights\) (\d+) and (\d+) MiB", out)
    assert memory, out
    ours, theirs, ours_file, theirs_file = map(int, memory.groups())
    assert 100 < ours and 100 < theirs and ours_file < ours and theirs_file < theirs, memory[0]
    assert [line for line in out.splitlines() if line.startswith("| tiny vs tiny | ")], out


@pytest.mark.slow  # four processes, each loading the model
def test_bench_prefill_against_another_checkout_alternates_and_prints_ratios(built, tmp_path, capsys):
    """`bench prefill-against`, issue 20's prefill figure (there against the
    issue's commit in a worktree; here against this checkout itself): one
    process per checkout and round, a row per prompt length with the ranges and
    the ratio's range and median; a checkout that cannot run says which and
    why."""
    import re

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert bench.main(["prefill-against", here, "--model", built[1], "--tokens", "8", "24",
                       "--repeat", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| [\d.]+-[\d.]+ ms \| [\d.]+-[\d.]+ ms \| ([\d.]+)-([\d.]+)x \| ([\d.]+)x \|$",
                      out, re.M)
    assert [row[0] for row in rows] == ["8", "24"], out
    assert all(float(low) <= float(median) <= float(high) for _, low, high, median in rows), out
    assert f"other: {here}" in out and "flags" in out, out
    from llmhost.models import q4kernel

    if q4kernel.available()[0] and q4kernel._build()[0].q4_wide_rows(0):   # each process's measured start
        starts = re.findall(r"^(this checkout|other)'s wide int4 tiles from \(rows, each round's process\): "
                            r"\[(\d+)\]$", out, re.M)
        assert [name for name, _ in starts] == ["this checkout", "other"], out
        assert all(int(rows) in q4kernel.WIDE_CANDIDATES + (q4kernel.NEVER,) for _, rows in starts), out
    with pytest.raises(SystemExit, match=r"other \(.*nowhere\) failed"):
        bench.main(["prefill-against", str(tmp_path / "nowhere"), "--model", built[1], "--tokens", "8",
                    "--rounds", "1"])
