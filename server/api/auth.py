"""The bearer-token check for gRPC: every RPC but health must send the token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from tandem.server.api.status import rich_status
from tandem.server.engine.errors import Unauthenticated

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every RPC but health must send ``authorization: Bearer <token>``.

    The comparison is constant-time (``hmac.compare_digest``); the token is never logged.
    """

    def __init__(self, token: str, *, on_reject: Callable[[str], None]) -> None:
        self.expected = f"Bearer {token}".encode()
        self.on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        sent = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                sent = value
        if hmac.compare_digest(sent.encode("utf-8", "replace"), self.expected):
            return await continuation(details)
        self.on_reject(details.method)
        handler = await continuation(details)
        reason = "a bearer token is required" if not sent else "the bearer token is wrong"
        return _denied(handler, f"{reason}: send metadata 'authorization: Bearer <token>'")


def _denied(handler: Handler | None, message: str) -> Handler:
    status = rich_status(Unauthenticated(message))

    async def deny(request: Any, context: Context) -> None:
        await context.abort(status.code, status.details)

    if handler is None or not handler.request_streaming:
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)
