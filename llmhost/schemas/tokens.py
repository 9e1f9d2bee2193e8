"""What the request schemas share about token-id inputs."""
from __future__ import annotations


def is_token_ids(value) -> bool:
    """A list of ints (a token-id prompt or input); JSON booleans are not ids."""
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)
