"""The bearer-token check, one piece for the standalone server (its interceptor) and each Ray replica."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

UNAUTHENTICATED_MESSAGE = (
    "missing or wrong bearer token: send metadata 'authorization: Bearer <token>' (the server's --token / IN2N_TOKEN)"
)
"""What a call without the right token is told (with UNAUTHENTICATED)."""


class BearerToken:
    """The token every call must carry as metadata `authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def accepts(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """True when `metadata` (a call's invocation metadata) carries the token."""
        given = b""
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        return hmac.compare_digest(given, self._expected)
