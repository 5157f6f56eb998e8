"""A small HTTP/1.1 server for the admin API, on the supervisor's event loop.

Not on the hot path: one request at a time per connection, bodies buffered (bounded), httptools
for parsing. Every answer has a length (or is chunked), errors are SPEC §4 JSON, and every
endpoint except the public ones needs `Authorization: Bearer <admin.token>` when a token is set.
"""
from __future__ import annotations

import asyncio
import hmac
import re
import sys
import traceback
from email.utils import formatdate
from http import HTTPStatus
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qsl, unquote

import httptools
import msgspec

MAX_CONNECTIONS = 256


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class AdminRequest:
    def __init__(self, method: str, path: str, query: dict, headers: dict, body: bytes, client: str):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.body, self.client = body, client
        self.params: dict[str, str] = {}

    def json(self):
        if not self.body:
            raise HTTPError(400, "invalid_json", "the request needs a JSON body")
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError as exc:
            raise HTTPError(400, "invalid_json", f"invalid JSON: {exc}") from None


class Response:
    def __init__(self, status: int = 200, body: bytes | str = b"", headers: dict | None = None,
                 content_type: str | None = None, stream: AsyncIterator[bytes] | None = None):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = dict(headers or {})
        if content_type:
            self.headers["content-type"] = content_type
        self.stream = stream

    @classmethod
    def json(cls, obj, status: int = 200, headers: dict | None = None) -> "Response":
        return cls(status, msgspec.json.encode(obj), {"cache-control": "no-store", **(headers or {})},
                   "application/json")

    @classmethod
    def stream_of(cls, agen: AsyncIterator[bytes], content_type: str = "text/event-stream",
                  headers: dict | None = None) -> "Response":
        return cls(200, b"", {"cache-control": "no-cache", **(headers or {})}, content_type, agen)


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return Response.json({"error": {"status": status, "code": code, "message": message}}, status, headers)


Handler = Callable[[AdminRequest], Awaitable[object]]


class AdminApp:
    """Routes `METHOD /path/{param}` to handlers; checks the bearer token first."""

    def __init__(self, *, token: str | None, public=frozenset()):
        self.token = token
        self.public = set(public)
        self._routes: list[tuple[str, str, re.Pattern, Handler]] = []

    def route(self, method: str, pattern: str):
        regex = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern)) + "$")

        def register(handler: Handler) -> Handler:
            self._routes.append((method, pattern, regex, handler))
            return handler
        return register

    def routes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _, _ in self._routes]

    async def handle(self, req: AdminRequest) -> Response:
        try:
            self._authorize(req)
            allowed = []
            for method, _, regex, handler in self._routes:
                m = regex.match(req.raw_path)
                if m is None:
                    continue
                if method != req.method and not (method == "GET" and req.method == "HEAD"):
                    allowed.append(method)
                    continue
                req.params = {k: unquote(v) for k, v in m.groupdict().items()}
                result = await handler(req)
                return result if isinstance(result, Response) else Response.json(result)
            if allowed:
                raise HTTPError(405, "method_not_allowed", f"{req.method} is not allowed here",
                                {"allow": ", ".join(sorted(set(allowed)))})
            raise HTTPError(404, "not_found", f"no admin endpoint {req.path}")
        except HTTPError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except Exception:                 # a bug in a handler: log it, keep serving
            traceback.print_exc(file=sys.stderr)
            return error_response(500, "internal_error", "internal error (see the gateway log)")

    def _authorize(self, req: AdminRequest) -> None:
        if self.token is None or (req.method if req.method != "HEAD" else "GET", req.path) in self.public:
            return
        given = req.headers.get("authorization", "")
        scheme, _, credential = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(),
                                                                  self.token.encode()):
            raise HTTPError(401, "unauthorized", "this endpoint needs the admin token",
                            {"www-authenticate": 'Bearer realm="fastgw-admin"'})


class _Connection(asyncio.Protocol):
    def __init__(self, server: "AdminServer"):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = None
        self._reset()

    def _reset(self):
        self.url, self.headers, self.body, self.body_size = b"", {}, [], 0

    def connection_made(self, transport):
        self.transport = transport
        if len(self.server.connections) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self.server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.queue.put_nowait((400, "upgrades are not supported here"))
        except httptools.HttpParserError as exc:
            self.queue.put_nowait((400, f"malformed request: {exc}"))
            self.transport.pause_reading()

    # httptools callbacks
    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self):
        if self.headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")   # RFC 9110 §10.1.1

    def on_body(self, body):
        self.body_size += len(body)
        if self.body_size <= self.server.max_body:
            self.body.append(body)

    def on_message_complete(self):
        if self.body_size > self.server.max_body:
            self.queue.put_nowait((413, "the request body is too large"))
            self.transport.pause_reading()
            return
        url = httptools.parse_url(self.url)
        raw_path = url.path.decode("latin-1")
        req = AdminRequest(self.parser.get_method().decode(), unquote(raw_path),
                           dict(parse_qsl((url.query or b"").decode("latin-1"))), self.headers,
                           b"".join(self.body), self.client)
        req.raw_path = raw_path
        req.keep_alive = self.parser.should_keep_alive()
        req.http11 = self.parser.get_http_version() == "1.1"
        self.queue.put_nowait(req)
        self._reset()

    async def _serve(self):
        server = self.server
        try:
            while True:
                timeout = server.idle_timeout if self.queue.empty() else None
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    if self.url or self.headers:        # a head started and never finished
                        self._write_error(408, "request_timeout", "request head not received in time")
                    break
                if isinstance(item, tuple):
                    status, message = item
                    code = "payload_too_large" if status == 413 else "bad_request"
                    self._write_error(status, code, message)
                    break
                response = await server.app.handle(item)
                if not await self._write(item, response) or not item.keep_alive:
                    break
        except asyncio.CancelledError:
            pass
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    def _write_error(self, status: int, code: str, message: str) -> None:
        resp = error_response(status, code, message)
        self._head(resp, len(resp.body), keep_alive=False)
        self.transport.write(resp.body)

    def _head(self, resp: Response, length: int | None, keep_alive: bool, chunked: bool = False) -> None:
        """length None: the body is chunked, or (HTTP/1.0) ends when the connection closes."""
        phrase = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
        headers = {"date": formatdate(usegmt=True), "x-content-type-options": "nosniff", **resp.headers}
        if length is not None:
            headers["content-length"] = str(length)
        elif chunked:
            headers["transfer-encoding"] = "chunked"
        if not keep_alive:
            headers["connection"] = "close"
        self.transport.write((f"HTTP/1.1 {resp.status} {phrase}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1"))

    async def _write(self, req: AdminRequest, resp: Response) -> bool:
        """Send the response; False when the connection must close afterwards."""
        if resp.stream is None:
            self._head(resp, len(resp.body), req.keep_alive)
            if req.method != "HEAD":
                self.transport.write(resp.body)
            return True
        # A stream (server-sent events): chunked on HTTP/1.1, else until close (RFC 9112 §6.3).
        self._head(resp, None, req.keep_alive and req.http11, chunked=req.http11)
        try:
            async for piece in resp.stream:
                if self.transport.is_closing():
                    break
                self.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece) if req.http11 else piece)
            if req.http11 and not self.transport.is_closing():
                self.transport.write(b"0\r\n\r\n")
        finally:
            await resp.stream.aclose()
        return req.http11


class AdminServer:
    def __init__(self, app: AdminApp, *, max_body: int = 10 * 1024 * 1024,
                 header_timeout: float = 10.0, idle_timeout: float = 60.0):
        self.app, self.max_body = app, max_body
        self.idle_timeout = min(header_timeout, idle_timeout)
        self.connections: set[_Connection] = set()
        self.server = None
        self.port = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.transport.close()
