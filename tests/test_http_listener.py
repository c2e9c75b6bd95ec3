"""The HTTP listener's sockets: Nagle off on every accepted connection.

With Nagle on, uvicorn's reply body (written after its headers) waited for the client's
delayed ACK, 40 ms on every call, /health included; asyncio turns it off only for sockets
whose proto says TCP, so a listening socket made with proto 0 kept it on.
"""

from __future__ import annotations

import asyncio
import socket

from starlette.types import Receive, Scope, Send

from tandem.server.http.listener import HttpListener


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def nagle_settings_of_accepted_connections() -> list[int]:
    listener = HttpListener(hello, host="127.0.0.1", port=0, drain_seconds=1.0)
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: tandem\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
        settings = [
            connection.transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY
            )
            for connection in listener.server.server_state.connections
        ]
        writer.close()
        await writer.wait_closed()
        return settings
    finally:
        await listener.stop(grace_s=1.0)


def test_accepted_connections_send_without_waiting_for_acks() -> None:
    settings = asyncio.run(nagle_settings_of_accepted_connections())
    assert settings, "the connection was not seen by the server"
    assert all(settings), f"TCP_NODELAY off on an accepted connection: {settings}"
