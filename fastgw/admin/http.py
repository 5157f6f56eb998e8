"""A small HTTP/1.1 server for the admin API and the dashboard, on the supervisor's event loop.

Not on the hot path, so clarity wins over speed: httptools parses, requests on one connection are
answered one at a time in order (pipelining works, RFC 9112 §9.3.2), bodies are buffered up to
`max_body`, and every answer is framed by Content-Length or chunked encoding. Errors are the
gateway's JSON error shape (README.md, "Proxy behaviour", **Errors**). Every endpoint except the
public ones needs `Authorization: Bearer <admin.token>` when a token is set.
"""
from __future__ import annotations

import asyncio
import hmac
import traceback
from email.utils import formatdate
from http import HTTPStatus
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qsl, unquote

import httptools
import msgspec

from fastgw._core.http1 import LAST_CHUNK, chunk, response_head, splits_head, valid_field_name
from fastgw.log import log

MAX_CONNECTIONS = 256
MAX_HEAD = 64 * 1024        # request line plus header fields; beyond: 414 / 431 (RFC 9112 §3, RFC 6585 §5)
MAX_PIPELINE = 8            # parsed but unanswered requests before we stop reading the socket
LINGER = 2.0                # seconds to read and discard after an error answer (RFC 9112 §9.6)


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class AdminRequest:
    def __init__(self, method: str, path: str, query: dict | None = None, headers: dict | None = None,
                 body: bytes = b"", client: str = "", segments: list[str] | None = None, local: str = ""):
        self.method, self.path, self.query, self.headers = method, path, query or {}, headers or {}
        self.body, self.client = body, client
        self.local = local                      # the address the client connected to
        self.params: dict[str, str] = {}
        # Percent-decoded path segments: routing splits before decoding so that %2F stays inside one.
        self.segments = segments if segments is not None else path[1:].split("/")

    def json(self) -> object:
        if not self.body:
            raise HTTPError(400, "invalid_json", "the request needs a JSON body")
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError as exc:
            raise HTTPError(400, "invalid_json", f"invalid JSON: {exc}") from None


class Response:
    def __init__(self, status: int = 200, body: bytes | str = b"", headers: dict | None = None,
                 content_type: str | None = None):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        self.headers = {k.lower(): str(v) for k, v in (headers or {}).items()}
        if content_type:
            self.headers["content-type"] = content_type
        self.iterator: AsyncIterator[bytes] | None = None

    @classmethod
    def json(cls, obj, status: int = 200, headers: dict | None = None) -> "Response":
        return cls(status, msgspec.json.encode(obj), {"cache-control": "no-store", **(headers or {})},
                   "application/json")

    @classmethod
    def stream(cls, agen: AsyncIterator[bytes], content_type: str = "text/event-stream",
               headers: dict | None = None) -> "Response":
        resp = cls(200, b"", {"cache-control": "no-cache", **(headers or {})}, content_type)
        resp.iterator = agen
        return resp


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return Response.json({"error": {"status": status, "code": code, "message": message}}, status, headers)


def _check(resp: Response) -> None:
    if not isinstance(resp.status, int) or not 200 <= resp.status <= 599:
        raise ValueError(f"bad status {resp.status!r}")   # 1xx are interim, never the answer
    for name, value in resp.headers.items():
        if not valid_field_name(name) or splits_head(value):
            raise ValueError(f"bad response header {name!r}: {value!r}")


Handler = Callable[[AdminRequest], Awaitable[object]]


class AdminApp:
    """Routes `METHOD /path/{param}` to handlers; first `guard` (it raises HTTPError to refuse a
    request whatever its token), then the bearer token."""

    def __init__(self, *, token: str | None, public=frozenset(),
                 guard: Callable[[AdminRequest], None] | None = None):
        self.token = token                      # reassignable (a reload may change it); None/"" = open
        self.guard = guard                      # reassignable too
        # Compared by decoded segments, like routing, so that /status%2Fready is not /status/ready.
        self.public = frozenset((m, tuple(p[1:].split("/"))) for m, p in public)
        self._routes: list[tuple[str, list[str | None], list[str], Handler]] = []

    def route(self, method: str, pattern: str):
        parts = pattern[1:].split("/")
        names = [p[1:-1] if p.startswith("{") and p.endswith("}") else None for p in parts]
        literal = [None if n else p for p, n in zip(parts, names)]

        def register(handler: Handler) -> Handler:
            self._routes.append((method.upper(), literal, names, handler))
            return handler
        return register

    def routes(self) -> list[tuple[str, str]]:
        """(method, pattern) of every route, for the index endpoint."""
        return [(m, "/" + "/".join(lit if lit is not None else "{%s}" % n for lit, n in zip(ls, ns)))
                for m, ls, ns, _ in self._routes]

    async def handle(self, req: AdminRequest) -> Response:
        try:
            resp = await self._dispatch(req)
            _check(resp)
            return resp
        except HTTPError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except Exception:                       # a bug in a handler: log it, keep serving
            log(f"admin: {req.method} {req.path} failed", "error", traceback.format_exc())
            return error_response(500, "internal_error", "internal error (see the gateway log)")

    async def _dispatch(self, req: AdminRequest) -> Response:
        method = "GET" if req.method == "HEAD" else req.method       # RFC 9110 §9.3.2
        if self.guard is not None:
            self.guard(req)
        if self.token and (method, tuple(req.segments)) not in self.public:
            self._authorize(req)              # before routing: no token, no hint which paths exist
        allowed: set[str] = set()
        for m, literal, names, handler in self._routes:
            if len(literal) != len(req.segments):
                continue
            params = {}
            for lit, name, seg in zip(literal, names, req.segments):
                if lit is None and seg:
                    params[name] = seg
                elif lit != seg:
                    break
            else:
                if m != method:
                    allowed.add(m)
                    continue
                req.params = params
                result = await handler(req)
                if isinstance(result, Response):
                    return result
                if isinstance(result, (dict, list)):
                    return Response.json(result)
                raise TypeError(f"handler returned {type(result).__name__}")
        if allowed:                             # RFC 9110 §15.5.6: 405 lists the methods in Allow
            allowed |= {"HEAD"} if "GET" in allowed else set()
            raise HTTPError(405, "method_not_allowed", f"{req.method} is not allowed on {req.path}",
                            {"allow": ", ".join(sorted(allowed))})
        raise HTTPError(404, "not_found", f"no admin endpoint {req.path}")

    def _authorize(self, req: AdminRequest) -> None:
        scheme, _, credential = req.headers.get("authorization", "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110 §11.1); the comparison takes constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode("latin-1"), self.token.encode()):
            raise HTTPError(401, "unauthorized", "this endpoint needs the admin token",
                            {"www-authenticate": 'Bearer realm="fastgw-admin"'})


class _Pending:
    """A request whose head is parsed; its body may still be arriving."""

    def __init__(self, req: AdminRequest, keep_alive: bool, http11: bool, expect: bool):
        self.req, self.keep_alive, self.http11, self.expect = req, keep_alive, http11, expect
        self.done = asyncio.Event()
        self.error: HTTPError | None = None
        self.has_body = False


class _Connection(asyncio.Protocol):
    def __init__(self, server: "AdminServer"):
        self.server, self.loop = server, asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.queue: asyncio.Queue = asyncio.Queue()   # _Pending, HTTPError (answer, close) or None (stop)
        self.transport = self.task = self.timer = self.current = self.last = None
        self.parsing = self.dead = self.lost = self.streaming = self.paused = False
        self.writable = asyncio.Event()
        self.writable.set()

    # --- transport events
    def connection_made(self, transport):
        self.transport = transport
        if self.server.closing or len(self.server.connections) >= MAX_CONNECTIONS:
            self.dead = self.lost = True
            transport.abort()
            return
        self.server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        local = transport.get_extra_info("sockname")
        self.local = str(local[0]) if local else ""
        self._arm(self.server.idle_timeout, None)
        self.task = self.loop.create_task(self._serve())

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        self.lost = self.dead = True
        self._arm(None, None)
        self.writable.set()
        self._stop(HTTPError(400, "bad_request", "connection lost"))
        if self.streaming:                      # nobody listens: end the stream (the iterator is closed)
            self.task.cancel()

    def eof_received(self):
        if self.task is None or self.task.done():
            return False                        # lingering after an error: close now
        # The client may half-close after its last request: answer what came, then close.
        self._stop(HTTPError(400, "bad_request", "the request ended early"))
        return True

    def pause_writing(self):
        self.writable.clear()

    def resume_writing(self):
        self.writable.set()

    def data_received(self, data):
        if self.dead:                           # after an error answer: discard until we close
            return
        if self.current is not None:            # body progress restarts its timer
            self._arm(self.server.idle_timeout, HTTPError(408, "request_timeout", "request body too slow"))
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We ignore Upgrade (RFC 9110 §7.8), but llhttp has stopped at the end of the head and
            # left any body unread: answer a body-less request, then close; refuse one with a body.
            if self.last.has_body:
                self.last.error = HTTPError(400, "bad_request", "Upgrade with a request body")
            self.last.keep_alive, self.dead = False, True
        except httptools.HttpParserCallbackError as exc:
            error = exc.__context__
            self._fail(error if isinstance(error, HTTPError) else HTTPError(400, "bad_request", str(exc)))
        except httptools.HttpParserError as exc:
            self._fail(HTTPError(400, "bad_request", f"malformed request: {exc}"))

    # --- parser callbacks
    def on_message_begin(self):
        self.parsing, self.url, self.headers, self.head_size = True, b"", {}, 0
        self.body, self.body_size = [], 0
        self._arm(self.server.header_timeout, HTTPError(408, "request_timeout", "request head too slow"))

    def on_url(self, url):
        self._count(url, 414, "uri_too_long")
        self.url += url

    def on_header(self, name, value):
        self._count(name + value, 431, "request_header_fields_too_large")
        name, value = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers else value  # RFC 9110 §5.3

    def on_headers_complete(self):
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise HTTPError(505, "http_version_not_supported", f"HTTP/{version} is not supported")
        method = self.parser.get_method().decode("ascii")
        try:
            url = httptools.parse_url(self.url)
            raw = (url.path or b"/").decode("ascii")
            segments = [unquote(s, errors="strict") for s in raw[1:].split("/")]
            query = dict(parse_qsl((url.query or b"").decode("utf-8", "replace"), keep_blank_values=True))
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            raise HTTPError(400, "bad_request", "invalid request target") from None
        if not raw.startswith("/"):
            raise HTTPError(400, "bad_request", "invalid request target")
        length = self.headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.server.max_body:
            # Refuse before reading it, instead of 100 Continue (RFC 9110 §10.1.1).
            raise HTTPError(413, "payload_too_large", f"the body is limited to {self.server.max_body} bytes")
        req = AdminRequest(method, "/" + "/".join(segments), query, self.headers, b"", self.client, segments,
                           self.local)
        # A 100-continue expectation in an HTTP/1.0 request is ignored (RFC 9110 §10.1.1).
        expect = version == "1.1" and self.headers.get("expect", "").lower() == "100-continue"
        # CONNECT: whatever follows the head would be a tunnel; answer and close.
        pending = _Pending(req, self.parser.should_keep_alive() and method != "CONNECT", version == "1.1", expect)
        pending.has_body = length != "0" or "transfer-encoding" in self.headers
        self.current = self.last = pending
        self._arm(self.server.idle_timeout, HTTPError(408, "request_timeout", "request body too slow"))
        self.queue.put_nowait(pending)

    def on_body(self, body):
        self.body_size += len(body)
        if self.body_size > self.server.max_body:       # a chunked body: its length shows late
            raise HTTPError(413, "payload_too_large", f"the body is limited to {self.server.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self):
        pending, self.current, self.parsing = self.current, None, False
        pending.req.body = b"".join(self.body)
        pending.done.set()
        self._arm(None, None)                   # the serve task answers, then restarts the idle timer
        if self.queue.qsize() >= MAX_PIPELINE and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    # --- helpers
    def _count(self, data: bytes, status: int, code: str) -> None:
        self.head_size += len(data)
        if self.head_size > MAX_HEAD:
            raise HTTPError(status, code, f"the request head is limited to {MAX_HEAD} bytes")

    def _arm(self, delay: float | None, error: HTTPError | None) -> None:
        """One timer per connection: idle (error None: just close), head, or body progress."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if delay is None or self.lost else self.loop.call_later(delay, self._expire, error)

    def _expire(self, error: HTTPError | None) -> None:
        self.timer = None
        if error is None:
            self.transport.close()              # idle keep-alive connection (RFC 9112 §9.8)
        else:
            self._fail(error)

    def _fail(self, error: HTTPError) -> None:
        """Stop parsing; the error is answered after the requests before it, then we close."""
        self.dead = True
        self._arm(None, None)
        if self.current is not None:
            self.current.error = error
            self.current.done.set()
        else:
            self.queue.put_nowait(error)

    def _stop(self, error: HTTPError) -> None:
        if self.current is not None and not self.current.done.is_set():
            self.current.error = error
            self.current.done.set()
        self.queue.put_nowait(None)

    # --- answering
    async def _serve(self) -> None:
        linger = False
        try:
            while not self.lost:
                item = await self.queue.get()
                if self.paused and self.queue.qsize() < MAX_PIPELINE and not self.dead:
                    self.paused = False
                    self.transport.resume_reading()
                if isinstance(item, _Pending) and not item.done.is_set():
                    if item.expect:             # now, not earlier: it must not cut into an answer
                        self.transport.write(response_head(100, "Continue"))   # RFC 9110 §15.2.1
                    await item.done.wait()      # the body
                if isinstance(item, _Pending) and item.error is not None:
                    item = item.error
                if item is None or self.lost:
                    break
                if isinstance(item, HTTPError):
                    resp = error_response(item.status, item.code, item.message)
                    self._head(resp, False, True, len(resp.body))
                    self.transport.write(resp.body)
                    linger = True
                    break
                if not await self._respond(item) or self.server.closing:
                    break
                if self.queue.empty() and not self.parsing:
                    self._arm(self.server.idle_timeout, None)
        except asyncio.CancelledError:
            pass
        except Exception:
            log("admin: connection failed", "error", traceback.format_exc())
        finally:
            self._close(linger)

    def _close(self, linger: bool) -> None:
        if self.lost or self.transport.is_closing():
            return
        if linger and self.transport.can_write_eof():
            # Close gracefully: a client still sending would get a reset that can destroy our error
            # answer in its receive buffer, so half-close and read (discarding) a little longer.
            self.dead = True
            self.transport.write_eof()
            if self.paused:
                self.transport.resume_reading()
            self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    async def _respond(self, pending: _Pending) -> bool:
        """Send the answer; False when the connection must close afterwards."""
        req = pending.req
        resp = await self.server.app.handle(req)
        if self.lost:
            return False
        keep = pending.keep_alive and not self.server.closing and resp.headers.get("connection") != "close"
        head_only = req.method == "HEAD" or resp.status in (204, 304)
        if resp.iterator is None:
            self._head(resp, keep, pending.http11, len(resp.body))
            if not head_only:
                self.transport.write(resp.body)
            await self.writable.wait()
            return keep
        # A stream (server-sent events): chunked on HTTP/1.1; to HTTP/1.0 it ends when we close
        # the connection (RFC 9112 §6.3, rule 8).
        chunked = pending.http11
        keep = keep and chunked
        self._head(resp, keep, pending.http11, None)
        if head_only:
            await _aclose(resp.iterator)
            return keep
        self.streaming = True
        try:
            async for piece in resp.iterator:
                piece = piece.encode() if isinstance(piece, str) else piece
                if piece:
                    self.transport.write(chunk(piece) if chunked else piece)
                await self.writable.wait()          # a slow reader must not grow our buffer
                if self.lost:
                    return False
            if chunked:
                self.transport.write(LAST_CHUNK)
            return keep
        except Exception:
            # Too late for an error answer: close without the last chunk, so the client can tell
            # the body is incomplete (RFC 9112 §7.1).
            log(f"admin: stream {req.path} failed", "error", traceback.format_exc())
            return False
        finally:
            self.streaming = False
            await _aclose(resp.iterator)

    def _head(self, resp: Response, keep: bool, http11: bool, length: int | None) -> None:
        """length None: a stream, chunked on HTTP/1.1, else delimited by closing the connection."""
        headers = {"date": formatdate(usegmt=True), **resp.headers, "x-content-type-options": "nosniff"}
        headers.pop("content-length", None)
        headers.pop("transfer-encoding", None)
        if resp.status == 304 or resp.status == 204:
            pass                                # no body and no length for these (RFC 9110 §8.6)
        elif length is not None:
            headers["content-length"] = str(length)
        elif http11:
            headers["transfer-encoding"] = "chunked"
        if not keep:
            headers["connection"] = "close"
        elif not http11:
            headers["connection"] = "keep-alive"    # HTTP/1.0 persistence (RFC 9112 Appendix C.2.2)
        phrase = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
        self.transport.write(response_head(resp.status, phrase, headers.items()))


async def _aclose(iterator) -> None:
    try:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
    except Exception:
        log("admin: closing a stream failed", "error", traceback.format_exc())


class AdminServer:
    def __init__(self, app: AdminApp, *, max_body: int = 10 * 1024 * 1024,
                 header_timeout: float = 10.0, idle_timeout: float = 60.0):
        self.app, self.max_body = app, max_body
        self.header_timeout, self.idle_timeout = header_timeout, idle_timeout
        self.connections: set[_Connection] = set()
        self.closing = False
        self.server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, end streams, close connections. A handler that is running finishes (a
        config change must not stop half-way); its answer is dropped."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.transport.close()
        if tasks:
            _, slow = await asyncio.wait(tasks, timeout=10)
            for task in slow:
                task.cancel()
        for conn in list(self.connections):     # a client that does not read our last bytes
            conn.transport.abort()
