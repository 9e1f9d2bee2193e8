"""Images in chat messages, for vision-language models: `image_url` parts
(OpenAI chat) are checked and decoded here, before anything reaches a model.

A data URL is always accepted; an http(s) URL only with LLMHOST_IMAGE_URLS=1,
fetched with a size limit, a time limit and every hop (redirects are followed
by hand) checked to be a public address, so a client cannot make the server
read its own network. Pillow decodes (the library transformers' image
processors take); an image's size is read from its header and checked against
LLMHOST_MAX_IMAGE_PIXELS before its pixels are decoded.
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

from ..engine.errors import InvalidInput

REDIRECTS = 3


def _bad(where: str, why: str) -> InvalidInput:
    return InvalidInput(f"Invalid value for '{where}': {why}", param=where, code="invalid_image")


def _data_url(url: str, where: str, limit: int) -> bytes:
    head, _, data = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise _bad(where, "a data URL must look like data:image/png;base64,<data>.")
    if len(data) > limit * 4 // 3 + 4:
        raise _bad(where, f"the image is larger than {limit} bytes (LLMHOST_MAX_IMAGE_BYTES).")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(where, "the data URL's base64 data is not valid.")


def _public(host: str, port: int, where: str) -> None:
    """Every address `host` resolves to must be a public one."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise _bad(where, f"the host {host!r} cannot be resolved.")
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise _bad(where, f"the host {host!r} is a private or local address; only public "
                              "image URLs are fetched.")


def _fetch(url: str, where: str, config) -> bytes:
    import requests

    limit, timeout = config.MAX_IMAGE_BYTES, config.IMAGE_FETCH_TIMEOUT
    for _ in range(REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad(where, "an image URL must be an http(s) or data URL.")
        _public(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), where)
        try:
            with requests.get(url, stream=True, allow_redirects=False, timeout=timeout) as r:
                if r.is_redirect and r.headers.get("location"):
                    url = urljoin(url, r.headers["location"])
                    continue
                if r.status_code != 200:
                    raise _bad(where, f"fetching the image answered HTTP {r.status_code}.")
                body = bytearray()
                for chunk in r.iter_content(64 * 1024):
                    body += chunk
                    if len(body) > limit:
                        raise _bad(where, f"the image is larger than {limit} bytes "
                                          "(LLMHOST_MAX_IMAGE_BYTES).")
                return bytes(body)
        except requests.RequestException as exc:
            raise _bad(where, f"the image could not be fetched ({type(exc).__name__}).")
    raise _bad(where, f"more than {REDIRECTS} redirects.")


def load_image(url: str, where: str, config):
    """The decoded RGB image of an `image_url` part's URL; a 400 naming
    `where` when it is not an image, too large, or not allowed."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url:
        raise _bad(where, "must be an object with a 'url' string.")
    if url.startswith("data:"):
        raw = _data_url(url, where, config.MAX_IMAGE_BYTES)
    elif url.startswith(("http://", "https://")):
        if not config.IMAGE_URLS:
            raise _bad(where, "this server takes images as data URLs only (http(s) image URLs "
                              "are off: LLMHOST_IMAGE_URLS).")
        raw = _fetch(url, where, config)
    else:
        raise _bad(where, "an image URL must be a data URL (data:image/png;base64,...) or "
                          "http(s).")
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > config.MAX_IMAGE_PIXELS:
            raise _bad(where, f"the image has {width}x{height} pixels, more than "
                              f"{config.MAX_IMAGE_PIXELS} (LLMHOST_MAX_IMAGE_PIXELS).")
        return image.convert("RGB")
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad(where, f"the data is not an image Pillow can read ({type(exc).__name__}).")


def chat_images(messages: list[dict], config, param: str = "messages") -> dict:
    """Decode every `image_url` part of chat `messages` (with the part's name
    in errors, e.g. ``messages[0].content[1].image_url``); {(message, part):
    image}. At most LLMHOST_MAX_IMAGES."""
    images = {}
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if part.get("type") != "image_url":
                continue
            where = f"{param}[{i}].content[{j}].image_url"
            if len(images) >= config.MAX_IMAGES:
                raise _bad(where, f"more than {config.MAX_IMAGES} images in one request "
                                  "(LLMHOST_MAX_IMAGES).")
            images[i, j] = load_image((part.get("image_url") or {}).get("url"), where, config)
    return images
