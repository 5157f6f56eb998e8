"""Test-side HTTP machinery for black-box gateway tests: upstream servers, a raw client, config builders.

Everything here is deliberately independent of fastgw: raw sockets and threads, so a failure in a
gateway test is the gateway's, not a framework's. All traffic stays on 127.0.0.1.

- `RecordingUpstream`: HTTP/1.1 server that records every request exactly as received (raw bytes,
  headers in order, decoded body) and answers through a per-test handler.
- `ScriptedUpstream`: answers each request with exactly the raw bytes a test gives (or never).
- `BulkUpstream`: streams N pattern bytes at a controlled pace, consumes uploads counting and hashing.
- `StaticFileServer`: a real `python -m http.server` over a directory (it decodes escapes, merges
  slashes and resolves dot segments on its own: what a stock backend reads differently).
- `RawConnection`: a client socket that sends raw bytes and parses responses (1xx, HEAD, 204/304,
  chunked, Content-Length, close-delimited); `http_request` wraps `http.client` for simple cases.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Union
from urllib.parse import parse_qsl

HOST = "127.0.0.1"
KiB, MiB = 1024, 1024 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy; return that, or the last value at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --- configuration builders ----------------------------------------------------------------------

def target_service(*ports: int, **options) -> dict:
    """A proxy service with one target per port; `options` are extra service keys (timeouts, ...)."""
    return {"targets": [{"address": f"{HOST}:{p}"} for p in ports], **options}


def route(name: str, paths: Iterable[str] = ("/**",), service: str | None = None, *,
          hosts: Iterable[str] | None = None, methods: Iterable[str] | None = None, **keys) -> dict:
    match: dict = {"paths": list(paths)}
    if hosts is not None:
        match["hosts"] = list(hosts)
    if methods is not None:
        match["methods"] = list(methods)
    r = {"name": name, "match": match, **keys}
    if service is not None:
        r["service"] = service
    return r


def gateway_config(services: dict, routes: list[dict], limits: dict | None = None) -> dict:
    """A whole config: one listener `public` on a free port, the given services and routes."""
    listener: dict = {"name": "public", "bind": f"{HOST}:{free_port()}"}
    if limits:
        listener["limits"] = dict(limits)
    return {"version": 1, "listeners": [listener], "services": services, "routes": routes}


def proxy_config(upstream_port: int | Iterable[int], *, service_opts: dict | None = None,
                 limits: dict | None = None, extra_routes: Iterable[dict] = (), **route_overrides) -> dict:
    """Minimal proxy config: service `up` (one target per port), route `all` matching `/**` to it.

    `route_overrides` are keys of route `all` (rewrite=..., timeout=...); `extra_routes` come first.
    """
    ports = [upstream_port] if isinstance(upstream_port, int) else list(upstream_port)
    all_route = route("all", ["/**"], "up")
    all_route.update(route_overrides)
    return gateway_config({"up": target_service(*ports, **(service_opts or {}))},
                          [*extra_routes, all_route], limits)


# --- messages ------------------------------------------------------------------------------------

class _Headers:
    headers: list[tuple[str, str]]

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), default)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def header_tokens(self, name: str) -> list[str]:
        """Comma-separated tokens over all fields `name`, lower-cased (Connection, TE, ...)."""
        return [t.strip().lower() for v in self.header_all(name) for t in v.split(",") if t.strip()]


@dataclass
class Response(_Headers):
    status: int
    reason: str = ""
    version: str = "HTTP/1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    body_len: int = 0
    raw_head: bytes = b""
    interim: list["Response"] = field(default_factory=list)   # 1xx received before this one
    close_delimited: bool = False

    def json(self):
        return json.loads(self.body)

    @property
    def chunked(self) -> bool:
        return "chunked" in self.header_tokens("transfer-encoding")


@dataclass(eq=False)
class RecordedRequest(_Headers):
    """One request as an upstream received it. Appended to `.requests` as soon as its head arrived;
    `done` is set when the body was read completely (`complete`) or the connection ended first."""
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    conn_id: int
    index: int
    raw_body: bytearray = field(default_factory=bytearray)    # as received (chunk framing included), up to store_limit
    body_buf: bytearray = field(default_factory=bytearray)    # decoded, up to store_limit
    body_len: int = 0
    stored_all: bool = True
    complete: bool = False
    problems: list[str] = field(default_factory=list)         # framing mistakes made by the sender
    done: threading.Event = field(default_factory=threading.Event)
    _sha: object = field(default_factory=hashlib.sha256, repr=False)

    @property
    def body(self) -> bytes:
        return bytes(self.body_buf)

    @property
    def raw(self) -> bytes:
        return self.raw_head + bytes(self.raw_body)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def body_sha256(self) -> str:
        return self._sha.hexdigest()

    def _feed(self, decoded: bytes, store_limit: int) -> None:
        self.body_len += len(decoded)
        self._sha.update(decoded)
        if len(self.body_buf) + len(decoded) <= store_limit:
            self.body_buf += decoded
        else:
            self.stored_all = False


@dataclass
class Reply:
    """What a RecordingUpstream handler answers. `body` may be an iterable of chunks (streamed at
    `rate` bytes/s); then `length` gives the Content-Length unless `chunked`."""
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Union[bytes, Iterable[bytes]] = b""
    chunked: bool = False
    length: int | None = None
    rate: float | None = None
    close: bool = False


Handler = Callable[[RecordedRequest], Union[Reply, bytes, None]]   # bytes: sent as is; None: never answer


# --- byte-level reading --------------------------------------------------------------------------

class ConnectionEnded(Exception):
    """The peer closed (or reset) the connection."""


class _Reader:
    """Buffered reads over a socket (blocking, with an optional deadline) or over fixed bytes."""

    def __init__(self, sock: socket.socket | None = None, data: bytes = b""):
        self.sock, self.buf, self.deadline, self.eof = sock, bytearray(data), None, sock is None

    def _more(self, size: int = 256 * KiB) -> None:
        if self.eof:
            raise ConnectionEnded()
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for bytes")
            self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            data = b""
        except socket.timeout:
            raise TimeoutError("timed out waiting for bytes") from None
        if not data:
            self.eof = True
            raise ConnectionEnded()
        self.buf += data

    def until(self, marker: bytes, limit: int = 1 * MiB) -> bytes:
        start = 0
        while True:
            i = self.buf.find(marker, start)
            if i >= 0:
                out = bytes(self.buf[:i + len(marker)])
                del self.buf[:i + len(marker)]
                return out
            if len(self.buf) > limit:
                raise ValueError(f"no {marker!r} within {limit} bytes")
            start = max(0, len(self.buf) - len(marker) + 1)
            self._more()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more(max(n - len(self.buf), 64 * KiB))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def some(self, n: int) -> bytes:
        """Between 1 and n bytes."""
        if not self.buf:
            self._more(max(n, 64 * KiB))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        """Everything up to EOF."""
        try:
            while True:
                self._more()
        except ConnectionEnded:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Split a message head into its start line and header fields; list deviations from RFC 9112."""
    problems = []
    if b"\n" in head.replace(b"\r\n", b""):
        problems.append("bare LF in head")
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else head.rstrip(b"\r\n").split(b"\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip(b" \t"):
            problems.append(f"bad header line {line!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return lines[0].decode("latin-1"), headers, problems


def _framing(msg: _Headers, problems: list[str]) -> tuple[bool, int | None]:
    """(chunked, content_length) per RFC 9112 §6.3, recording ambiguous framing as problems."""
    te = msg.header_tokens("transfer-encoding")
    cls = msg.header_all("content-length")
    if te and cls:
        problems.append("both Transfer-Encoding and Content-Length")
    if len(cls) > 1:
        problems.append("several Content-Length fields")
    if te and te != ["chunked"]:
        problems.append(f"Transfer-Encoding {te}")
    if te:
        return te[-1] == "chunked", None
    if cls and not cls[0].isdigit():
        raise ValueError(f"invalid Content-Length {cls[0]!r}")
    return False, (int(cls[0]) if cls else None)


def _read_chunked(reader: _Reader, on_data: Callable[[bytes, bytes], None]) -> None:
    """Decode a chunked body; on_data(decoded, raw) per piece. Trailers are read and dropped."""
    while True:
        line = reader.until(b"\r\n", limit=4 * KiB)
        size = int(line.split(b";", 1)[0].strip(), 16)
        on_data(b"", line)
        if size == 0:
            while True:
                trailer = reader.until(b"\r\n", limit=64 * KiB)
                on_data(b"", trailer)
                if trailer == b"\r\n":
                    return
        remaining = size
        while remaining:
            piece = reader.some(min(remaining, 256 * KiB))
            remaining -= len(piece)
            on_data(piece, piece)
        crlf = reader.exact(2)
        if crlf != b"\r\n":
            raise ValueError(f"chunk not followed by CRLF: {crlf!r}")
        on_data(b"", crlf)


class Pacer:
    """Sleeps so that bytes counted through `consumed` flow at no more than `rate` bytes/s."""

    def __init__(self, rate: float | None):
        self.rate, self.start, self.count = rate, time.monotonic(), 0

    def consumed(self, n: int) -> None:
        if self.rate:
            self.count += n
            ahead = self.count / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


# --- upstream servers ----------------------------------------------------------------------------

def describe_request(req: RecordedRequest, server: str) -> Reply:
    """The default answer: 200 with JSON describing what this upstream received."""
    doc = {"server": server, "conn": req.conn_id, "index": req.index, "method": req.method,
           "target": req.target, "path": req.path, "query": req.query, "version": req.version,
           "headers": [[k, v] for k, v in req.headers], "body_len": req.body_len,
           "body": req.body.decode("latin-1") if req.body_len <= 4 * KiB else None}
    return Reply(200, [("Content-Type", "application/json")], json.dumps(doc).encode())


class RecordingUpstream:
    """A minimal, correct HTTP/1.1 server on raw sockets that records every request it receives.

    handler(req) -> Reply | bytes | None is called once the body is complete (None: never answer).
    `read_rate` paces body reading (bytes/s); `store_limit` bounds the bytes kept per request.
    `close_after_response` closes each connection `close_delay` s after its first response,
    without announcing it (to model upstreams that drop keep-alive connections).
    """

    def __init__(self, handler: Handler | None = None, *, name: str = "up", auto_continue: bool = True,
                 read_rate: float | None = None, store_limit: int = 1 * MiB,
                 close_after_response: bool = False, close_delay: float = 0.0, port: int = 0,
                 host: str = HOST):
        self.handler = handler or (lambda req: describe_request(req, self.name))
        self.name, self.auto_continue, self.read_rate = name, auto_continue, read_rate
        self.store_limit = store_limit
        self.close_after_response, self.close_delay = close_after_response, close_delay
        self.requests: list[RecordedRequest] = []
        self.connections_accepted = 0
        self._next_conn_id = 0                # conn ids stay unique across reset()
        self.protocol_errors: list[str] = []  # unparseable bytes from the client (the gateway)
        self.errors: list[str] = []           # exceptions inside the server: harness bugs, never ignore
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        # `host`: another loopback address (127.0.0.2, ::1) for targets that share a port.
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        # `port`: come back on the port of an upstream that was stopped (a restarted process).
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(256)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]

    # lifecycle
    def start(self):
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._threads:
            self._threads[0].join(timeout=5)          # the accept loop: no new connections after this
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        self._listener.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reset(self) -> None:
        """Forget what was recorded (for servers shared between tests)."""
        with self._lock:
            self.requests.clear()
            self.connections_accepted = 0

    @property
    def complete_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.complete]

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            conn.settimeout(None)
            with self._lock:
                self.connections_accepted += 1
                self._next_conn_id += 1
                conn_id = self._next_conn_id
                self._conns.add(conn)
            self._spawn(self._serve, conn, conn_id)

    def _serve(self, conn: socket.socket, conn_id: int) -> None:
        # A head and a body sent apart would otherwise wait for the gateway's delayed ACK (Nagle).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _Reader(conn)
        try:
            while not self._stopping.is_set():
                try:
                    req = self._read_head(reader, conn_id)
                    if req is None:
                        return
                    if self.auto_continue and req.header("expect", "").lower() == "100-continue":
                        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self._read_body(reader, req)
                except ValueError as e:             # the client (the gateway) sent bad framing
                    self.protocol_errors.append(f"connection {conn_id}: {e}")
                    return
                reply = self.handler(req)
                if reply is None:                   # never answer: hold until the peer goes away
                    reader.rest()
                    return
                if isinstance(reply, (bytes, bytearray)):
                    conn.sendall(reply)
                    keep = True
                else:
                    keep = self._send(conn, req, reply)
                if self.close_after_response:
                    time.sleep(self.close_delay)
                    return
                if not keep:
                    return
        except (ConnectionEnded, OSError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug in the test server or handler: see .errors
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _read_head(self, reader: _Reader, conn_id: int) -> RecordedRequest | None:
        try:
            head = reader.until(b"\r\n\r\n", limit=1 * MiB)
        except ConnectionEnded:
            return None
        start, headers, problems = _parse_head(head)
        parts = start.split(" ")
        if len(parts) != 3:
            problems.append(f"bad request line {start!r}")
            parts = (parts + ["", "", ""])[:3]
        with self._lock:
            req = RecordedRequest(parts[0], parts[1], parts[2], headers, head, conn_id, len(self.requests),
                                  problems=problems)
            self.requests.append(req)
        return req

    def _read_body(self, reader: _Reader, req: RecordedRequest) -> None:
        pacer = Pacer(self.read_rate)

        def on_data(decoded: bytes, raw: bytes) -> None:
            if len(req.raw_body) + len(raw) <= self.store_limit:
                req.raw_body += raw
            if decoded:
                req._feed(decoded, self.store_limit)
                pacer.consumed(len(decoded))

        try:
            chunked, length = _framing(req, req.problems)
            if chunked:
                _read_chunked(reader, on_data)
            elif length:
                remaining = length
                while remaining:
                    piece = reader.some(min(remaining, 256 * KiB))
                    remaining -= len(piece)
                    on_data(piece, piece)
            req.complete = True
        finally:
            req.done.set()

    def _send(self, conn: socket.socket, req: RecordedRequest, reply: Reply) -> bool:
        """Write `reply`; return whether the connection stays open."""
        headers = list(reply.headers)
        names = {k.lower() for k, _ in headers}
        streamed = not isinstance(reply.body, (bytes, bytearray))
        bodiless = reply.status in (204, 304) or reply.status < 200
        if reply.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif "content-length" not in names and not bodiless:
            headers.append(("Content-Length", str(reply.length if streamed else len(reply.body))))
        close = reply.close or "close" in req.header_tokens("connection") or (
            req.version == "HTTP/1.0" and "keep-alive" not in req.header_tokens("connection"))
        if close and "connection" not in names:
            headers.append(("Connection", "close"))
        reason = http.client.responses.get(reply.status, "Status")
        head = f"HTTP/1.1 {reply.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        conn.sendall(head.encode("latin-1") + b"\r\n")
        if req.method != "HEAD" and not bodiless:
            pacer = Pacer(reply.rate)
            for piece in ([reply.body] if not streamed else reply.body):
                if piece:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if reply.chunked else piece)
                    pacer.consumed(len(piece))
            if reply.chunked:
                conn.sendall(b"0\r\n\r\n")
        return not close


class StaticFileServer:
    """`python -m http.server` serving `files` ({relative path: bytes}) from `root`, as a separate
    process: a stock backend that normalises paths its own way (percent-decoding, `//`, `..`,
    `\\` on some platforms), for tests that assert a protected file never comes back through the
    gateway. Quacks like a RecordingUpstream for `Harness.upstream` (start/stop/name/errors)."""

    def __init__(self, root, files: dict[str, bytes], *, name: str = "static"):
        self.root, self.name = root, name
        self.protocol_errors: list[str] = []
        self.errors: list[str] = []
        for rel, data in files.items():
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", HOST, "--directory", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"python -m http.server did not listen on {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()



class ScriptedUpstream(RecordingUpstream):
    """Reads each request (head and body), then sends exactly the given raw bytes.

    `responses`: bytes for every request; a list (request n of the server, over all connections,
    gets item n, the last one repeats); a callable(req) -> bytes; or None to never answer.
    `close=True` closes the connection `close_delay` s after each response, without saying so.
    """

    def __init__(self, responses: bytes | list[bytes] | Callable | None, *, close: bool = False,
                 close_delay: float = 0.0, name: str = "scripted"):
        def handler(req: RecordedRequest):
            if responses is None or isinstance(responses, (bytes, bytearray)):
                return responses
            if callable(responses):
                return responses(req)
            return responses[min(req.index, len(responses) - 1)]

        super().__init__(handler, name=name, auto_continue=False,
                         close_after_response=close, close_delay=close_delay)


# --- pattern data for streaming --------------------------------------------------------------------

_BLOCK = 64 * KiB
_BASE = random.Random(20240601).randbytes(_BLOCK)


def pattern_stream(total: int, sizes: Iterable[int] | None = None) -> Iterator[bytes]:
    """`total` deterministic bytes (block i = i as 8 bytes + fixed random tail), cut into pieces of
    `sizes` (cycled) or 64 KiB blocks. The content does not depend on the piece sizes."""
    def blocks():
        for i in range((total + _BLOCK - 1) // _BLOCK):
            block = i.to_bytes(8, "big") + _BASE[8:]
            yield block[:total - i * _BLOCK]

    if sizes is None:
        yield from blocks()
        return
    sizes = list(sizes)
    buf, n = bytearray(), 0
    for block in blocks():
        buf += block
        while buf and len(buf) >= sizes[n % len(sizes)]:
            size = sizes[n % len(sizes)]
            yield bytes(buf[:size])
            del buf[:size]
            n += 1
    if buf:
        yield bytes(buf)


@functools.lru_cache(maxsize=16)
def pattern_sha256(total: int) -> str:
    h = hashlib.sha256()
    for block in pattern_stream(total):
        h.update(block)
    return h.hexdigest()


def bulk_handler(req: RecordedRequest) -> Reply:
    """`GET /bytes/<n>?chunked=1&rate=<B/s>&sizes=a,b,c`: n pattern bytes. Anything else:
    JSON {received, sha256, conn, target} about the request body."""
    parts = req.path.split("/")
    if len(parts) == 3 and parts[1] == "bytes":
        n, q = int(parts[2]), dict(parse_qsl(req.query))
        sizes = [int(s) for s in q["sizes"].split(",")] if "sizes" in q else None
        return Reply(200, [("Content-Type", "application/octet-stream")], pattern_stream(n, sizes),
                     chunked=q.get("chunked") == "1", length=n, rate=float(q.get("rate", 0)) or None)
    doc = {"received": req.body_len, "sha256": req.body_sha256, "conn": req.conn_id, "target": req.target}
    return Reply(200, [("Content-Type", "application/json")], json.dumps(doc).encode())


class BulkUpstream(RecordingUpstream):
    """Streams large responses (`bulk_handler`) and consumes uploads at `read_rate` bytes/s."""

    def __init__(self, *, read_rate: float | None = None, name: str = "bulk"):
        super().__init__(bulk_handler, name=name, read_rate=read_rate, store_limit=64 * KiB)


# --- client side ---------------------------------------------------------------------------------

class IncompleteResponse(Exception):
    """The connection ended before the response was complete; `response` holds what arrived."""

    def __init__(self, response: Response | None, message: str):
        super().__init__(message)
        self.response = response


def read_response(reader: _Reader, *, head_request: bool = False,
                  body_sink: Callable[[bytes], None] | None = None) -> Response:
    """Read one response (a 1xx is returned as is). Body bytes go to `body_sink` if given."""
    try:
        head = reader.until(b"\r\n\r\n", limit=1 * MiB)
    except ConnectionEnded:
        raise IncompleteResponse(None, f"connection closed before a response head "
                                       f"({bytes(reader.buf[:200])!r} pending)") from None
    start, headers, _ = _parse_head(head)
    version, _, rest = start.partition(" ")
    status, _, reason = rest.partition(" ")
    resp = Response(int(status), reason, version, headers, raw_head=head)
    body = bytearray()

    def take(data: bytes, _raw: bytes = b"") -> None:
        resp.body_len += len(data)
        if body_sink is None:
            body.extend(data)
        elif data:
            body_sink(data)

    try:
        if head_request or resp.status < 200 or resp.status in (204, 304):
            pass
        elif resp.header("transfer-encoding") is not None and resp.chunked:
            _read_chunked(reader, take)
        elif resp.header("content-length") is not None:
            remaining = int(resp.header("content-length"))
            while remaining:
                piece = reader.some(min(remaining, 256 * KiB))
                remaining -= len(piece)
                take(piece)
        else:
            resp.close_delimited = True
            try:
                while True:
                    take(reader.some(256 * KiB))
            except ConnectionEnded:
                pass
    except ConnectionEnded:
        resp.body = bytes(body)
        raise IncompleteResponse(resp, f"connection closed after {resp.body_len} body bytes of "
                                       f"{resp.status} response") from None
    resp.body = bytes(body)
    return resp


def parse_responses(data: bytes, *, head_request: bool = False) -> list[Response]:
    """Every response in `data` (1xx included), e.g. what a connection sent until it closed."""
    reader, out = _Reader(data=data), []
    while reader.buf:
        out.append(read_response(reader, head_request=head_request))
    return out


class RawConnection:
    """A client connection to 127.0.0.1:port for exact bytes. Reads time out (TimeoutError)."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = _Reader(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _deadline(self, timeout: float | None) -> None:
        self.reader.deadline = time.monotonic() + (self.timeout if timeout is None else timeout)

    def read_response(self, *, head_request: bool = False, timeout: float | None = None,
                      body_sink: Callable[[bytes], None] | None = None) -> Response:
        """The next response on the connection, 1xx included."""
        self._deadline(timeout)
        return read_response(self.reader, head_request=head_request, body_sink=body_sink)

    def read_final(self, *, head_request: bool = False, timeout: float | None = None,
                   body_sink: Callable[[bytes], None] | None = None) -> Response:
        """The next final (non-1xx) response; the 1xx before it are in `.interim`."""
        interim = []
        while True:
            resp = self.read_response(head_request=head_request, timeout=timeout, body_sink=body_sink)
            if resp.status >= 200 or resp.status == 101:
                resp.interim = interim
                return resp
            interim.append(resp)

    def request(self, data: bytes, **kwargs) -> Response:
        self.send(data)
        return self.read_final(**kwargs)

    def read_until_close(self, timeout: float = 3.0) -> bytes:
        """Everything the peer sends until it closes; TimeoutError if it does not close in time."""
        self._deadline(timeout)
        return self.reader.rest()

    def wait_closed(self, timeout: float = 3.0) -> bool:
        """True if the peer closed within `timeout` (bytes it sent meanwhile stay readable in `.reader.buf`)."""
        try:
            pending = self.read_until_close(timeout)
        except TimeoutError:
            return False
        self.reader.buf[:0] = pending
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_request(port: int, method: str = "GET", path: str = "/", *, headers: dict | None = None,
                 body: bytes | None = None, timeout: float = 5.0,
                 conn: http.client.HTTPConnection | None = None) -> Response:
    """One request through http.client (a new connection unless `conn` is given)."""
    c = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return Response(r.status, r.reason, "HTTP/1.1" if r.version == 11 else "HTTP/1.0",
                        r.getheaders(), data, len(data))
    finally:
        if conn is None:
            c.close()


def get_request(path: str = "/", host: str = "x", headers: Iterable[tuple[str, str]] = (),
                method: str = "GET", body: bytes = b"", version: str = "HTTP/1.1") -> bytes:
    """Raw bytes of a simple request (Content-Length added when there is a body)."""
    lines = [f"{method} {path} {version}", f"Host: {host}", *(f"{k}: {v}" for k, v in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_error(resp: Response, status: int | Iterable[int], code: str | None = None) -> dict:
    """`resp` is a SPEC §4 JSON error with that status (or one of them) and code; returns `error`."""
    statuses = {status} if isinstance(status, int) else set(status)
    assert resp.status in statuses, f"expected {sorted(statuses)}, got {resp.status}: {resp.body[:300]!r}"
    assert "json" in (resp.header("content-type") or ""), resp.headers
    err = resp.json()["error"]
    assert err["status"] == resp.status, err
    if code is not None:
        assert err["code"] == code, err
    assert isinstance(err.get("request_id"), str) and err["request_id"], err
    return err
