"""JSON bodies hold Unicode text only: a route class that refuses a lone UTF-16 surrogate.

JSON's escapes can spell half of a surrogate pair (``"\\ud800"``), and Python's parser
accepts one (raw CESU-8 bytes too), but it is no Unicode text: SQLite, the tokenizers and
every UTF-8 encoder refuse it, so it surfaced as a 500 deep in a call. gRPC refuses its
counterpart (a string that is not UTF-8) before any handler runs; this refuses it as early,
as a body that is not valid JSON (400, in the route's own error shape).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

# What a body needs to hold a surrogate: its escape, or its raw bytes (0xED 0xA0-0xBF, which
# a single-byte scan finds at memory speed). One pass of the escape's pattern (its literal
# prefix is searched fast) costs half what parsing does: 0.1 ms on a 190 KB upsert. The exact
# check, which costs more, runs only where either is found.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_RAW_SURROGATE_LEAD = b"\xed"


class UnicodeRoute(APIRoute):
    """FastAPI's route, reading JSON bodies through ``UnicodeRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(UnicodeRequest(request.scope, request.receive))

        return checked


class UnicodeRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            value = json.loads(body)
            if _RAW_SURROGATE_LEAD in body or _SURROGATE_ESCAPE.search(body):
                _refuse_surrogates(value, body)
            self._json = value
        return self._json


def _refuse_surrogates(value: Any, body: bytes) -> None:
    """Raises ``JSONDecodeError`` (which FastAPI answers as a body that is not JSON) where a
    string of ``value``, key or value, holds a lone surrogate. A pair is one character once
    parsed, so only a lone half fails to encode."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(error.object[error.start])
        raise json.JSONDecodeError(
            f"a string holds a lone UTF-16 surrogate (\\u{code:04x}), which is not Unicode "
            "text: send UTF-8, or both halves of the pair",
            body.decode("utf-8", "replace"),
            0,
        ) from error
