"""Model aliases: the load option `aliases` and LLMHOST_MODEL_ALIASES reach a
loaded model on every API, /v1/models says what each alias points to, a
loaded id always wins over an alias, and answers carry the name the client
sent. In-process (Flask test client) with the tiny GPT-2."""
import pytest

from llmhost.config import Config


@pytest.fixture()
def web(make_app, local_gpt2, tiny_models):
    app = make_app(MODEL_ALIASES={"gpt-4o": local_gpt2, "ghost": "not-loaded"})
    client = app.test_client()
    r = client.post("/v1/models", json={"model": tiny_models["gpt2"], "id": "aliased-gpt2",
                                         "aliases": ["claude-sonnet-4-5", local_gpt2]})
    assert r.status_code == 201, r.json
    return client


def _chat(web, model: str):
    return web.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "Hi"}]})


def test_setting_and_load_option_aliases_reach_the_model(web, local_gpt2):
    r = _chat(web, "gpt-4o")
    assert r.status_code == 200 and r.json["model"] == "gpt-4o"        # the name sent
    r = _chat(web, "claude-sonnet-4-5")
    assert r.status_code == 200 and r.json["model"] == "claude-sonnet-4-5"
    r = web.get("/v1/models/claude-sonnet-4-5")
    assert r.json["id"] == "aliased-gpt2"
    r = web.post("/v1/messages", json={"model": "claude-sonnet-4-5", "max_tokens": 2,
                                       "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json["model"] == "claude-sonnet-4-5"
    r = web.post("/api/chat", json={"model": "gpt-4o", "stream": False, "options": {"num_predict": 2},
                                    "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json["model"] == "gpt-4o"
    r = web.post("/v1/responses", json={"model": "gpt-4o", "input": "Hi", "max_output_tokens": 2,
                                        "store": False})
    assert r.status_code == 200 and r.json["model"] == "gpt-4o"


def test_an_alias_never_shadows_a_loaded_id(web, local_gpt2):
    """aliased-gpt2 lists local-gpt2 as an alias, but local-gpt2 is a loaded
    id: it keeps reaching its own model."""
    assert web.get(f"/v1/models/{local_gpt2}").json["id"] == local_gpt2
    listed = {m["id"]: m for m in web.get("/v1/models").json["data"]}
    assert listed[local_gpt2].get("alias_of") is None
    assert listed["claude-sonnet-4-5"]["alias_of"] == "aliased-gpt2"
    assert listed["gpt-4o"]["alias_of"] == local_gpt2
    assert listed["aliased-gpt2"]["aliases"] == ["claude-sonnet-4-5"]
    assert listed[local_gpt2]["aliases"] == ["gpt-4o"]
    assert "ghost" not in listed                     # its model is not loaded
    # Unloading goes by id only: an alias unloads nothing.
    assert web.delete("/v1/models/claude-sonnet-4-5").status_code == 404
    assert web.delete("/v1/models/aliased-gpt2").status_code == 200
    assert _chat(web, "claude-sonnet-4-5").status_code == 404


def test_unknown_alias_target_is_a_404(web):
    r = _chat(web, "ghost")
    assert r.status_code == 404 and "not-loaded" in r.json["error"]["message"]


def test_setting_parses():
    config = Config({"LLMHOST_MODEL_ALIASES": "gpt-4o=smollm2, claude-sonnet-4-5 = smollm2"})
    assert config.MODEL_ALIASES == {"gpt-4o": "smollm2", "claude-sonnet-4-5": "smollm2"}
    with pytest.raises(ValueError, match="alias=model"):
        Config({"LLMHOST_MODEL_ALIASES": "gpt-4o"})
