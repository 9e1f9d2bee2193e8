"""Nothing grows without bound (issue 9, section 5): each class is driven by a
bounded loop, and memory (worker RSS) or output size is measured before and
after. Unknown field names, DELETE of ids never loaded, invented HTTP
methods, and the series of unloaded models."""
import random
import string

import pytest
import requests


MiB = 1024 * 1024


@pytest.fixture(scope="module")
def bare(server):
    """The run's shared server (one gunicorn start less): every check here compares
    before and after on its own ids, so what other tests loaded does not matter."""
    return server


def rand(n=12) -> str:
    return "".join(random.choices(string.ascii_lowercase, k=n))


def test_unknown_fields_are_logged_and_kept_up_to_a_cap(bare):
    session = requests.Session()

    def send():
        body = {"model": "none", "messages": [{"role": "user", "content": "x"}],
                **{rand(16): 1 for _ in range(20_000)}}
        assert session.post(bare.url + "/v1/chat/completions", json=body, timeout=60).status_code == 404

    for _ in range(3):
        send()
    before = bare.worker_rss()
    for _ in range(20):
        send()
    grown = bare.worker_rss() - before
    assert grown < 20 * MiB, f"RSS grew {grown / MiB:.1f} MiB over 20 requests"
    assert bare.log().count("ignoring unknown field") <= 256


def test_delete_of_unknown_ids_keeps_nothing(bare):
    session = requests.Session()
    # long ids (3000 characters): a lock kept per id would keep ~3.6 MiB here
    for _ in range(200):
        session.delete(bare.url + "/v1/models/" + rand(3000), timeout=10)
    before = bare.worker_rss()
    for _ in range(1200):
        assert session.delete(bare.url + "/v1/models/" + rand(3000), timeout=10).status_code == 404
    grown = bare.worker_rss() - before
    assert grown < 2 * MiB, f"RSS grew {grown / MiB:.1f} MiB over 1200 DELETEs"


def test_metrics_labels_are_folded(bare):
    session = requests.Session()
    for method in ("GET", "POST"):
        session.request(method, bare.url + "/nowhere", timeout=10)
    session.request("BREW", bare.url + "/health", timeout=10)
    session.request("BREW", bare.url + "/" + rand(), timeout=10)
    session.get(bare.url + "/metrics", timeout=10)      # the scrape's own series
    size = len(session.get(bare.url + "/metrics", timeout=10).text)
    for _ in range(300):
        session.request(rand(8).upper(), bare.url + "/" + rand(), timeout=10)
    text = session.get(bare.url + "/metrics", timeout=10).text
    assert len(text) - size < 256, (size, len(text))  # counts grow by digits only
    assert 'method="other"' in text


def test_unloaded_models_leave_no_series(bare, tiny_models):
    for i in range(3):
        model_id = f"series-{i}"
        bare.load(tiny_models["llama"], id=model_id)
        r = requests.post(bare.url + "/v1/completions", timeout=60,
                          json={"model": model_id, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        assert model_id in requests.get(bare.url + "/metrics", timeout=10).text
        assert requests.delete(bare.url + f"/v1/models/{model_id}", timeout=60).status_code == 200
    text = requests.get(bare.url + "/metrics", timeout=10).text
    assert "series-" not in text
