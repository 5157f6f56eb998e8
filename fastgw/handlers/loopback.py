"""Requests the gateway makes itself (aggregation calls) through its own data plane.

A call is written, as HTTP/1.1 bytes, into a ClientConnection of an internal listener whose
routing table has one route per proxied service; the answer is parsed back from what that
connection writes (keep-alive: idle internal connections are reused). So an aggregation call
gets exactly what a client request to the service gets: the balancer, pooled keep-alive connections, health and ejection, the circuit breaker,
retries with their budget, timeouts, and the shared-memory counters. It costs one parse of the
request and one of the answer, in memory, with no socket in between.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httptools

from fastgw._core.http1 import request_head
from fastgw._core.protocol import ListenerState
from fastgw._core.router import (ROUTE_PROXY_KIND, HeaderEdits, PathRule, RouteEntry, Router,
                                 compile_conditions)

SERVICE_HEADER = "x-fastgw-service"        # picks the internal route; removed before the upstream
CLIENT_IP_HEADER = "x-fastgw-client-ip"    # the caller's client address (read, never forwarded)
MAX_IDLE = 256                             # internal keep-alive connections kept for reuse


@dataclass
class Answer:
    status: int
    headers: dict[str, str]                # lower-case names (the last of repeated fields)
    body: bytes


class CallFailed(Exception):
    """The call got no usable answer (too large, invalid, cut short)."""


def internal_routes(services: dict) -> list:
    """Router entries for the internal listener: a request carrying SERVICE_HEADER: NAME goes to
    service NAME with its path and query as they are."""
    strip = HeaderEdits(remove=[SERVICE_HEADER])
    entries = []
    for i, (name, service) in enumerate(services.items()):
        if service.kind != ROUTE_PROXY_KIND:
            continue
        entry = RouteEntry(name=f"~{name}", index=i, kind=ROUTE_PROXY_KIND, service=service,
                           request_edits=strip,
                           conditions=compile_conditions({SERVICE_HEADER: name}, {}, None))
        entries.append((PathRule(entry, "/**"), []))
    return entries


class Call:
    """One request on an internal connection: `done` resolves to its Answer (or fails with
    CallFailed)."""

    __slots__ = ("done", "conn")

    def __init__(self, done, conn: "InternalConnection"):
        self.done, self.conn = done, conn

    def cancel(self, exc: Exception) -> None:
        """Give up on the answer (the caller's deadline): the connection goes away, taking its
        upstream exchange with it."""
        if not self.done.done():
            self.done.set_exception(exc)
            self.conn.drop()


class InternalConnection(asyncio.Transport):
    """A keep-alive connection into the internal listener: what its ClientConnection writes is
    the answer to the current call, parsed as it comes. Idle ones are kept for the next call, so
    a call costs no new ClientConnection."""

    def __init__(self, loop, client: "LoopbackClient"):
        super().__init__()
        self.loop, self.client = loop, client
        self.closed = False
        self.call: Call | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.protocol = client._state().protocol_factory()
        self.protocol.connection_made(self)

    def send(self, request: bytes, max_bytes: int) -> Call:
        self.call = Call(self.loop.create_future(), self)
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size, self.max_bytes = 0, max_bytes
        self.protocol.data_received(request)
        return self.call

    def drop(self) -> None:
        """Close at once: an answer that will not be read to the end leaves the connection out of step."""
        if not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)
        self._fail(CallFailed("the internal connection was dropped"))

    # what ClientConnection uses of its transport
    def write(self, data) -> None:
        if self.call is None:
            return
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserError as exc:
            self._fail(CallFailed(f"invalid answer: {exc}"))
            self.drop()

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def get_extra_info(self, name, default=None):
        # The client's address travels with each request (CLIENT_IP_HEADER).
        return ("127.0.0.1", 0) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)
        self._fail(CallFailed("the connection closed before the answer was complete"))

    abort = close

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            self._fail(CallFailed(f"answer larger than {self.max_bytes} bytes"))
            self.drop()
        else:
            self.body.append(data)

    def on_message_complete(self) -> None:
        call, self.call = self.call, None
        if call is not None and not call.done.done():
            call.done.set_result(Answer(self.parser.get_status_code(), self.headers, b"".join(self.body)))
        if not self.closed:
            self.client.release(self)

    def _fail(self, exc: Exception) -> None:
        call, self.call = self.call, None
        if call is not None and not call.done.done():
            call.done.set_exception(exc)


class LoopbackClient:
    """One per compiled config; the internal listener is made on first use, on the worker's loop."""

    def __init__(self, entries: list):
        self.entries = entries
        self.idle: list[InternalConnection] = []
        self._listener = None

    def _state(self):
        if self._listener is None:
            state = ListenerState("internal", Router.build(self.entries, {}, []),
                                  loop=asyncio.get_running_loop(), max_header_bytes=1 << 20,
                                  max_headers=1000, max_url_bytes=1 << 16, max_body_bytes=1 << 30)
            state.internal = True
            self._listener = state
        return self._listener

    def start(self, loop, service: str, method: str, target: str, *, host: str, client_ip: str,
              headers: str, body: bytes = b"", max_bytes: int) -> Call:
        """Send one request (`target`: path and query; `headers`: "name: value\r\n" lines) and
        return its Call at once: calls started one after the other run concurrently, with no
        task of their own. The caller awaits `call.done`, or cancels it."""
        conn = None
        while self.idle and conn is None:
            conn = self.idle.pop()
            if conn.closed:                       # the internal listener's idle timeout closed it
                conn = None
        if conn is None:
            conn = InternalConnection(loop, self)
        head = request_head(method, target, (("host", host), (SERVICE_HEADER, service), (CLIENT_IP_HEADER, client_ip),
                                             ("content-length", len(body))), headers)
        return conn.send(head + body, max_bytes)

    def release(self, conn: InternalConnection) -> None:
        if len(self.idle) < MAX_IDLE:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """The config was replaced: its idle internal connections go (busy ones finish first)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
