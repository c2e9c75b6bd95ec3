"""The HTTP app: routes, the token check, body limits, metrics and the access log, error
bodies for requests that never reach a route, the OpenAPI docs (served from the
fastapi-offline package, so they work without a CDN) and the search page at ``/``."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem import __version__
from tandem.server.admission import Gate
from tandem.server.engine.engine import Engine
from tandem.server.http import compat, native
from tandem.server.http.calls import Calls, server_timing
from tandem.server.http.errors import PAYLOAD_TOO_LARGE, Dialect, body
from tandem.server.metrics import Metrics
from tandem.server.settings import Settings

log = logging.getLogger(__name__)
DOCS_STATIC = "/static-docs"
# Pages and probes, open to a GET without the token (a POST to / is TEI's API, and is not).
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/openapi.json"})
OPEN_METHODS = frozenset({"GET", "HEAD"})
DIALECTS = {
    "/v1/rerank": Dialect.COHERE,
    "/v2/rerank": Dialect.COHERE,
    "/v1/embed": Dialect.COHERE,
    "/v2/embed": Dialect.COHERE,
    "/": Dialect.TEI,  # a GET is the search page; a POST is TEI's embed or rerank
    "/rerank": Dialect.TEI,
    "/embed": Dialect.TEI,
    "/v1/embeddings": Dialect.OPENAI,
    "/embeddings": Dialect.OPENAI,
    "/v1/models": Dialect.OPENAI,
    "/models": Dialect.OPENAI,
}


def dialect_for(path: str) -> Dialect:
    return DIALECTS.get(path, Dialect.NATIVE)


def create_app(
    engine: Engine,
    *,
    settings: Settings,
    gate: Gate,
    metrics: Metrics,
    serving: Callable[[], bool],
) -> ASGIApp:
    app = FastAPI(
        title="Tandem",
        version=__version__,
        description=(
            "Two-stage retrieval: bi-encoder recall, cross-encoder rerank. The rerank and "
            "embedding routes speak Cohere's, Jina's, TEI's and OpenAI's shapes; `/v1/search` "
            "and the document routes mirror the gRPC API."
        ),
        docs_url=None,
        redoc_url=None,
    )
    calls = Calls(engine, gate=gate)
    routers = [compat.router(engine, calls), native.router(engine, calls, serving=serving)]
    for router in routers:
        app.include_router(router)
    _add_pages(app)
    _add_error_handlers(app)
    _declare_bearer_token(app)
    # The metrics' route label: a known path, else "other" (a scan of random paths must
    # not grow the label set without bound).
    known = {getattr(route, "path", "") for router in routers for route in router.routes}
    known |= {"/", "/docs", "/openapi.json"}
    return Door(
        app,
        token=settings.token,
        max_body_bytes=settings.max_message_bytes,
        metrics=metrics,
        known_paths=known,
    )


def _add_pages(app: FastAPI) -> None:
    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_STATIC, StaticFiles(directory=static), name="docs-static")
    page = resources.files("tandem.server.http").joinpath("page.html").read_text("utf-8")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Tandem API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
        )

    @app.get("/", include_in_schema=False)
    async def search_page() -> HTMLResponse:
        return HTMLResponse(page)


def _declare_bearer_token(app: FastAPI) -> None:
    """The schema says every route takes ``Authorization: Bearer``, so the docs page offers
    an Authorize button for a server started with a token."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            document.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            document["security"] = [{"bearer": []}]
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message = "; ".join(_problem(problem) for problem in error.errors()[:5])
        return JSONResponse(
            body(dialect_for(request.url.path), 400, f"invalid request: {message}"),
            status_code=400,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = (
            f"no route {request.method} {request.url.path}; the routes are listed at /docs"
            if error.status_code in (404, 405)
            else str(error.detail)
        )
        return JSONResponse(
            body(dialect_for(request.url.path), error.status_code, message),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )


def _problem(problem: Any) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    kind = problem.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', 'parse error')})"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}: remove it (see /docs for this route's fields)"
    if kind == "missing":
        return f"{where or 'the body'} is required"
    return f"{where or 'the body'}: {problem.get('msg', 'is invalid')}"


class Door:
    """What every HTTP request passes through, before any route: the bearer token, the body
    size limit (``max_message_bytes``, as for gRPC), the ``Server-Timing`` header of every
    reply, and once it is answered, the metrics by route and status, and the access log."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body_bytes: int,
        metrics: Metrics,
        known_paths: set[str],
    ) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        route = path if path in self.known_paths else "other"
        answered: list[int] = []

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
                # W3C Server-Timing (browsers' devtools show it): the server's share of the
                # call, so a client can tell its own and the network's time from ours.
                took = server_timing("total", (time.perf_counter() - started) * 1000)
                headers = [*message.get("headers", []), (b"server-timing", took.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                status, message, headers = refusal
                await _respond(send_counted, dialect_for(path), status, message, headers)
                return
            await self.app(scope, self._limited(receive), send_counted)
        finally:
            status = answered[0] if answered else 499  # the client left before an answer
            seconds = time.perf_counter() - started
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_latency.labels(route).observe(seconds)
            if status == 401:
                self.metrics.rejections.labels("unauthenticated").inc()
            level = logging.DEBUG if status < 400 or status == 429 else logging.INFO
            log.log(
                level,
                "call",
                extra={
                    "transport": "http",
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "ms": round(seconds * 1000, 3),
                },
            )

    def _refusal(self, scope: Scope, path: str) -> tuple[int, str, dict[str, str]] | None:
        headers = dict(scope["headers"])
        if (
            self.expected is not None
            and not (path in OPEN_PATHS and scope["method"] in OPEN_METHODS)
            and not path.startswith(DOCS_STATIC)
        ):
            sent = headers.get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                reason = "a bearer token is required" if not sent else "the bearer token is wrong"
                return (
                    401,
                    f"{reason}: send the header 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return PAYLOAD_TOO_LARGE, self._too_large(), {}
        return None

    def _too_large(self) -> str:
        return (
            f"the body is larger than {self.max_body_bytes} bytes (max_message_bytes): split "
            "the request"
        )

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # FastAPI turns any other error while reading a body into a 400.
                    raise HTTPException(PAYLOAD_TOO_LARGE, detail=self._too_large())
            return message

        return receive_limited


async def _respond(
    send: Send, dialect: Dialect, status: int, message: str, headers: dict[str, str]
) -> None:
    response = JSONResponse(body(dialect, status, message), status_code=status, headers=headers)
    await response({"type": "http"}, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}
