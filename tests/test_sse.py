"""SSE framing and client-disconnect detection, in-process."""
import socket

from llmhost import create_app
from llmhost.http import sse
from llmhost.config import TestConfig
from llmhost.http.errors import APIError


def _body(chunks) -> list[str]:
    app = create_app(TestConfig())
    with app.test_request_context():
        response = sse.stream(chunks)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    return "".join(response.response).split("\n\n")


def test_events_then_done():
    assert _body(iter([{"a": 1}, {"b": "é🙂"}])) == ['data: {"a":1}', 'data: {"b":"é🙂"}',
                                                     "data: [DONE]", ""]


def test_error_after_start_is_an_event_then_done():
    def chunks():
        yield {"a": 1}
        raise APIError(503, "The model 'x' was unloaded.", code="model_unloaded")

    events = _body(chunks())
    assert events[1].startswith('data: {"error":') and "model_unloaded" in events[1]
    assert events[2:] == ["data: [DONE]", ""]


def test_unexpected_error_hides_the_traceback():
    def chunks():
        yield {"a": 1}
        raise KeyError("secret detail")

    events = _body(chunks())
    assert '"server_error"' in events[1] and "secret" not in events[1]
    assert events[2] == "data: [DONE]"


def test_closing_the_stream_closes_the_source():
    closed = []

    def chunks():
        try:
            yield {"a": 1}
            yield {"b": 2}
        finally:
            closed.append(True)

    app = create_app(TestConfig())
    with app.test_request_context():
        body = sse.stream(chunks()).response
    next(iter(body))
    body.close()                       # what the server does when the client is gone
    assert closed == [True]


def test_client_disconnected():
    assert sse.client_disconnected({}) is False
    ours, theirs = socket.socketpair()
    try:
        assert sse.client_disconnected({"gunicorn.socket": ours}) is False
        theirs.close()
        assert sse.client_disconnected({"gunicorn.socket": ours}) is True
    finally:
        ours.close()


def test_named_events_without_done():
    """The Responses API's framing: `event: <type>` lines, no [DONE]; an error
    after the start is an `error` event."""
    app = create_app(TestConfig())

    def chunks():
        yield {"type": "response.created", "sequence_number": 0}
        raise APIError(503, "gone")

    with app.test_request_context():
        response = sse.stream(chunks(), named=True, done=False)
    events = "".join(response.response).split("\n\n")
    assert events[0] == ('event: response.created\n'
                         'data: {"type":"response.created","sequence_number":0}')
    assert events[1].startswith("event: error\ndata: {\"error\":") and events[2:] == [""]
