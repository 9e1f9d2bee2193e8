"""Load progress: models show as loading while they load, POST /v1/models with
stream: true answers progress events, what is on disk under LLMHOST_MODEL_DIRS."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from support import validate


def test_preload_shows_loading_with_progress(quickstart):
    """While README's server loaded SmolLM2, GET /v1/models and /v1/models/smollm2
    listed it as loading, with a phase and, once tensors were counted, a fraction."""
    seen = [m for m in quickstart.observed if m["id"] == "smollm2"]
    assert seen, "no GET during the load saw smollm2 loading"
    for model in seen:
        validate(model, "Model")
        assert model["status"] == "loading" and model["phase"] in ("resolving", "downloading", "loading")
    fractions = [m["fraction"] for m in seen if "fraction" in m]
    assert fractions and all(0 <= f <= 1 for f in fractions), seen[-3:]
    assert any(m.get("total_tensors") == 272 for m in seen)  # SmolLM2's GGUF holds 272 tensors
    log = quickstart.log()
    assert "loading smollm2 from " in log and "process RSS" in log
    assert "loaded smollm2 in " in log


def _events(response) -> list:
    text = response.get_data(as_text=True)
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), text
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[6:]) for b in blocks[:-1]]


def test_streamed_load_events(client, tiny_models, caplog):
    from llmhost.models.registry import registry

    caplog.set_level(logging.INFO, logger="llmhost")
    r = client.post("/v1/models", json={"model": tiny_models["llama"], "id": "streamed", "stream": True})
    try:
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        events = _events(r)
        *progress, model = events
        assert progress and all(e["object"] == "model.load.progress" and e["id"] == "streamed"
                                and e["status"] == "loading" for e in progress)
        validate(model, "Model")
        assert model["status"] == "loaded" and model["id"] == "streamed"
        assert client.get("/v1/models/streamed").get_json()["status"] == "loaded"
        messages = [rec.getMessage() for rec in caplog.records]
        assert any(m.startswith("loading streamed from ") for m in messages)
        assert any(m.startswith("loaded streamed in ") and "MiB" in m for m in messages)
        # the first chat's one-time work done by the load (api/loads.warm): the prompt
        # check's longest token known, read from the backend a token at a time, what the
        # vocabulary's listing gives
        tokenizer = registry.find("streamed").tokenizer
        assert tokenizer._llmhost_longest_token == max(len(t) for t in tokenizer.get_vocab()) > 1
        # Already loaded: no progress, just the Model.
        again = _events(client.post("/v1/models", json={"model": tiny_models["llama"], "id": "streamed",
                                                        "stream": True}))
        assert [e["object"] for e in again] == ["model"]
    finally:
        registry.unload("streamed")


def test_streamed_load_error_is_an_event(client, tmp_path):
    r = client.post("/v1/models", json={"model": str(tmp_path / "missing"), "stream": True})
    assert r.status_code == 200
    last = _events(r)[-1]
    validate(last, "ErrorResponse")
    assert last["error"]["code"] == "model_not_found" and last["error"]["param"] == "model"
    listed = client.get("/v1/models").get_json()["data"]
    assert not [m for m in listed if m["status"] == "loading"]  # nothing left "loading"


def test_stream_flag_is_validated(client, tiny_models):
    r = client.post("/v1/models", json={"model": tiny_models["gpt2"], "stream": "yes please"})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "stream"


def test_cached_lists_files_and_folders_under_model_dirs(tmp_path, tiny_models, smollm2_gguf):
    from llmhost import create_app
    from llmhost.config import TestConfig
    from llmhost.models.registry import registry

    root = tmp_path / "models"
    shutil.copytree(tiny_models["gpt2"], root / "team" / "gpt2")
    os.symlink(smollm2_gguf, root / "smol.gguf")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    client = create_app(TestConfig(MODEL_DIRS=[str(root)])).test_client()

    body = client.get("/v1/models?include=cached").get_json()
    validate(body, "ListModelsResponse")
    local = {m["id"]: m for m in body["data"] if m["owned_by"] == "local"}
    folder, gguf = str(root / "team" / "gpt2"), str(root / "smol.gguf")
    assert set(local) == {os.path.realpath(folder), gguf}
    assert local[gguf]["format"] == "gguf" and local[gguf]["size_on_disk"] > 50_000_000
    assert local[os.path.realpath(folder)]["format"] == "folder"
    # The id listed is what POST /v1/models takes; once loaded, it is listed as loaded only.
    r = client.post("/v1/models", json={"model": os.path.realpath(folder)})
    assert r.status_code == 201, r.get_json()
    try:
        statuses = [m["status"] for m in client.get("/v1/models?include=cached").get_json()["data"]
                    if m["id"] == os.path.realpath(folder)]
        assert statuses == ["loaded"]
    finally:
        registry.unload(os.path.realpath(folder))
    plain = client.get("/v1/models").get_json()["data"]  # without include: loaded only
    assert not [m for m in plain if m["status"] == "cached"]


@pytest.mark.parametrize("path", ["/v1/models/nothing-loading"])
def test_unknown_model_still_404(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"


def test_hub_download_bytes_feed_the_tracker():
    """snapshot_download reports its bytes to the tqdm class it is given (no Hub
    here: the class is driven as huggingface_hub drives it)."""
    from llmhost.models import progress

    tracker = progress.Tracker("org/model", "org/model")
    bar = progress.hub_tqdm(tracker)(desc="Downloading bytes", total=0, unit="B", unit_scale=True,
                                      disable=True)
    bar.total = 1000  # huggingface_hub grows the total as it learns the files' sizes
    bar.update(250)
    files = progress.hub_tqdm(tracker)(desc="Fetching 3 files", total=3, disable=True)
    files.update(1)  # file counts are not bytes
    info = tracker.to_dict()
    assert info["phase"] == "downloading" and info["downloaded_bytes"] == 250
    assert info["download_total_bytes"] == 1000 and info["fraction"] == 0.25
