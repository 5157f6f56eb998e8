"""Requests the gateway makes itself (aggregation calls) through its own data plane.

A call is written, as HTTP/1.1 bytes, into a ClientConnection of an internal listener whose
routing table has one route per proxied service; the answer is parsed back from what that
connection writes. So an aggregation call gets exactly what a client request to the service
gets: the balancer, pooled keep-alive connections, health and ejection, the circuit breaker,
retries with their budget, timeouts, and the shared-memory counters. It costs one parse of the
request and one of the answer, in memory, with no socket in between.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httptools

SERVICE_HEADER = "x-fastgw-service"        # picks the internal route; removed before the upstream


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
    from fastgw._core.router import (ROUTE_PROXY_KIND, HeaderEdits, PathRule, RouteEntry,
                                     compile_conditions)
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


class Exchange(asyncio.Transport):
    """The transport under one internal request: writes are the answer, parsed as they come.
    `done` resolves to the Answer (or fails with CallFailed)."""

    def __init__(self, loop, peer: str, max_bytes: int):
        super().__init__()
        self.loop = loop
        self.peer = peer
        self.max_bytes = max_bytes
        self.protocol = None
        self.closed = False
        self.done = loop.create_future()
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0

    # what ClientConnection uses of its transport
    def write(self, data) -> None:
        if self.done.done():
            return
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserError as exc:
            self._finish(CallFailed(f"invalid answer: {exc}"))

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def get_extra_info(self, name, default=None):
        return (self.peer, 0) if name == "peername" else default

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
            self._finish(CallFailed("the connection closed before the answer was complete"))

    abort = close

    def cancel(self, exc: Exception) -> None:
        """Give up on the answer (the caller's deadline): the internal connection goes away,
        taking its upstream exchange with it."""
        self._finish(exc)
        if not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            self._finish(CallFailed(f"answer larger than {self.max_bytes} bytes"))
        else:
            self.body.append(data)

    def on_message_complete(self) -> None:
        self._finish(Answer(self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def _finish(self, result) -> None:
        if self.done.done():
            return
        if isinstance(result, Exception):
            self.done.set_exception(result)
        else:
            self.done.set_result(result)


class LoopbackClient:
    """One per compiled config; the internal listener is made on first use, on the worker's loop."""

    def __init__(self, entries: list):
        self.entries = entries
        self._listener = None

    def _state(self):
        if self._listener is None:
            from fastgw._core.protocol import ListenerState
            from fastgw._core.router import Router
            state = ListenerState("internal", Router.build(self.entries, {}, []),
                                  loop=asyncio.get_running_loop(), max_header_bytes=1 << 20,
                                  max_headers=1000, max_url_bytes=1 << 16, max_body_bytes=1 << 30)
            state.internal = True
            self._listener = state
        return self._listener

    def start(self, loop, service: str, method: str, target: str, *, host: str, client_ip: str,
              headers: str, body: bytes = b"", max_bytes: int) -> Exchange:
        """Send one request (`target`: path and query; `headers`: "name: value\r\n" lines) and
        return its Exchange at once: calls started one after the other run concurrently, with no
        task of their own. The caller awaits `exchange.done`, or cancels it."""
        exchange = Exchange(loop, client_ip, max_bytes)
        protocol = self._state().protocol_factory()
        exchange.protocol = protocol
        protocol.connection_made(exchange)
        head = (f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n{SERVICE_HEADER}: {service}\r\n"
                f"connection: close\r\ncontent-length: {len(body)}\r\n{headers}\r\n")
        protocol.data_received(head.encode("latin-1") + body)
        return exchange
