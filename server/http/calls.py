"""How an HTTP route runs one engine call: admit it, run it, release it, and turn an error
into the status and body of the shape the route speaks.

The same ``Gate`` admits gRPC and HTTP calls, so the two doors share one limit: an overload
shed on one is shed on both, and the adaptive limit learns from both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from tandem.server.admission import Gate
from tandem.server.engine.engine import Call, Engine
from tandem.server.http.errors import Dialect, body, describe, retry_after


def error_response(dialect: Dialect, error: BaseException) -> JSONResponse:
    status, message = describe(error)
    return JSONResponse(
        body(dialect, status, message), status_code=status, headers=retry_after(error)
    )


class Calls:
    def __init__(self, engine: Engine, *, gate: Gate) -> None:
        self.engine = engine
        self.gate = gate

    async def run(
        self,
        dialect: Dialect,
        work: Callable[[Call], Awaitable[Any]],
        *,
        queued: bool,
    ) -> Response:
        """``work``'s reply as JSON (a model, or anything JSONResponse takes), or the error."""
        call = Call()
        try:
            reply = await self.gate.run(
                call, work, queued=queued, expected_wait_s=self.engine.expected_wait()
            )
        except Exception as error:
            return timed(error_response(dialect, error), call.elapsed_ms())
        took_ms = call.elapsed_ms()  # before the reply is rendered, as gRPC's total_ms
        if isinstance(reply, Response):
            return timed(reply, took_ms)
        if isinstance(reply, BaseModel):
            # Fields left unset are left out, as the originals do (Cohere's `document`).
            reply = reply.model_dump(mode="json", exclude_none=True, by_alias=True)
        return timed(JSONResponse(reply), took_ms)


def timed(response: Response, call_ms: float) -> Response:
    """Adds the call's own time to ``Server-Timing`` (``call``, beside the door's ``total``):
    from admission to the engine's answer, the span gRPC replies give as ``timings.total_ms``,
    so a client can tell what each door costs around the same work."""
    response.headers.append("server-timing", server_timing("call", call_ms))
    return response


def server_timing(metric: str, ms: float) -> str:
    """One W3C ``Server-Timing`` entry; the door's ``total`` and the call's ``call`` alike."""
    return f"{metric};dur={ms:.3f}"
