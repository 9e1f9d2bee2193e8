"""CORS for the origins in LLMHOST_CORS_ORIGINS, with flask-cors (the maintained
Flask extension for it: preflights, Vary, exposed headers)."""
from __future__ import annotations

from flask import Flask


def init_app(app: Flask, origins: list[str]) -> None:
    """Allowed origins get CORS headers; preflights need no key (browsers never
    send credentials on them) and allow the headers OpenAI clients send."""
    if not origins:
        return
    from flask_cors import CORS
    CORS(app, origins=origins, allow_headers=["Authorization", "Content-Type"],
         expose_headers=["X-Request-Id"], max_age=600)
