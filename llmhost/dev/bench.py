"""`python -m llmhost.dev.bench`: load generator against an llmhost server (one
running at --url, or one it starts itself with --serve).

    python -m llmhost.dev.bench build-model /tmp/bench-gpt2
    python -m llmhost.dev.bench build-model /tmp/bench-llama-1b --shape llama-1b --gguf q4_0
    python -m llmhost.dev.bench generate --serve --model /tmp/bench-gpt2 --compare-inprocess /tmp/bench-gpt2
    python -m llmhost.dev.bench embed --url http://127.0.0.1:8000 --model M ...
    python -m llmhost.dev.bench agent --serve --model SmolLM2.gguf --agents 1 4
    python -m llmhost.dev.bench memory --model SmolLM2.gguf --options '{"quantization": "int4"}'
    python -m llmhost.dev.bench prefill-against /tmp/old --model SmolLM2.gguf

Each prints throughput and latency, and with --compare-inprocess the same
workload run in-process with transformers (or sentence-transformers) on this
machine, as ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from functools import partial

from .llamagguf import SHAPES as LLAMA_SHAPES


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _complete(url: str, model: str, prompt_ids: list[int], max_tokens: int, stream: bool,
              session, extra: dict | None = None, sampling: dict | None = None
              ) -> tuple[int, float, float]:
    """One /v1/completions request: (completion tokens, latency s, time to first token s)."""
    import json

    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, **(extra or {}), **(sampling or {})}
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    ttft = float("nan")
    tokens = 0
    with session.post(url + "/v1/completions", json=body, stream=stream, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        if not stream:
            return r.json()["usage"]["completion_tokens"], time.perf_counter() - started, ttft
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft != ttft:
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - started, ttft


def _chat(url: str, model: str, prompt: str, max_tokens: int, stream: bool, session,
          logit_bias: dict | None = None, sampling: dict | None = None) -> tuple[int, float, float]:
    """One streaming /v1/chat/completions request, the workload both servers of
    --compare-url get: (completion tokens, latency s, time to first token s).
    Tokens come from the usage chunk where the server sends one, else one per
    content chunk (llama-cpp-python streams one token per chunk)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(sampling or {})}
    if logit_bias:
        body["logit_bias"] = logit_bias
    started = time.perf_counter()
    ttft = float("nan")
    chunks = usage = 0
    for chunk in _chat_chunks(url, body, session):
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            chunks += 1
            if ttft != ttft:
                ttft = time.perf_counter() - started
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
    return usage or chunks, time.perf_counter() - started, ttft


def _chat_chunks(url: str, body: dict, session):
    """The parsed chunks of one streamed /v1/chat/completions request. A
    kept-alive connection the server closed meanwhile (llama-server closes its
    side after a streamed answer) is opened again, once, before any answer."""
    import json

    import requests

    try:
        r = session.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600)
    except requests.ConnectionError:
        session.close()
        r = session.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600)
    with r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                yield json.loads(line[6:])


def _sampling_text(sampling: dict) -> str:
    """How the requests sample, for the figures' header."""
    return ", ".join(f"{k} {v}" for k, v in sampling.items()) if sampling else "temperature 0"


def _load_level(url: str, model: str, prompt_ids, clients: int, requests_each: int,
                max_tokens: int, stream: bool, logit_bias: dict | None = None,
                extra: dict | None = None, sampling: dict | None = None) -> dict:
    """`clients` threads, each sending `requests_each` requests back to back
    (closed loop): /v1/completions with token ids (`extra`: more body fields),
    or /v1/chat/completions when `prompt_ids` is a string; `sampling`: fields
    instead of temperature 0 (greedy)."""
    import requests

    results: list[tuple[int, float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            for _ in range(requests_each):
                try:
                    if isinstance(prompt_ids, str):
                        res = _chat(url, model, prompt_ids, max_tokens, stream, session, logit_bias,
                                    sampling)
                    else:
                        res = _complete(url, model, prompt_ids, max_tokens, stream, session,
                                        extra, sampling)
                except Exception as exc:  # reported, not fatal: the figures say how many failed
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors),
            "tok_s": tokens / wall if wall else 0.0,
            "p50": _percentile([r[1] for r in results], 0.5),
            "p95": _percentile([r[1] for r in results], 0.95),
            "ttft_p50": _percentile([r[2] for r in results], 0.5),
            "ttft_p95": _percentile([r[2] for r in results], 0.95),
            "first_error": errors[0] if errors else None}


class _InProcess:
    """transformers `generate` in this process, on the same machine: batch 1 and
    static batches of the same prompt."""

    def __init__(self, folder: str, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def tok_s(self, prompt_ids: list[int], batch: int, max_tokens: int) -> float:
        ids = self.torch.tensor([prompt_ids] * batch)
        kwargs = dict(attention_mask=self.torch.ones_like(ids), do_sample=False,
                      pad_token_id=self.model.generation_config.eos_token_id)
        self.model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        started = time.perf_counter()
        self.model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kwargs)
        return batch * max_tokens / (time.perf_counter() - started)


def _median(values: list[float]) -> float:
    """The median (of two rounds: their mean, not the lower one as `_percentile` gives)."""
    import statistics

    return statistics.median(values) if values else float("nan")


def bench_generate(args) -> int:
    """Each level runs `--rounds` times, alternating with the in-process run of
    the same size, so that the machine's noise hits both alike; medians are
    reported and compared."""
    from transformers import AutoTokenizer

    if args.compare_url:
        return bench_compare(args)
    import json

    server = None
    url = args.url
    # Both sides in one dtype: float32 unless --load-options names another.
    options = {"dtype": "float32", **json.loads(args.load_options or "{}")}
    ref = _InProcess(args.compare_inprocess, options["dtype"]) if args.compare_inprocess else None
    stream = not args.no_stream
    levels: dict[int, dict] = {}
    inprocess: dict[int, float] = {}
    schema_levels: dict[int, float] = {}
    response_format = _response_format(args.response_format)
    if args.serve:
        server = _serve()
        url = server.url
    pid = server.proc.pid if server else args.pid
    try:
        rss = [_rss_mib(pid, children=server is not None)]
        if args.load or server is not None:
            _load_model(url, args.model, options)
        rss.append(_rss_mib(pid, children=server is not None))
        print(machine(), flush=True)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        prompt_ids = tokenizer(args.prompt)["input_ids"]
        sampling = json.loads(args.sampling or "{}")
        print(f"model {args.model}: prompt {len(prompt_ids)} tokens, max_tokens {args.max_tokens}, "
              f"{_sampling_text(sampling)}, {'streaming' if stream else 'non-streaming'}, "
              f"{args.requests} requests per client, medians of {args.rounds} rounds")
        _load_level(url, args.model, prompt_ids, 1, 1, 8, stream, sampling=sampling)  # warm-up
        for clients in args.concurrency:
            runs, refs, schema_runs = [], [], []
            for _ in range(args.rounds):
                runs.append(_load_level(url, args.model, prompt_ids, clients, args.requests,
                                        args.max_tokens, stream, sampling=sampling))
                if response_format:
                    schema_runs.append(_load_level(url, args.model, prompt_ids, clients,
                                                   args.requests, args.max_tokens, stream,
                                                   extra={"response_format": response_format},
                                                   sampling=sampling))
                if ref is not None:
                    refs.append(ref.tok_s(prompt_ids, clients, args.max_tokens))
            res = {key: _median([r[key] for r in runs])
                   for key in ("tok_s", "p50", "p95", "ttft_p50", "ttft_p95")}
            res["requests"] = sum(r["requests"] for r in runs)
            res["errors"] = sum(r["errors"] for r in runs)
            first_error = next((r["first_error"] for r in runs if r["first_error"]), None)
            levels[clients] = res
            if schema_runs:
                schema_levels[clients] = _median([r["tok_s"] for r in schema_runs])
                failed = sum(r["errors"] for r in schema_runs)
                print(f"llmhost  {clients:3d} clients with the schema: "
                      f"{schema_levels[clients]:7.1f} tok/s ({failed} failed)"
                      + (f" first error: {schema_runs[0]['first_error']}" if failed else ""))
            line = (f"llmhost  {clients:3d} clients: {res['tok_s']:7.1f} tok/s  latency p50 "
                    f"{res['p50']:.2f}s p95 {res['p95']:.2f}s  TTFT p50 {res['ttft_p50'] * 1000:.0f}ms "
                    f"p95 {res['ttft_p95'] * 1000:.0f}ms  ({res['requests']} ok, {res['errors']} failed)")
            if refs:
                inprocess[clients] = _median(refs)
                line += f"  | in-process generate batch {clients}: {inprocess[clients]:7.1f} tok/s"
            print(line + (f"  first error: {first_error}" if first_error else ""), flush=True)
        rss.append(_rss_mib(pid, children=server is not None))
        print(f"worker RSS: {rss[0]:.0f} MiB before the load (imports), +{rss[1] - rss[0]:.0f} "
              f"the load, +{rss[2] - rss[1]:.0f} the runs (caches): {rss[2]:.0f} MiB")
    finally:
        if server is not None:
            server.stop()
    if inprocess:
        print("ratios (llmhost / in-process generate, same machine, this run):")
        for clients in args.concurrency:
            what = "batch 1" if clients == 1 else f"static batch {clients}"
            print(f"  {clients:3d} clients vs {what}: {levels[clients]['tok_s'] / inprocess[clients]:.2f}x")
    if schema_levels:
        print("response_format json_schema / none (same server, alternating rounds, medians):")
        for clients in args.concurrency:
            print(f"  {clients:3d} clients: {schema_levels[clients]:7.1f} vs "
                  f"{levels[clients]['tok_s']:7.1f} tok/s = "
                  f"{schema_levels[clients] / levels[clients]['tok_s']:.2f}x")
        _print_mask_cost(tokenizer, args.model, response_format)
    if stream and 1 in levels:
        for clients in args.concurrency:
            if clients != 1:
                print(f"  TTFT p50 at {clients} clients / 1 client: "
                      f"{levels[clients]['ttft_p50'] / levels[1]['ttft_p50']:.2f}x")
    return 0


# The default --response-format schema: a long array, so that every request
# generates max_tokens tokens with or without it (the same work to compare).
LONG_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 500}


def _response_format(value: str | None) -> dict | None:
    """--response-format: 'long' (LONG_SCHEMA), a JSON schema, or @file."""
    import json

    if not value:
        return None
    if value == "long":
        schema = LONG_SCHEMA
    elif value.startswith("@"):
        with open(value[1:]) as fh:
            schema = json.load(fh)
    else:
        schema = json.loads(value)
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


def _print_mask_cost(tokenizer, model: str, response_format: dict) -> None:
    """Per-token cost of the grammar in-process (fill the bitmask, mask a
    row's logits, accept the token), with this model's tokenizer."""
    import random

    import torch

    from ..engine import constrain

    vocab = len(tokenizer)
    try:
        from transformers import AutoConfig
        vocab = max(vocab, int(AutoConfig.from_pretrained(model).vocab_size))
    except Exception:
        pass
    comp = constrain.compiler(tokenizer, tokenizer, vocab, {tokenizer.eos_token_id or 0})
    started = time.perf_counter()
    compiled = constrain.json_schema(comp, response_format["json_schema"]["schema"])
    compile_s = time.perf_counter() - started
    matcher = constrain.Constraint(compiled, vocab, "answer").matcher()
    rng = random.Random(0)
    steps, spent = 0, 0.0
    while steps < 200 and not matcher.done:
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        started = time.perf_counter()
        masked = matcher.mask(logits)
        token = int(torch.argmax(masked))
        matcher.accept(token)
        spent += time.perf_counter() - started
        steps += 1
    print(f"  grammar: compile {compile_s * 1000:.0f} ms once per schema (then cached); "
          f"{spent / steps * 1000:.3f} ms per token per row (bitmask + mask + accept, "
          f"vocab {vocab}, {steps} tokens)")


def _rss_mib(pid: int | None, children: bool = False, part: str = "rss") -> float:
    """Resident memory of `pid` (with `children`: of its largest child, the
    gunicorn worker), MiB; nan when unknown. `part` "shared": of it, the file
    pages (libraries' code; llama.cpp's mapped weights)."""
    if not pid:
        return float("nan")
    import psutil

    try:
        proc = psutil.Process(pid)
        if children:
            kids = proc.children(recursive=True)
            proc = max(kids, key=lambda k: k.memory_info().rss) if kids else None
        return getattr(proc.memory_info(), part) / 2**20 if proc else float("nan")
    except psutil.Error:
        return float("nan")


def _tokenizer(args):
    from transformers import AutoTokenizer

    name = args.tokenizer or args.model
    if name.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(name) or ".",
                                             gguf_file=os.path.basename(name))
    return AutoTokenizer.from_pretrained(name)


def _ban_eos(args) -> dict:
    """logit_bias -100 on every end-of-sequence id of the model, so that every
    answer runs to max_tokens on both servers."""
    tok = _tokenizer(args)
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
           tok.convert_tokens_to_ids("<|endoftext|>")}
    return {str(i): -100 for i in ids if isinstance(i, int) and i != tok.unk_token_id}


def machine() -> str:
    """What the figures were measured on: the CPU, its vector flags (AVX2,
    AVX-512, AMX), the cores and the load average at this moment."""
    import re

    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        info = ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*)\b", info)))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU {model.group(1) if model else 'unknown'}, {os.cpu_count()} cores, flags "
            f"{' '.join(flags) or 'none of avx2/avx512/amx'}; load average {load}")


def _listener_pid(url: str) -> int | None:
    """The pid of the process listening on `url`'s port on this machine (the
    --compare-url server's, for its RSS), or None."""
    from urllib.parse import urlparse

    import psutil

    port = urlparse(url).port
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    return next((c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr
                 and c.laddr.port == port and c.pid), None)


def _spread(values: list[float], digits: int = 1) -> str:
    """'median' or 'median (min-max)' of the rounds."""
    text = f"{_median(values):.{digits}f}"
    return text if len(values) < 2 else text + f" ({min(values):.{digits}f}-{max(values):.{digits}f})"


def bench_compare(args) -> int:
    """The same closed-loop streaming chat workload against llmhost and the
    server at --compare-url, in alternating rounds, medians and ratios, then
    one markdown table row in the form of issue 20's tables."""
    import json

    server = _serve() if args.serve else None
    url = server.url if server else args.url
    ours_pid = server.proc.pid if server else args.pid
    theirs_pid = args.compare_pid or _listener_pid(args.compare_url)
    print(machine(), flush=True)
    try:
        empty = _rss_mib(ours_pid, children=server is not None)
        if args.load or server is not None:
            _load_model(url, args.model, json.loads(args.load_options or "{}"))
        loaded_rss = _rss_mib(ours_pid, children=server is not None)
        bias = _ban_eos(args)
        other_model = args.compare_model or args.model
        prompt, extra = args.prompt, None
        if args.compare_api == "completions":  # token ids: models without a chat template
            prompt, extra = _tokenizer(args)(args.prompt)["input_ids"], {"logit_bias": bias}
        sampling = json.loads(args.sampling or "{}")
        print(f"{args.compare_api}, streaming, max_tokens {args.max_tokens}, "
              f"{_sampling_text(sampling)}, EOS banned "
              f"(logit_bias {bias}), {args.requests} requests per client, medians of "
              f"{args.rounds} alternating rounds; load options {args.load_options or '{}'}")
        for target, model in ((url, args.model), (args.compare_url, other_model)):  # warm-up
            _load_level(target, model, prompt, 1, 1, 8, True, bias, extra, sampling)
        rounds: dict[int, tuple[list[dict], list[dict]]] = {}
        for clients in args.concurrency:
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(_load_level(url, args.model, prompt, clients, args.requests,
                                        args.max_tokens, True, bias, extra, sampling))
                theirs.append(_load_level(args.compare_url, other_model, prompt, clients,
                                          args.requests, args.max_tokens, True, bias, extra,
                                          sampling))
            rounds[clients] = (ours, theirs)
            for name, runs in (("llmhost", ours), ("compare", theirs)):
                res = {key: _median([r[key] for r in runs]) for key in ("tok_s", "p50", "ttft_p50")}
                err = next((r["first_error"] for r in runs if r["first_error"]), None)
                failed = sum(r["errors"] for r in runs)
                print(f"{name:8s} {clients:3d} clients: {res['tok_s']:7.1f} tok/s  TTFT p50 "
                      f"{res['ttft_p50'] * 1000:.0f}ms  latency p50 {res['p50']:.2f}s"
                      + (f"  {failed} failed, first error: {err}" if err else ""), flush=True)
        ours_rss = _rss_mib(ours_pid, children=server is not None)
        theirs_rss = _rss_mib(theirs_pid)
        files = (_rss_mib(ours_pid, children=server is not None, part="shared"),
                 _rss_mib(theirs_pid, part="shared"))
    finally:
        if server is not None:
            server.stop()
    print("ratios (llmhost / compare, same machine, this run):")
    med = {clients: tuple({key: _median([r[key] for r in runs]) for key in ("tok_s", "ttft_p50")}
                          for runs in pair) for clients, pair in rounds.items()}
    for clients, (a, b) in med.items():
        print(f"  {clients:3d} clients: tok/s {a['tok_s'] / b['tok_s']:.2f}x   "
              f"TTFT p50 {a['ttft_p50'] / b['ttft_p50']:.2f}x")
    print(f"  worker RSS: llmhost {ours_rss:.0f} MiB, compare {theirs_rss:.0f} MiB "
          f"(pid {theirs_pid or 'unknown: --compare-pid'}): {ours_rss / theirs_rss:.2f}x; of them file "
          f"pages (code, mapped weights) {files[0]:.0f} and {files[1]:.0f} MiB")
    print(f"  llmhost worker RSS split: {empty:.0f} MiB before the load (imports), "
          f"+{loaded_rss - empty:.0f} the load (model code, tokenizer, weights), "
          f"+{ours_rss - loaded_rss:.0f} the runs (caches); `bench memory` splits it finer")
    # The issue's table: tok/s per level, TTFT at each level, RSS; medians (range of rounds).
    levels = list(rounds)
    cells = [f"{_spread([r['tok_s'] for r in rounds[c][0]])} / {_spread([r['tok_s'] for r in rounds[c][1]])}"
             f" tok/s ({med[c][0]['tok_s'] / med[c][1]['tok_s']:.2f}x)" for c in levels]
    cells += [f"{_spread([r['ttft_p50'] for r in rounds[c][0]], digits=2)} / "
              f"{_spread([r['ttft_p50'] for r in rounds[c][1]], digits=2)} s "
              f"({med[c][0]['ttft_p50'] / med[c][1]['ttft_p50']:.2f}x)" for c in levels]
    cells.append(f"{ours_rss:,.0f} / {theirs_rss:,.0f} MiB ({ours_rss / theirs_rss:.2f}x)")
    label = args.label or args.load_options or "{}"
    print("\n| load | " + " | ".join(f"{c} client{'s' * (c > 1)} llmhost / compare" for c in levels)
          + " | " + " | ".join(f"TTFT p50 at {c}" for c in levels) + " | worker RSS |")
    print("| --- " * (2 * len(levels) + 2) + "|")
    print(f"| {label} | " + " | ".join(cells) + " |")
    print(machine() + " (at the end)", flush=True)
    return 0


def _serve(env: dict | None = None):
    """gunicorn wsgi:app from this checkout on a free loopback port."""
    from ..server.process import Server

    return Server(env={"LLMHOST_LOG_LEVEL": "warning", **(env or {})},
                  log_path=os.devnull).start(timeout=120)


def _load_model(url: str, model: str, options: dict | None = None) -> None:
    import requests

    r = requests.post(url + "/v1/models", json={"model": model, **(options or {})}, timeout=600)
    if r.status_code not in (200, 201):
        raise SystemExit(f"could not load {model}: {r.text}")


# -- load time: what LLMHOST_CACHE_DIR keeps ------------------------------------------

def bench_load(args) -> int:
    """Each --model's load (POST /v1/models, a new server each time) with an empty
    cache folder, then in a restarted server with what the first kept
    (config.cache_dir: compiled kernels, GGUF headers); with --llama-server, that
    binary's time from its start to ready on the same file."""
    import json
    import shutil
    import subprocess
    import tempfile

    import requests

    from ..server.process import free_port

    options = json.loads(args.load_options or "{}")
    print(f"load {options}; {machine()}")
    print("| model | empty cache | restarted | llama-server start to ready |\n| --- | --- | --- | --- |")
    for model in args.model:
        times: dict = {"empty": [], "restarted": [], "llama": []}
        for _ in range(args.rounds):
            cache = tempfile.mkdtemp(prefix="llmhost-bench-cache-")
            try:
                for column in ("empty", "restarted"):
                    srv = _serve({"LLMHOST_CACHE_DIR": cache, "LLMHOST_MODELS": ""})
                    try:
                        start = time.perf_counter()
                        _load_model(srv.url, model, options)
                        times[column].append(time.perf_counter() - start)
                    finally:
                        srv.stop()
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            if args.llama_server:
                port = free_port()
                start = time.perf_counter()
                proc = subprocess.Popen([args.llama_server, "-m", model, "--port", str(port), "--threads",
                                         str(os.cpu_count()), "--no-webui"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                try:
                    while proc.poll() is None:
                        try:
                            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                                times["llama"].append(time.perf_counter() - start)
                                break
                        except requests.ConnectionError:
                            time.sleep(0.02)
                finally:
                    proc.terminate()
                    proc.wait()
        cells = [", ".join(f"{t:.2f}" for t in times[c]) + " s" if times[c] else "-"
                 for c in ("empty", "restarted", "llama")]
        print(f"| {os.path.basename(model)} | " + " | ".join(cells) + " |", flush=True)
    return 0


# -- memory (issue 20): where a worker's RSS goes -------------------------------

# Runs in a fresh interpreter, so that each step's RSS is what that step adds.
MEMORY_STEPS = r"""
import gc, json, sys, time
sys.path.insert(0, {root!r})

def rss():
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024

def step(name, took=None):
    gc.collect()
    print(json.dumps({{"step": name, "rss": rss(), "modules": sorted(
        m for m in ("torchao", "scipy", "triton", "sentence_transformers", "peft", "av", "xgrammar",
                    "sqlalchemy", "alembic", "PIL") if m in sys.modules)}}), flush=True)

step("python")
import numpy, torch
step("torch")
import transformers
step("transformers")
from llmhost import create_app
from llmhost.config import TestConfig
create_app(TestConfig())
step("app")
from llmhost.models import lean, loading
lean.prepare()
import transformers.modeling_utils
step("model code")
tokenizer_load = loading.AutoTokenizer.from_pretrained
class _Timed:
    @staticmethod
    def from_pretrained(*a, **kw):
        got = tokenizer_load(*a, **kw)
        step("tokenizer")
        return got
loading.AutoTokenizer = _Timed
loaded = loading.load(loading.LoadSpec(model={model!r}, **{options!r}), TestConfig())
step("weights")
print(json.dumps({{"weights_counted": loaded.memory_bytes / 2**20, "dtype": loaded.dtype}}))
from llmhost.engine.sampling import SamplingParams
from llmhost.engine.scheduler import Generation, GenerationRequest, Scheduler
scheduler = Scheduler("memory", loaded, TestConfig())  # not started: its steps run here
ids = loaded.tokenizer.apply_chat_template([{{"role": "user", "content": "Why is the sky blue?"}}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
gens = [Generation(GenerationRequest(ids, SamplingParams(max_tokens=10**6, temperature=0)), "memory")
        for _ in range({batch})]
scheduler._prefill(gens)
for _ in range({tokens}):
    scheduler._decode()
step("generation")
"""


def memory_split(model: str, options: dict, tokens: int = 64, batch: int = 1) -> dict:
    """RSS (MiB) of a fresh interpreter after each step of a worker's life:
    python, torch, transformers, the app, transformers' model code, the
    tokenizer, the weights, and `batch` greedy rows of `tokens` tokens (KV
    cache and the kernels' buffers); with what each step added and which
    optional packages were imported by then."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = MEMORY_STEPS.format(root=root, model=model, options=options, tokens=tokens, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "PYTHONPATH": root, "LLMHOST_LOG_LEVEL": "warning"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    steps = [line for line in lines if "step" in line]
    extra = next(line for line in lines if "weights_counted" in line)
    return {"steps": steps, **extra}


def bench_memory(args) -> int:
    """A worker's RSS split, one fresh interpreter per load option."""
    import json

    print(f"RSS after each step (MiB), model {args.model}, {args.tokens} greedy tokens at batch "
          f"{args.batch}; {machine()}")
    for options in args.options:
        got = memory_split(args.model, json.loads(options), args.tokens, args.batch)
        print(f"\n{options} (dtype {got['dtype']}, weights counted {got['weights_counted']:.0f} MiB)")
        print("| step | RSS | added | optional packages imported |\n| --- | --- | --- | --- |")
        previous = 0.0
        for s in got["steps"]:
            print(f"| {s['step']} | {s['rss']:.0f} | {s['rss'] - previous:+.0f} | "
                  f"{', '.join(s['modules']) or '-'} |")
            previous = s["rss"]
        by = {s["step"]: s["rss"] for s in got["steps"]}
        print(f"split: imports {by['model code']:.0f} MiB (app {by['app']:.0f}), tokenizer "
              f"{by['tokenizer'] - by['model code']:.0f}, weights {by['weights'] - by['tokenizer']:.0f}, "
              f"caches after generating {by['generation'] - by['weights']:.0f}; total "
              f"{by['generation']:.0f}", flush=True)
    return 0


# -- agent loops (issue 19: prefix caching) -----------------------------------------

AGENT_TOOLS = [
    ("get_weather", "the current weather and a three-day forecast for a city",
     {"city": "the city name, e.g. Paris", "units": "celsius or fahrenheit"}),
    ("search_flights", "flights between two airports on a date, cheapest first",
     {"origin": "IATA code of the departure airport", "destination": "IATA code of the arrival "
      "airport", "date": "the day of departure, YYYY-MM-DD", "passengers": "how many adults"}),
    ("book_hotel", "reserve a hotel room; returns a confirmation number",
     {"city": "where", "check_in": "YYYY-MM-DD", "nights": "how many nights",
      "budget": "the most to pay per night, in euros"}),
    ("convert_currency", "convert an amount between two currencies at today's rate",
     {"amount": "the amount", "from": "ISO code, e.g. EUR", "to": "ISO code, e.g. USD"}),
    ("get_time", "the local time and time zone of a city", {"city": "the city name"}),
    ("translate", "translate a short text", {"text": "what to translate",
                                             "target": "the language to translate into"}),
    ("find_restaurants", "restaurants near a place, with ratings and price levels",
     {"near": "an address or landmark", "cuisine": "optional kind of food",
      "open_now": "only places open now"}),
]


def agent_system_prompt() -> str:
    """About 1,000 tokens (SmolLM2's tokenizer) of instructions and tool
    definitions, as agent frameworks put them in the system prompt."""
    import json

    tools = [{"type": "function", "function": {
        "name": name, "description": f"Returns {what}. Call it only when the user needs {what}; "
                                     "never guess its result, and report errors as they come.",
        "parameters": {"type": "object", "properties": {
            key: {"type": "string", "description": doc} for key, doc in params.items()},
            "required": list(params)}}} for name, what, params in AGENT_TOOLS]
    rules = ("You are a travel assistant working for one user. Think step by step, call at most "
             "one tool per turn by answering with a JSON object {\"name\": ..., \"arguments\": "
             "{...}}, read the tool result the user passes back, and answer briefly once you "
             "know enough. Never invent prices, times or confirmation numbers. ")
    return rules + "Tools:\n" + json.dumps(tools)


def _agent_turn(url: str, model: str, messages: list[dict], max_tokens: int, session,
                extra: dict) -> dict:
    """One streamed chat turn: TTFT, latency, the answer text, cached tokens."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    started = time.perf_counter()
    ttft, text, usage = float("nan"), "", {}
    for chunk in _chat_chunks(url, body, session):
        choices = chunk.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        if ttft != ttft and (delta.get("content") or delta.get("tool_calls")):
            ttft = time.perf_counter() - started
        text += delta.get("content") or ""
        usage = chunk.get("usage") or usage
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"ttft": ttft, "latency": time.perf_counter() - started, "text": text,
            "prompt": usage.get("prompt_tokens", 0), "cached": cached}


def _agent_loops(url: str, model: str, agents: int, turns: int, max_tokens: int,
                 fresh_salt: bool, trip: int = 0) -> dict:
    """`agents` concurrent agent loops of `turns` turns: each turn resends the
    conversation with the last answer, a tool result and a short user message.
    `fresh_salt`: a new cache_salt every request (no reuse on an llmhost server
    whose cache is on). `trip` numbers the conversations: each round asks for
    another trip (the same system prompt), so a round's turns cannot reuse the
    previous round's, which held the same conversation and more."""
    import uuid

    import requests

    system = agent_system_prompt()
    per_turn: list[list[dict]] = [[] for _ in range(turns)]
    errors: list[str] = []
    lock = threading.Lock()

    def agent(number: int) -> None:
        city = ["Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Quebec", "Perth", "Riga"][number % 8]
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Plan me three days in {city} next week "
                                                f"(trip {trip})."}]
        with requests.Session() as session:
            for turn in range(turns):
                extra = {"cache_salt": uuid.uuid4().hex} if fresh_salt else {}
                try:
                    res = _agent_turn(url, model, messages, max_tokens, session, extra)
                except Exception as exc:   # reported, not fatal
                    with lock:
                        errors.append(str(exc))
                    return
                with lock:
                    per_turn[turn].append(res)
                messages += [{"role": "assistant", "content": res["text"]},
                             {"role": "user", "content":
                              f"Tool result {turn + 1}: {{\"city\": \"{city}\", \"temp_c\": "
                              f"{12 + turn}, \"sky\": \"clear\", \"price_eur\": {80 + 7 * turn}}}. "
                              "What next?"}]

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"total": time.perf_counter() - started, "per_turn": per_turn, "errors": errors}


def bench_agent(args) -> int:
    """Agent loops with the prefix cache on and off, in alternating rounds.
    With --serve: two servers from this checkout, one with
    LLMHOST_PREFIX_CACHE_MB=0, and a "miss" column (the cache-on server, a
    fresh cache_salt every request: all the cache's work, no reuse); with
    --url: one server, "off" sending a fresh cache_salt every request. --compare-url: a third column (another server,
    e.g. llama-cpp-python's, which keeps its slot cache)."""
    import json

    options = json.loads(args.load_options or "{}")
    servers = []
    try:
        if args.serve:
            servers = [_serve()]
            if "off" not in args.skip:
                servers.append(_serve({"LLMHOST_PREFIX_CACHE_MB": "0"}))
            on_url, off_url = servers[0].url, servers[-1].url
        else:
            on_url = off_url = args.url
        for url in dict.fromkeys((on_url, off_url)):
            if args.serve or args.load:
                _load_model(url, args.model, options)
        sides = [("on", on_url, args.model, False), ("off", off_url, args.model, not args.serve)]
        if args.serve:   # the cache's cost where nothing is reused: on, every request missing
            sides.append(("miss", on_url, args.model, True))
        sides = [side for side in sides if side[0] not in args.skip]
        if args.compare_url:
            sides.append(("compare", args.compare_url, args.compare_model or args.model, False))
        print(machine(), flush=True)
        for _, url, model, fresh in sides:   # warm-up
            _agent_loops(url, model, 1, 1, 4, fresh, trip=-1)
        print(f"agent loops: {args.turns} turns, max_tokens {args.max_tokens}, temperature 0, "
              f"{args.rounds} alternating rounds (medians); load options {options}; "
              f"'off' = {'a server with LLMHOST_PREFIX_CACHE_MB=0' if args.serve else 'a fresh cache_salt per request'}")
        trip = 0
        for agents in args.agents:
            runs: dict[str, list[dict]] = {name: [] for name, *_ in sides}
            for _ in range(args.rounds):
                trip += 1
                for name, url, model, fresh in sides:
                    runs[name].append(_agent_loops(url, model, agents, args.turns,
                                                   args.max_tokens, fresh, trip))
            _print_agent_table(agents, args.turns, runs)
        print(machine() + " (at the end)", flush=True)
    finally:
        for server in servers:
            server.stop()
    return 0


def _print_agent_table(agents: int, turns: int, runs: dict[str, list[dict]]) -> None:
    names = list(runs)
    ttft = {name: [_median([r["ttft"] for run in runs[name] for r in run["per_turn"][t]])
                   for t in range(turns)] for name in names}
    shown = [n for n in ("on", "compare") if n in runs]   # whose reuse is worth showing

    def reused(name: str, t: int) -> str:
        """Mean cached / prompt tokens of turn t (usage.prompt_tokens_details)."""
        rs = [r for run in runs[name] for r in run["per_turn"][t]]
        return f"{sum(r['cached'] for r in rs) // max(1, len(rs))}/{sum(r['prompt'] for r in rs) // max(1, len(rs))}"

    print(f"\n{agents} agent(s): per-turn TTFT p50 (ms), tokens reused / prompt tokens "
          f"({', '.join(shown)}, as the server reports them)")
    other = next((n for n in ("off", "compare", "miss") if n in runs), "on")   # what "on" is divided by
    print("turn  " + "  ".join(f"{n:>8s}" for n in names) + f"   on/{other}   "
          + "  ".join(f"{'reused ' + n:>16s}" for n in shown))
    for t in range(turns):
        print(f"{t + 1:4d}  " + "  ".join(f"{ttft[n][t] * 1000:8.0f}" for n in names)
              + f"   {ttft['on'][t] / ttft[other][t]:5.2f}x   "
              + "  ".join(f"{reused(n, t):>16s}" for n in shown))
    later = {n: sum(ttft[n][1:]) for n in names}
    total = {n: _median([run["total"] for run in runs[n]]) for n in names}
    errors = {n: sum(len(run["errors"]) for run in runs[n]) for n in names}
    print(f"TTFT of turns 2-{turns} (sum of medians): on/{other} {later['on'] / later[other]:.2f}x")
    if "miss" in total and "off" in total:
        print(f"no reuse (cache on, a fresh cache_salt per request): speed off/miss "
              f"{total['off'] / total['miss']:.2f}x of the cache-off server")
    print("total time p50 (s): " + ", ".join(f"{n} {total[n]:.1f}" for n in names)
          + (f"; on/off {total['on'] / total['off']:.2f}x" if "off" in total else "")
          + (f", on/compare {total['on'] / total['compare']:.2f}x" if "compare" in total else "")
          + (f"; errors {errors}" if any(errors.values()) else ""), flush=True)


def build_model(args) -> int:
    """The benchmark's models, random weights, built offline: `gpt2-small`
    (the engine issue's: 12 layers, 768 wide, vocabulary 8192), or a
    Llama-shaped one (llamagguf.SHAPES) as an HF folder and a GGUF beside it."""
    if args.shape == "gpt2-small":
        from .tinymodels import build_gpt2

        build_gpt2(args.folder, layers=12, width=768, vocab_size=8192, positions=1024)
        print(f"built {args.folder}")
        return 0
    from . import llamagguf

    path = llamagguf.build(args.folder, args.shape, args.gguf, seed=args.seed)
    print(f"built {args.folder} (HF folder, bfloat16) and {path} (the same weights, {args.gguf})")
    return 0


_WORDS = """the a of and to in is was for on that with as by at from it this an be are or
which have has not but all their new more when about can one time people year city world
house river garden music language computer science history market water light story
children school morning evening winter summer mountain village table window letter
question answer reason system network model server request quickly slowly carefully
bright quiet ancient modern simple difficult important beautiful strange hungry
walks builds reads writes opens closes finds carries remembers explains changes
under over between through before after during against without around""".split()


def _embed_texts(count: int, words: int, seed: int = 0) -> list[str]:
    """`count` distinct texts of `words` ordinary words, the same on every run."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(count)]


def _embed_once(session, url: str, payload: dict) -> tuple[float, int]:
    """(seconds, prompt tokens) of one request, the response parsed as a client would."""
    started = time.perf_counter()
    r = session.post(url + "/v1/embeddings", json=payload, timeout=600)
    if r.status_code != 200:
        raise SystemExit(f"HTTP {r.status_code}: {r.text[:300]}")
    body = r.json()
    assert len(body["data"]) == len(payload["input"])
    return time.perf_counter() - started, body["usage"]["prompt_tokens"]


def bench_embed(args) -> int:
    """One /v1/embeddings request of --inputs texts, timed end to end (the JSON
    body parsed), alternating with sentence-transformers encode of the same
    texts in this process when --compare-inprocess is given, so that noise on
    a shared machine hits both alike."""
    import statistics

    import requests

    texts = _embed_texts(args.inputs, args.words)
    payload = {"model": args.model, "input": texts, "encoding_format": args.encoding_format}
    reference = None
    if args.compare_inprocess:
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(args.compare_inprocess, local_files_only=True)
    server = _serve() if args.serve else None
    url = server.url if server else args.url
    served, inprocess = [], []
    try:
        if args.load or server is not None:
            _load_model(url, args.model)
        with requests.Session() as session:
            _, tokens = _embed_once(session, url, payload)  # warm-up
            if reference is not None:
                reference.encode(texts)
            for _ in range(args.repeat):
                served.append(_embed_once(session, url, payload)[0])
                if reference is not None:
                    started = time.perf_counter()
                    reference.encode(texts)
                    inprocess.append(time.perf_counter() - started)
    finally:
        if server is not None:
            server.stop()
    median = statistics.median(served)
    print(f"model {args.model}: {len(texts)} inputs of {args.words} words ({tokens} tokens) "
          f"per request, encoding_format {args.encoding_format}, {args.repeat} requests")
    print(f"llmhost     median {median:.3f}s  min {min(served):.3f}s per request")
    if inprocess:
        ref = statistics.median(inprocess)
        print(f"in-process  median {ref:.3f}s  min {min(inprocess):.3f}s per encode "
              "(sentence-transformers, same texts)")
        print(f"ratio (llmhost / in-process, medians): {median / ref:.2f}x")
    return 0


QUALITY_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.", "Give me three tips for better sleep.",
    "What is 12 times 7?", "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
    "Describe a cat to someone who has never seen one.", "What is the boiling point of water?",
    "List the planets of the solar system.", "Why is the sky blue?",
    "Write a short greeting for a birthday card.", "What does a CPU do?", "Name a famous painting.",
    "How do I make a cup of tea?", "What is the largest ocean?",
    "Tell me a fun fact about octopuses.", "What is machine learning?",
    "Suggest a name for a pet dog.", "How many days are in a leap year?"]


def degenerate(tokens: list[int], text: str) -> bool:
    """Garbage: a loop (one token six times in a row, a 3-token run three
    times, a 5-token run twice) or letters of another script than the English
    prompts' (the int8 failures seen here answered in Hebrew letters)."""
    if any(len(set(tokens[i:i + 6])) == 1 for i in range(len(tokens) - 5)):
        return True
    for n, times in ((3, 3), (5, 2)):
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        if grams and max(grams.count(g) for g in grams) >= times:
            return True
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(not c.isascii() for c in letters) > len(letters) // 4


def bench_quality(args) -> int:
    """Greedy answers to QUALITY_PROMPTS with each load option, loaded through
    llmhost's own loader, against float32: how many agree on the first 8
    tokens, how many are degenerate (a load option with any degenerate answer
    must not be offered), and batch-1 / batch-8 decode speed (all options stay
    loaded; with --rounds the speed runs alternate between them)."""
    import json

    import torch

    from ..config import Config
    from ..engine.errors import Refused
    from ..models.loading import LoadSpec, load

    def answers(model, tok) -> list[list[int]]:
        out = []
        for text in QUALITY_PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
            ids = torch.tensor([ids])
            with torch.inference_mode():
                new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=args.max_tokens, pad_token_id=tok.eos_token_id)
            out.append(new[0, ids.shape[1]:].tolist())
        return out

    def speed(model, tok, batch: int) -> float:
        ids = torch.tensor([tok(args.prompt)["input_ids"]] * batch)
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tok.eos_token_id)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, **kwargs)
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=32, min_new_tokens=32, **kwargs)
        return batch * 32 / (time.perf_counter() - started)

    loaded_all, reference = [], None
    for options in [{"dtype": "float32"}] + [json.loads(o) for o in args.options]:
        try:
            loaded = load(LoadSpec(model=args.model, **options), Config())
        except Refused as exc:  # an option llmhost does not offer
            loaded_all.append((options, None, exc.message))
            continue
        out = answers(loaded.model, loaded.tokenizer)
        reference = reference or out
        agree = sum(a[:8] == r[:8] for a, r in zip(out, reference))
        bad = [i for i, a in enumerate(out)
               if degenerate(a, loaded.tokenizer.decode(a, skip_special_tokens=True))]
        loaded_all.append((options, loaded, f"{agree}/{len(out)} | {len(bad)} {bad or ''}"))
    # speed: every option in turn, `--rounds` times, so the machine's noise hits all alike
    speeds: dict[int, list[list[float]]] = {i: [[], []] for i in range(len(loaded_all))}
    for _ in range(args.rounds if args.speed else 0):
        for i, (_, loaded, _) in enumerate(loaded_all):
            if loaded is not None:
                for j, batch in enumerate((1, 8)):
                    speeds[i][j].append(speed(loaded.model, loaded.tokenizer, batch))
    print("| load options | agree with float32 (first 8 tokens) | degenerate | tok/s batch 1 | "
          "tok/s batch 8 | weights MiB |\n| --- | --- | --- | --- | --- | --- |")
    for i, (options, loaded, agreement) in enumerate(loaded_all):
        if loaded is None:
            print(f"| {json.dumps(options)} | refused: {agreement} | | | | |")
            continue
        cells = [f"{_median(v):.1f}" + (f" ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else "")
                 if v else "-" for v in speeds[i]]
        print(f"| {json.dumps(options)} | {agreement} | {cells[0]} | {cells[1]} | "
              f"{loaded.memory_bytes / 2**20:.0f} |")
    if args.speed and args.rounds > 1:
        print(f"tok/s: medians (min-max) of {args.rounds} alternating rounds, HF generate, 32 tokens")
    return 0


def bench_int4_prefill(args) -> int:
    """int4 prefill: one forward over a prompt of each length, the int4
    kernel (LLMHOST_INT4_KERNEL's) against the weights dequantized per layer
    (the layers' dense_rows switched in the same process), alternated, CPU time
    of the process (with one thread, what the machine's other load disturbs
    least) and wall time."""
    import statistics

    import torch

    from ..config import Config
    from ..models import quantize
    from ..models.gguf import load_causal_lm
    from ..models.loading import int4_compute_dtype, int4_kernel

    kernel = int4_kernel(Config())
    dtype = int4_compute_dtype("auto", "generate", args.model, kernel)
    model = load_causal_lm(*os.path.split(args.model), dtype, int4=kernel).eval()
    print(f"{kernel} kernel, {dtype}, threads {torch.get_num_threads()}; {machine()}", flush=True)
    paths = {"int4 kernel": 10**9, "dequantized": 1}
    times: dict = {(p, n): [] for p in paths for n in args.tokens}

    def forward(n: int) -> tuple[float, float]:
        ids = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            wall, cpu = time.perf_counter(), time.process_time()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return time.process_time() - cpu, time.perf_counter() - wall

    layer = next(m for m in model.modules() if isinstance(m, quantize.Int4Linear))
    kept = type(layer).dense_rows
    try:
        for round_ in range(args.rounds + 1):   # round 0 warms up
            for n in args.tokens:
                for path, rows in paths.items():
                    type(layer).dense_rows = rows
                    took = forward(n)
                    if round_:
                        times[(path, n)].append(took)
    finally:
        type(layer).dense_rows = kept
    print(f"load average {os.getloadavg()[0]:.1f}\n| prompt tokens | int4 kernel ms (CPU / wall) | "
          f"dequantized ms (CPU / wall) | kernel / dequantized (CPU) |\n| --- | --- | --- | --- |")
    for n in args.tokens:
        k, d = ([statistics.median(t[i] for t in times[(p, n)]) * 1e3 for i in (0, 1)] for p in paths)
        print(f"| {n} | {k[0]:.0f} / {k[1]:.0f} | {d[0]:.0f} / {d[1]:.0f} | {k[0] / d[0]:.2f}x |")
    return 0


def _time_parts(scheduler, steps: int) -> dict[str, float]:
    """Mean seconds per decode step in the model's forward (logits to float32
    on the CPU included), in sampling and handing out tokens, and in the rest
    of the step (building ids, positions and the mask), timed by wrapping the
    scheduler's own methods on the instance."""
    spent = {"forward": 0.0, "sampling and hand-out": 0.0}

    def timed(name, fn):
        def call(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return call

    scheduler._forward = timed("forward", scheduler._forward)
    scheduler._sample = timed("sampling and hand-out", scheduler._sample)
    started = time.perf_counter()
    try:
        for _ in range(steps):
            scheduler._decode()
    finally:
        del scheduler._forward, scheduler._sample
    total = time.perf_counter() - started
    parts = {name: t / steps for name, t in spent.items()}
    parts["rest of the step"] = total / steps - sum(parts.values())
    parts["step"] = total / steps
    return parts


def bench_profile(args) -> int:
    """torch.profiler over the scheduler's own decode steps at each batch size,
    run in this thread (the scheduler thread stays idle): what share of a
    step is the model's matmuls, the KV-cache concatenation, the sampling."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..config import Config
    from ..engine.sampling import SamplingParams
    from ..engine.scheduler import Generation, GenerationRequest, Scheduler
    from ..models.loading import LoadSpec, load

    loaded = load(LoadSpec(model=args.model, **json.loads(args.load_options or "{}")), Config())
    scheduler = Scheduler("profile", loaded, Config())  # not started: its steps run here
    ids = loaded.tokenizer(args.prompt)["input_ids"]
    try:
        for batch in args.batch:
            gens = [Generation(GenerationRequest(ids, SamplingParams(max_tokens=10**6, temperature=0)),
                               "profile") for _ in range(batch)]
            scheduler._prefill(gens)
            for _ in range(args.warmup):
                scheduler._decode()
            spent = _time_parts(scheduler, args.steps)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                for _ in range(args.steps):
                    scheduler._decode()
                step = (time.perf_counter() - started) / args.steps
            print(f"== batch {batch}: {step * 1000:.1f} ms per profiled decode step, cache length "
                  f"{len(ids) + args.warmup + 2 * args.steps}, dtype {loaded.dtype}, "
                  f"{torch.get_num_threads()} threads")
            total = spent.pop("step")
            print(f"   unprofiled, timed around the calls: {total * 1000:.1f} ms per step: "
                  + ", ".join(f"{name} {t * 1000:.2f} ms ({t / total:.1%})"
                              for name, t in spent.items()))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                            max_name_column_width=40), flush=True)
            scheduler._reset_batch()
    finally:
        scheduler.close("profile over")
    return 0


def bench_prefill(args) -> int:
    """In-process time to first token of one long prompt at several prefill
    chunk sizes (LLMHOST_PREFILL_CHUNK), alternated in rounds, as ratios to the
    last size given (0: the whole prompt in one forward)."""
    import json

    from ..config import Config
    from ..engine.sampling import SamplingParams
    from ..engine.scheduler import GenerationRequest, Scheduler
    from ..models.loading import LoadSpec, load

    loaded = load(LoadSpec(model=args.model, **json.loads(args.load_options or "{}")), Config())
    ids = loaded.tokenizer(agent_system_prompt() * 4, add_special_tokens=False)["input_ids"]
    ids = ids[:args.tokens]
    schedulers = {c: Scheduler(f"chunk-{c}", loaded, Config(PREFIX_CACHE_MB=0,
                                                            PREFILL_CHUNK=c or len(ids))).start()
                  for c in args.chunks}
    times: dict[int, list[float]] = {c: [] for c in args.chunks}
    try:
        for _ in range(args.rounds):
            for chunk, scheduler in schedulers.items():
                started = time.perf_counter()
                gen = scheduler.submit(GenerationRequest(list(ids), SamplingParams(max_tokens=1,
                                                                                   temperature=0)))
                list(gen.events())
                times[chunk].append(time.perf_counter() - started)
    finally:
        for scheduler in schedulers.values():
            scheduler.close("bench over")
    print(f"{len(ids)}-token prompt, dtype {loaded.dtype}; {machine()}")
    base = _median(times[args.chunks[-1]])
    for chunk in args.chunks:
        print(f"chunk {chunk or 'none'}: {_median(times[chunk]) * 1000:.0f} ms "
              f"({_median(times[chunk]) / base:.2f}x)")
    return 0


# -- a prompt's prefill in this checkout against another's (issue 20) ------------------

# One process per checkout (its own imports): the Llama step where the checkout has one, else
# the model's forward, on a fresh cache; prints {tokens: best seconds} as its last line.
_FORWARD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import llmhost
assert llmhost.__file__.startswith(sys.argv[1] + "/"), f"llmhost came from {llmhost.__file__}"
import torch
from llmhost.config import TestConfig
from llmhost.engine.kvcache import growing_cache
from llmhost.models.loading import LoadSpec, load
model = load(LoadSpec(model=sys.argv[2], **json.loads(sys.argv[3])), TestConfig()).model
try:
    from llmhost.engine.llamastep import LlamaStep
    step = LlamaStep.for_model(model)
except ImportError:
    step = None
if step is None:
    def step(ids, mask, positions, cache):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, logits_to_keep=1).logits
best = {}
for n in map(int, sys.argv[5:]):
    ids = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(n))
    for _ in range(int(sys.argv[4])):
        cache = growing_cache(model.config)
        started = time.perf_counter()
        with torch.inference_mode():
            step(ids, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], cache)
        best[n] = min(best.get(n, 1e9), time.perf_counter() - started)
try:   # where this process's int4 kernel starts its wide tiles (measured at the load), if it has them
    from llmhost.models import q4kernel
    best["wide"] = q4kernel._build()[0].q4_wide_rows(0)
except (ImportError, AttributeError, TypeError):
    pass
print(json.dumps(best))
"""


def bench_prefill_against(args) -> int:
    """One forward over a prompt of each length on a fresh cache (the best of
    --repeat), in this checkout and in another (an older commit's worktree:
    `git worktree add /tmp/old COMMIT`), each in its own process, the two
    alternated in rounds; the times' ranges over the rounds, and other / this:
    its range and median over the rounds (on a noisy machine the median says
    more than either end)."""
    import json
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    checkouts = {"this checkout": here, "other": os.path.abspath(args.checkout)}
    if not os.path.isfile(os.path.join(checkouts["other"], "llmhost", "__init__.py")):
        raise SystemExit(f"other ({checkouts['other']}) failed: no llmhost package in it")
    times: dict = {(c, n): [] for c in checkouts for n in args.tokens}
    wide: dict = {c: [] for c in checkouts}
    for _ in range(args.rounds):
        for name, path in checkouts.items():
            done = subprocess.run([sys.executable, "-c", _FORWARD, path, args.model, args.load_options,
                                   str(args.repeat), *map(str, args.tokens)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} ({path}) failed:\n{done.stderr[-2000:]}")
            best = json.loads(done.stdout.strip().splitlines()[-1])
            wide[name].append(best.pop("wide", None))
            for n, took in best.items():
                times[(name, int(n))].append(took * 1000)
    print(f"{machine()}\nload options {args.load_options}; best of {args.repeat} forwards, "
          f"{args.rounds} alternated rounds; other: {checkouts['other']}\n"
          + "".join(f"{name}'s wide int4 tiles from (rows, each round's process): {rows}\n"
                    for name, rows in wide.items() if any(rows)) +
          f"| prompt tokens | this checkout | other | other / this | median |\n| --- | --- | --- | --- | --- |")
    for n in args.tokens:
        this, other = times[("this checkout", n)], times[("other", n)]
        ratios = [o / t for t, o in zip(this, other)]
        print(f"| {n} | {min(this):.1f}-{max(this):.1f} ms | {min(other):.1f}-{max(other):.1f} ms | "
              f"{min(ratios):.2f}-{max(ratios):.2f}x | {_median(ratios):.2f}x |")
    return 0


# -- one streamed client against the same load in-process (issue 20) ----------------

def _stream_chat_times(url: str, model: str, messages: list[dict], max_tokens: int, bias: dict,
                       session) -> dict:
    """One streamed chat: tokens (from usage), prompt tokens, and the seconds to
    the first and to the last content chunk."""
    import json

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": bias}
    started = time.perf_counter()
    first = last = float("nan")
    usage = {}
    with session.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter() - started
                first = first if first == first else last
            usage = chunk.get("usage") or usage
    return {"tokens": usage["completion_tokens"], "prompt": usage["prompt_tokens"],
            "first": first, "last": last}


class _Stamps:
    """A `generate` streamer that only notes when tokens come (the first put is
    the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _rates(tokens: int, first: float, last: float) -> tuple[float, float]:
    """(decode tok/s after the first token, tok/s over the whole request)."""
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return decode, tokens / last


def bench_stream(args) -> int:
    """One client streaming chat answers through gunicorn (a server this
    checkout starts; with --lone-row-threads, one server per value) against
    the same load decoding in this process, in alternating rounds: the
    streamed chat, llmhost's scheduler here (its events read by this thread:
    the engine without HTTP, threads by the scheduler's rule) and the loaded
    model's own `generate` (batch 1, all threads). Same prompt ids, greedy,
    EOS banned on every side. Prints medians and the ratios streamed /
    in-process."""
    import json

    import requests
    import torch

    from ..config import Config
    from ..engine import omp, start as start_engine
    from ..engine.sampling import SamplingParams
    from ..engine.scheduler import GenerationRequest, step_threads
    from ..models.loading import LoadSpec, load

    options = json.loads(args.load_options or "{}")
    loaded = load(LoadSpec(model=args.model, **options), Config())
    tok = loaded.tokenizer
    messages = [{"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    bias = _ban_eos(args)
    engine = start_engine("inprocess", loaded, Config())
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0,
                            logit_bias={int(k): float(v) for k, v in bias.items()})

    def scheduler_side() -> dict:
        started = time.perf_counter()
        times = [time.perf_counter() - started for _ in engine.submit(
            GenerationRequest(list(ids), params)).events()]
        return {"tokens": len(times), "first": times[0], "last": times[-1]}

    def generate_side() -> dict:
        stamps = _Stamps()
        prompt = torch.tensor([ids])
        started = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                  pad_token_id=tok.eos_token_id, streamer=stamps)
        times = [t - started for t in stamps.times[1:]]
        omp.release()   # this thread's OpenMP workers would slow the scheduler side's steps
        return {"tokens": len(times), "first": times[0], "last": times[-1]}

    omp.release()   # the load's
    servers: dict[str, object] = {}
    run = {}
    session = requests.Session()
    try:
        for value in args.lone_row_threads or [None]:
            name = "streamed" if value is None else f"streamed, lone row {value}t"
            env = {} if value is None else {"LLMHOST_LONE_ROW_THREADS": str(value)}
            server = servers[name] = _serve(env)
            _load_model(server.url, args.model, options)
            run[name] = partial(_stream_chat_times, server.url, args.model, messages,
                                args.max_tokens, bias, session)
        run["scheduler"], run["generate"] = scheduler_side, generate_side
        warm = {name: side() for name, side in run.items()}
        print(f"model {args.model}, load options {json.dumps(options)}: chat prompt "
              f"{len(ids)} tokens here, {next(iter(warm.values()))['prompt']} on the server; "
              f"{args.max_tokens} new tokens, greedy, EOS banned; {args.rounds} alternating rounds; "
              f"torch threads {torch.get_num_threads()}, rule's lone-row threads "
              f"{step_threads(1, engine.threads, engine.lone_row_threads)}",
              flush=True)
        sides: dict[str, list[dict]] = {name: [] for name in run}
        for number in range(args.rounds):
            for name in (list(run) if number % 2 == 0 else list(run)[::-1]):
                sides[name].append(run[name]())
    finally:
        session.close()
        for server in servers.values():
            server.stop()
        engine.close("benchmark over")
    medians = {}
    for name, runs in sides.items():
        rates = [_rates(r["tokens"], r["first"], r["last"]) for r in runs]
        medians[name] = (_median([r[0] for r in rates]), _median([r[1] for r in rates]))
        print(f"{name:26s}: decode {medians[name][0]:6.1f} tok/s, whole request "
              f"{medians[name][1]:6.1f} tok/s, first token "
              f"{_median([r['first'] for r in runs]) * 1000:5.0f} ms ({runs[0]['tokens']} tokens)")
    for name in servers:
        for ref in ("scheduler", "generate"):
            print(f"ratio {name} / {ref}: decode {medians[name][0] / medians[ref][0]:.2f}x, "
                  f"whole request {medians[name][1] / medians[ref][1]:.2f}x")
    return 0


def bench_threads(args) -> int:
    """Decode tok/s of llmhost's scheduler in this process, for each load
    option and number of rows, at each torch thread count, alternating the
    thread counts in blocks of --steps decode steps (--rounds blocks each;
    medians): the measurements behind the scheduler's thread rule
    (engine/scheduler.py step_threads, docs/performance.md)."""
    import json

    import torch

    from ..config import Config
    from ..engine.sampling import SamplingParams
    from ..engine.scheduler import Generation, GenerationRequest, Scheduler
    from ..models.loading import LoadSpec, load

    counts = args.threads or sorted({1, torch.get_num_threads()})
    print("| load options | rows | " + " | ".join(f"{t} thread{'s' * (t > 1)} tok/s" for t in counts)
          + f" | {counts[0]} / {counts[-1]} |\n|" + " --- |" * (len(counts) + 3), flush=True)
    for options in [json.loads(o) for o in args.options]:
        loaded = load(LoadSpec(model=args.model, **options), Config())
        scheduler = Scheduler("threads", loaded, Config())  # not started: its steps run here
        scheduler._threads = lambda rows: None              # the counts below are set by hand
        ids = loaded.tokenizer(args.prompt)["input_ids"]
        try:
            for rows in args.rows:
                gens = [Generation(GenerationRequest(ids, SamplingParams(max_tokens=10**6,
                                                                         temperature=0)), "t")
                        for _ in range(rows)]
                torch.set_num_threads(counts[-1])
                scheduler._prefill(gens)
                for _ in range(3):
                    scheduler._decode()
                spent: dict[int, list[float]] = {t: [] for t in counts}
                for number in range(args.rounds):
                    for t in (counts if number % 2 == 0 else counts[::-1]):
                        torch.set_num_threads(t)
                        scheduler._decode()                   # a step to settle the pool
                        started = time.perf_counter()
                        for _ in range(args.steps):
                            scheduler._decode()
                        spent[t].append((time.perf_counter() - started) / args.steps)
                rates = [rows / _median(spent[t]) for t in counts]
                print(f"| `{json.dumps(options)}` | {rows} | "
                      + " | ".join(f"{r:.1f}" for r in rates)
                      + f" | {rates[0] / rates[-1]:.2f}x |", flush=True)
                scheduler._reset_batch()
        finally:
            scheduler.close("benchmark over")
            torch.set_num_threads(counts[-1])
        del loaded, scheduler
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmhost.dev.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="/v1/completions load at several concurrency levels")
    gen.add_argument("--model", required=True, help="served id, or the folder to load with --load/--serve")
    gen.add_argument("--url", default="http://127.0.0.1:8000")
    gen.add_argument("--serve", action="store_true", help="start gunicorn from this checkout and load --model")
    gen.add_argument("--load", action="store_true", help="POST /v1/models --model first")
    gen.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    gen.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    gen.add_argument("--requests", type=int, default=3, help="requests per client")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--prompt", default="the quick brown fox jumps over the lazy dog and the "
                                         "model server answers")
    gen.add_argument("--no-stream", action="store_true")
    gen.add_argument("--sampling", metavar="JSON",
                     help='sampling fields every request sends instead of temperature 0 (greedy), '
                          'e.g. \'{"temperature": 0.7, "top_p": 0.9}\' (the server\'s defaults)')
    gen.add_argument("--compare-inprocess", metavar="FOLDER",
                     help="also run transformers generate in-process on FOLDER and print ratios")
    gen.add_argument("--compare-url", metavar="URL",
                     help="another OpenAI-compatible server (e.g. llama-cpp-python's) serving the "
                          "same model: run the same streaming chat workload on both, alternating")
    gen.add_argument("--compare-api", choices=["chat", "completions"], default="chat",
                     help="with --compare-url: the route both servers get (completions sends "
                          "token ids: for models without a chat template, or two llmhost builds)")
    gen.add_argument("--compare-model", help="model name to send to --compare-url (default: --model)")
    gen.add_argument("--compare-pid", type=int, help="pid of the --compare-url server, for its RSS (default: the "
                          "process listening on its port)")
    gen.add_argument("--pid", type=int, help="pid of the llmhost worker at --url, for its RSS")
    gen.add_argument("--label", help="with --compare-url: the table row's name (default: --load-options)")
    gen.add_argument("--load-options", metavar="JSON",
                     help='extra POST /v1/models fields, e.g. \'{"quantization": "int8"}\'')
    gen.add_argument("--rounds", type=int, default=3,
                     help="runs per level (alternating with in-process); medians are reported")
    gen.add_argument("--response-format", metavar="SCHEMA",
                     help="also run every round with response_format json_schema SCHEMA ('long': "
                          "a long array, so both runs generate max_tokens; or JSON; or @file) "
                          "and print the throughput ratio and the per-token mask cost")
    gen.set_defaults(func=bench_generate)
    build = sub.add_parser("build-model", help="build a benchmark model offline (random weights)")
    build.add_argument("folder", help="the HF folder to write (a Llama shape's GGUF goes beside it)")
    build.add_argument("--shape", default="gpt2-small", choices=["gpt2-small", *LLAMA_SHAPES],
                       help="gpt2-small: 12 x 768, vocabulary 8192; llama-1b: 16 x 2048, MLP "
                            "8192, 32/8 heads, SmolLM2's tokenizer (1.07B parameters); "
                            "smollm2-360m: 32 x 960, MLP 2560, 15/5 heads (SmolLM2-360M's shape); "
                            "llama-tiny: the same code path, 2 x 64 (for tests)")
    build.add_argument("--gguf", default="q4_0", choices=["q4_0", "q8_0"],
                       help="the Llama shapes' GGUF type (Linear weights; the embedding is Q8_0)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=build_model)
    qual = sub.add_parser("quality", help="greedy agreement of dtypes/quantizations with float32")
    qual.add_argument("--model", required=True, help="a model folder or .gguf file")
    qual.add_argument("--options", nargs="*", default=['{"dtype": "bfloat16"}', '{"quantization": "int8"}'],
                      help="JSON load options to compare with float32")
    qual.add_argument("--max-tokens", type=int, default=16)
    qual.add_argument("--no-speed", dest="speed", action="store_false",
                      help="agreement only (no batch-1/batch-8 timing)")
    qual.add_argument("--prompt", default="the quick brown fox jumps over the lazy dog and the "
                                          "model server answers")
    qual.add_argument("--rounds", type=int, default=1,
                      help="speed runs per option, alternating between the options (medians)")
    qual.set_defaults(func=bench_quality)
    int4 = sub.add_parser("int4-prefill", help="int4 prefill: the int4 kernel against dequantized weights")
    int4.add_argument("--model", required=True, help="a Q4_0 / Q4_1 .gguf file")
    int4.add_argument("--tokens", type=int, nargs="+", default=[40, 200, 1000])
    int4.add_argument("--rounds", type=int, default=3)
    int4.set_defaults(func=bench_int4_prefill)
    prof = sub.add_parser("profile", help="torch.profiler over the scheduler's decode steps")
    prof.add_argument("--model", required=True, help="a model folder or .gguf file")
    prof.add_argument("--load-options", metavar="JSON", help='e.g. \'{"dtype": "bfloat16"}\'')
    prof.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    prof.add_argument("--warmup", type=int, default=40, help="decode steps before profiling")
    prof.add_argument("--steps", type=int, default=10, help="decode steps profiled")
    prof.add_argument("--prompt", default="the quick brown fox jumps over the lazy dog and the "
                                          "model server answers")
    prof.set_defaults(func=bench_profile)
    fill = sub.add_parser("prefill", help="one long prompt's TTFT at several prefill chunk sizes")
    fill.add_argument("--model", required=True, help="a model folder or .gguf file")
    fill.add_argument("--load-options", metavar="JSON", help='e.g. \'{"dtype": "bfloat16"}\'')
    fill.add_argument("--tokens", type=int, default=1000)
    fill.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 0],
                      help="chunk sizes; 0: one forward (the ratios are to the last)")
    fill.add_argument("--rounds", type=int, default=3)
    fill.set_defaults(func=bench_prefill)
    vs = sub.add_parser("prefill-against", help="a prompt's prefill in this checkout against another's")
    vs.add_argument("checkout", help="the other checkout (e.g. git worktree add /tmp/old COMMIT)")
    vs.add_argument("--model", required=True, help="a model folder or .gguf file")
    vs.add_argument("--load-options", metavar="JSON", default='{"quantization": "int4"}')
    vs.add_argument("--tokens", type=int, nargs="+", default=[40, 128, 512])
    vs.add_argument("--repeat", type=int, default=5, help="forwards per length, the best kept")
    vs.add_argument("--rounds", type=int, default=3)
    vs.set_defaults(func=bench_prefill_against)
    strm = sub.add_parser("stream", help="one streamed chat client vs the same load decoding in-process")
    strm.add_argument("--model", required=True, help="a model folder or .gguf file")
    strm.add_argument("--load-options", metavar="JSON", help='e.g. \'{"quantization": "int4"}\'')
    strm.add_argument("--max-tokens", type=int, default=64)
    strm.add_argument("--rounds", type=int, default=4)
    strm.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    strm.add_argument("--tokenizer", help="tokenizer folder or .gguf (default: --model)")
    strm.add_argument("--lone-row-threads", type=int, nargs="+", metavar="N",
                      help="one server per value of LLMHOST_LONE_ROW_THREADS (default: one "
                           "server with the environment's setting)")
    strm.set_defaults(func=bench_stream)
    thr = sub.add_parser("threads", help="scheduler decode tok/s at 1 and all torch threads")
    thr.add_argument("--model", required=True, help="a model folder or .gguf file")
    thr.add_argument("--options", nargs="+", default=['{"quantization": "int4"}', '{"quantization": "int8"}',
                                                      '{"dtype": "float32"}', '{"dtype": "bfloat16"}'],
                     help="JSON load options, one table row each")
    thr.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    thr.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and all)")
    thr.add_argument("--steps", type=int, default=8, help="decode steps per block")
    thr.add_argument("--rounds", type=int, default=4, help="blocks per thread count, alternating")
    thr.add_argument("--prompt", default="the quick brown fox jumps over the lazy dog and the "
                                         "model server answers")
    thr.set_defaults(func=bench_threads)
    agent = sub.add_parser("agent", help="agent loops: per-turn TTFT with the prefix cache on/off")
    agent.add_argument("--model", required=True, help="served id, or the file/folder to load")
    agent.add_argument("--url", default="http://127.0.0.1:8000")
    agent.add_argument("--serve", action="store_true",
                       help="start two servers from this checkout (prefix cache on, off)")
    agent.add_argument("--load", action="store_true", help="POST /v1/models --model first")
    agent.add_argument("--load-options", metavar="JSON", help='e.g. \'{"dtype": "float32"}\'')
    agent.add_argument("--agents", type=int, nargs="+", default=[1, 4])
    agent.add_argument("--turns", type=int, default=10)
    agent.add_argument("--max-tokens", type=int, default=24)
    agent.add_argument("--rounds", type=int, default=2)
    agent.add_argument("--compare-url", metavar="URL", help="another server, e.g. llama-cpp-python's")
    agent.add_argument("--compare-model", help="model name to send to --compare-url")
    agent.add_argument("--skip", nargs="+", default=[], choices=["off", "miss"],
                       help="leave out columns: 'off' and 'miss' take 3-4x the 'on' column's time, "
                            "so a run against --compare-url alone can skip them")
    agent.set_defaults(func=bench_agent)

    ld = sub.add_parser("load", help="a model's load in a new server: an empty cache, then restarted")
    ld.add_argument("--model", nargs="+", required=True, help="model folders or .gguf files")
    ld.add_argument("--load-options", metavar="JSON", help='e.g. \'{"quantization": "int4"}\'')
    ld.add_argument("--rounds", type=int, default=2)
    ld.add_argument("--llama-server", metavar="BIN", help="also time this llama-server's start on each file")
    ld.set_defaults(func=bench_load)

    mem = sub.add_parser("memory", help="a worker's RSS split: imports, tokenizer, weights, caches")
    mem.add_argument("--model", required=True, help="a model folder or .gguf file")
    mem.add_argument("--options", nargs="+", default=['{"quantization": "int4"}', '{"dtype": "float32"}'],
                     help="JSON load options, one fresh interpreter each")
    mem.add_argument("--tokens", type=int, default=64, help="greedy tokens generated at the end")
    mem.add_argument("--batch", type=int, default=1, help="rows generating at the end")
    mem.set_defaults(func=bench_memory)

    emb = sub.add_parser("embed", help="/v1/embeddings: one request of many inputs")
    emb.add_argument("--model", required=True, help="served id, or the folder to load with --load/--serve")
    emb.add_argument("--url", default="http://127.0.0.1:8000")
    emb.add_argument("--serve", action="store_true", help="start gunicorn from this checkout and load --model")
    emb.add_argument("--load", action="store_true", help="POST /v1/models --model first")
    emb.add_argument("--inputs", type=int, default=256, help="inputs per request")
    emb.add_argument("--words", type=int, default=50, help="words per input")
    emb.add_argument("--repeat", type=int, default=5, help="timed requests")
    emb.add_argument("--encoding-format", choices=["float", "base64"], default="float")
    emb.add_argument("--compare-inprocess", metavar="FOLDER",
                     help="also time sentence-transformers encode of FOLDER in-process; print the ratio")
    emb.set_defaults(func=bench_embed)
    return parser


def main(argv=None) -> int:
    import signal

    # A terminated benchmark still stops the server it started (the `finally` blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
