# cython: language_level=3
"""Client side of the proxy: one ClientConnection per accepted socket.

Bytes go to an httptools parser; its callbacks fill a Request. A request whose head is complete
is dispatched at once if nothing else is being answered, otherwise it waits in `queued`
(pipelining: answers go out in order) and reading pauses. The upstream request head is built
from the parsed fields, never from the client's raw bytes, so one client request is exactly one
upstream request (RFC 9112 §11.2: no request smuggling).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp

from fastgw._core.balancer cimport Balancer
from fastgw._core.native cimport NativeCheck
from fastgw._core.ratelimit cimport Decision, Policy, release
from fastgw._core.ratelimit import ALG_CONCURRENCY
from fastgw._core.buffer cimport WriteBuffer, ascii_lower, monotonic, random64
from fastgw._core.http1 cimport (CONN_CLOSE, CONN_KEEP_ALIVE, CONN_NAMES, CONN_UPGRADE, H_CONNECTION,
                                 H_CONTENT_LENGTH, H_EXPECT, H_FORWARDED, H_HOST, H_PROXY_AUTHORIZATION,
                                 H_TRACEPARENT, H_TRANSFER_ENCODING, H_UPGRADE, H_USER_AGENT,
                                 H_X_CONSUMER_NAME, H_X_FASTGW_CLIENT_IP, H_X_FORWARDED_FOR,
                                 H_X_FORWARDED_HOST, H_X_FORWARDED_PROTO, H_X_REAL_IP, H_X_REQUEST_ID,
                                 HEAD_FIELDS_MAX, FieldSpan, connection_flags, connection_tokens,
                                 drop_named, hop_by_hop_field, known_header, parse_content_length,
                                 scan_fields)
from fastgw._core.answers cimport (can_discard, date_header, error_body_with_request_id, echo_body,
                                   status_lines, write_answer, write_cached, write_connection_header,
                                   write_error, write_respond)
from fastgw._core.cache cimport CachedResponse, ResponseCache, credential_digest
from fastgw._core.observe cimport record_finished, write_access_log
from fastgw._core.request cimport (PHASE_ANSWER, PHASE_CACHE, PHASE_DONE, PHASE_FILTERS, PHASE_LIMITS,
                                   PHASE_ROUTE, Request, request_id_of)
from fastgw._core.retry cimport (count_request, count_retry, retries_failure, retries_stale_connection,
                                 retries_status, uncount_request)
from fastgw._core.router cimport (ROUTE_ECHO, ROUTE_HANDLER, ROUTE_PROXY, ROUTE_RESPOND, HeaderEdits,
                                  PathRule, RouteEntry, Router, write_fields)
from fastgw._core.uri cimport canonical_host, canonical_path
from fastgw._core.health cimport circuit_admit, circuit_is_open, target_available, target_end
from fastgw._core.shm cimport (EV_CACHE_HIT, EV_CACHE_MISS, EV_CACHE_STALE, EV_RATELIMIT_ALLOWED,
                               EV_RATELIMIT_REJECTED, record_route_event, listener_admits, listener_closed,
                               monotonic_ns, target_begin, target_release)
from fastgw._core.upstream cimport (
    FRAMING_CHUNKED, FRAMING_CLOSE, FRAMING_LENGTH, FRAMING_NONE, UPSTREAM_CONNECT_FAILED,
    UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_INVALID, UPSTREAM_POOL_FULL, UPSTREAM_RESET,
    UPSTREAM_TIMEOUT, Downstream, Service, Target, UpstreamConnection)

import asyncio
import socket
import struct

from httptools import (HttpParserError, HttpParserInvalidMethodError, HttpParserUpgrade,
                       HttpRequestParser)

from fastgw._core.proxyproto import ProxyHeaderError, parse_proxy_header, peer_trusted
from fastgw.api import Headers, Request as PluginRequest, Response as PluginResponse
from fastgw.log import log, log_exception

cdef enum:
    REPLAY_LIMIT = 65536          # request bytes kept to resend after a stale pooled connection
    LINGER_SECONDS = 2            # after an answer sent before the body ended (RFC 9112 §9.6)

# answers.pyx's table, held here too: the status line of every proxied answer is an index, not a call.
cdef list STATUS_LINES = status_lines()
cdef bytes CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef list ECHO_FIELDS = [b"content-type", b"application/json"]
cdef bytes HTTP_SCHEME = b"http"

# Upstream heads and chunk headers are built here and taken at once, with no callback in
# between, so every connection of the worker can share it.
cdef WriteBuffer _scratch = WriteBuffer()

cdef enum:                          # where the result of ClientConnection._await goes
    AWAIT_PLUGINS = 0
    AWAIT_LIMITS = 1
    AWAIT_HANDLER = 2
# A JSON answer reshaped for a client profile is held whole up to this size; larger is a 502.
DEF COLLECT_LIMIT = 8 * 1024 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is on the connection."""


cdef class ListenerState:
    def __init__(self, str name, Router router, *, long long max_header_bytes=32768,
                 int max_headers=100, long long max_url_bytes=8192,
                 long long max_body_bytes=10485760, double header_timeout=10.0,
                 double idle_timeout=60.0, int max_connections=10000, access_log=None,
                 loop=None):
        self.name = name
        self.loop = loop if loop is not None else asyncio.get_event_loop()
        self.router = router
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_url_bytes = max_url_bytes
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.access_log = access_log
        self.draining = False
        self.open_connections = 0
        self.rejected_connections = 0
        self.requests = 0
        self.connections = set()
        self.metric_slot = -1
        self.accept_proxy = False
        self.keep_escaped_slashes = False
        self.proxy_trusted = None
        self.proxy_untrusted_plain = False
        self.body_timeout = 30.0
        self.scheme = HTTP_SCHEME
        self.internal = False
        self.tracer = None
        self.trace_sample_ratio = 0.0

    def configure(self, **limits):
        """Apply a (re)loaded listener's limits and metric slot; open connections use them from
        their next request on."""
        for name, value in limits.items():
            setattr(self, name, value)

    def protocol_factory(self):
        return ClientConnection(self)

    def close_idle_connections(self):
        """Drain: close every connection that is not answering a request right now."""
        for conn in list(self.connections):
            (<ClientConnection>conn).close_if_idle()


async def _remote_decisions(list remote):
    """Per-request cluster decisions, all at once; a failure is returned, not raised."""
    return await asyncio.gather(*(policy.remote(key, limit, window_ns)
                                  for policy, key, limit, window_ns in remote), return_exceptions=True)


cdef bytes _header_value(list headers, bytes lower_name):
    for i in range(0, len(headers), 2):
        if ascii_lower(<bytes>headers[i]) == lower_name:
            return <bytes>headers[i + 1]
    return b""


cdef bytes _query_value(bytes query, bytes name):
    for part in query[1:].split(b"&"):
        key, _, value = part.partition(b"=")
        if key == name:
            return value
    return b""


cdef inline bint _is_client_address_field(bytes name):
    """Forwarded (RFC 7239) and X-Real-IP: who the client is, believed only from a trusted proxy."""
    cdef int known = known_header(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
    return known == H_FORWARDED or known == H_X_REAL_IP


cdef bint _has_client_address_field(list headers):
    for i in range(0, len(headers), 2):
        if _is_client_address_field(<bytes>headers[i]):
            return True
    return False


cdef list _without_client_address_fields(list headers):
    cdef list kept = []
    for i in range(0, len(headers), 2):
        if not _is_client_address_field(<bytes>headers[i]):
            kept.append(headers[i])
            kept.append(headers[i + 1])
    return kept


cdef list _encode_fields(headers):
    """Plugin headers (str pairs) back to the wire list; a field that could smuggle a line
    break or is not a token is refused (ValueError)."""
    cdef list out = []
    for name, value in headers:
        raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
        if not raw_name or any(c in raw_name for c in b" \t\r\n:\x00") or \
                any(c in raw_value for c in b"\r\n\x00"):
            raise ValueError(f"invalid header field {name!r} from a plugin")
        out.append(raw_name)
        out.append(raw_value)
    return out


cdef bint _any_circuit_open(list targets):
    for t in targets:
        if circuit_is_open((<Target>t).metric_slot):
            return True
    return False


cdef bint _valid_request_id(bytes value):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    cdef const char* s = PyBytes_AS_STRING(value)
    if n == 0 or n > 200:
        return False
    for i in range(n):
        if s[i] <= 32 or s[i] >= 127:
            return False
    return True


cdef bint _is_hex(const char* s, Py_ssize_t n):
    cdef Py_ssize_t i
    for i in range(n):
        if not ((48 <= s[i] <= 57) or (97 <= s[i] <= 102)):
            return False
    return True


cdef inline int _hex_value(char c) noexcept:
    """Lower-case hex digit (already checked by _is_hex) to its value."""
    return c - 48 if c <= 57 else c - 87


cdef class ClientConnection(Downstream):
    def __init__(self, ListenerState listener):
        self.listener = listener
        self.parser = HttpRequestParser(self)
        self.queued = []
        self.out = WriteBuffer()

    # --- asyncio protocol ------------------------------------------------------------------------

    def connection_made(self, transport):
        cdef ListenerState listener = self.listener
        self.transport = transport
        # max_connections holds for the listener as a whole, across workers, when it has a
        # shared-memory slot; else for this worker alone.
        if not listener_admits(listener.metric_slot, listener.max_connections, listener.open_connections):
            listener.rejected_connections += 1
            self.state = CLIENT_CLOSED
            transport.abort()
            return
        self.admitted = True
        listener.open_connections += 1
        listener.connections.add(self)
        self.loop = listener.loop
        peer = transport.get_extra_info("peername")
        self.client_ip = self.peer_ip = peer[0].encode() if peer else b""
        if listener.accept_proxy:
            if peer_trusted(listener.proxy_trusted, self.peer_ip):
                self.proxy_head = b""
            elif not listener.proxy_untrusted_plain:
                self.state = CLIENT_CLOSED        # only the balancers in front may say who the client is
                transport.abort()
                return
        self.arm(monotonic() + listener.header_timeout)

    def connection_lost(self, exc):
        self.state = CLIENT_CLOSED
        self.parser = None                # it holds our bound methods: break the cycle
        if not self.admitted:
            return                        # turned away by max_connections, never counted
        self.listener.open_connections -= 1
        listener_closed(self.listener.metric_slot)
        self.listener.connections.discard(self)
        self.disarm()
        if self.tunnel is not None:
            self._end_tunnel()
        cdef Request req = self.active
        if req is not None:
            if req.upstream is not None:
                req.flags = "DC"
                req.upstream.abort()
                req.upstream = None
            if not req.response_done:
                req.flags = "DC"
                self._log(req)
        self.active = None
        self.queued = []

    def data_received(self, data):
        cdef ListenerState listener = self.listener
        if self.state != CLIENT_OPEN or self.fatal_status:
            return
        if self.tunnel is not None:
            self.tunnel.tunnel_send(data)
            return
        if self.upgrading is not None:
            self.upgrade_rest.append(bytes(data))     # reads are paused; at most one read
            return
        if self.proxy_head is not None:
            data = self._read_proxy_header(data)
            if not data:
                return
        if self.in_head:
            # Bytes fed so far while this head was incomplete: all head bytes. httptools buffers a
            # header line until it ends, so stop a single endless line here.
            if self.head_fed > listener.max_header_bytes:
                self._reject_now(431, "header_too_large", "request head too large")
                return
            self.head_fed += len(data)
        elif self.parsing is None:
            if self.active is None:
                self.arm(monotonic() + listener.header_timeout)
            self.line_version = _request_line_version(data)
            if self.line_version:
                self.line_method = _request_line_method(<bytes>data)
                if self.line_method is not None and self._simple_request(<bytes>data):
                    return
        self._feed(data)

    cdef bytes _read_proxy_header(self, data):
        """Take the PROXY header off the connection's first bytes (the client address it gives
        replaces the peer's); the bytes after it, or b"" while it is incomplete. A connection
        that does not start with one is closed: the listener only trusts a balancer that sends it."""
        cdef bytes head = self.proxy_head + bytes(data)
        try:
            used, client = parse_proxy_header(head)
        except ProxyHeaderError:
            self.state = CLIENT_CLOSED
            self.transport.abort()
            return b""
        if used == 0:
            self.proxy_head = head
            return b""
        self.proxy_head = None
        if client is not None:
            self.client_ip = client[0].encode()
        return head[used:]

    cdef bint _simple_request(self, bytes data) except -1:
        """Read a request head that is the whole read without llhttp and a Python callback per
        field, when it is plain: a method read off the line (GET, POST, PUT, HEAD, DELETE), a
        target of visible ASCII, HTTP/1.1 or 1.0, token names and text values on CRLF lines, and
        no field that brings a body or another protocol (Content-Length, Transfer-Encoding,
        Expect, Upgrade). Then the parser's callback steps run on it, limits and all. Anything
        else returns False untouched, and llhttp reads it (and refuses what is invalid)."""
        cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), eol, i, count = 0
        cdef Py_ssize_t target_start = PyBytes_GET_SIZE(self.line_method) + 1, target_end
        cdef FieldSpan spans[HEAD_FIELDS_MAX]
        cdef int known
        if n > self.listener.max_header_bytes or memcmp(s + n - 4, b"\r\n\r\n", 4) != 0:
            return False
        eol = <const unsigned char*>memchr(s, b'\n', n) - s
        target_end = eol - 10                 # the space before "HTTP/1.x\r" (version peeked)
        if target_end <= target_start:
            return False
        for i in range(target_start, target_end):
            if s[i] <= 0x20 or s[i] >= 0x7f:
                return False
        # Every line is checked before any step runs: nothing changes unless the head is plain.
        count = scan_fields(s, eol + 1, n, spans, HEAD_FIELDS_MAX)
        if count < 0:
            return False
        for i in range(count):
            known = spans[i].known
            if known == H_CONTENT_LENGTH or known == H_TRANSFER_ENCODING or known == H_EXPECT or \
                    known == H_UPGRADE:
                return False
        try:
            self._on_url(PyBytes_FromStringAndSize(<const char*>s + target_start, target_end - target_start))
            for i in range(count):
                self._on_header(
                    PyBytes_FromStringAndSize(<const char*>s + spans[i].name, spans[i].colon - spans[i].name),
                    PyBytes_FromStringAndSize(<const char*>s + spans[i].value, spans[i].value_end - spans[i].value),
                    spans[i].known)
            self._on_headers_complete()
        except _Reject:
            if self.state == CLIENT_OPEN:
                self._reject_now(400, "bad_request", "malformed request")
            return True
        self._on_message_done()
        self._dispatch_ready()
        self._flush()
        return True

    cdef void _feed(self, data):
        cdef int offset
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # llhttp stops after the head of a request that asks to switch protocols.
            offset = exc.args[0]
            if self.parsing is not None:
                self._on_message_done()
            if self.upgrading is not None:
                # What follows is the new protocol's, not HTTP: hold it until the upstream's
                # answer says whether the connection becomes a tunnel.
                self.upgrade_rest = [bytes(data[offset:])] if offset < len(data) else []
                self._pause(PAUSE_UPGRADE)
                self._dispatch_ready()
                self._flush()
                return
            # Not an upgrade we pass on (HTTP/1.0, no Upgrade field): the bytes after the head
            # are parsed as the next request.
            if offset < len(data):
                self._feed(memoryview(data)[offset:])
            else:
                self._dispatch_ready()
            return
        except HttpParserInvalidMethodError:
            if self.state == CLIENT_OPEN:
                self._reject_now(501, "not_implemented", "unknown method")
            return
        except HttpParserError as exc:
            if self.state == CLIENT_OPEN:
                self._reject_now(400, "bad_request", "malformed request: " + str(exc))
            return
        self._dispatch_ready()
        self._flush()

    cdef void _dispatch_ready(self):
        """Dispatch the request whose head completed during the last feed. Waiting for the end
        of the feed means every byte of that read was valid before anything goes upstream."""
        if self.ready is not None:
            req = self.ready
            self.ready = None
            self._dispatch(req)

    def eof_received(self):
        # A client that half-closes after a complete request still gets its answer; one that
        # stops in the middle of a request has gone away.
        self.closing = True
        if self.tunnel is not None:
            self.tunnel_client_eof = True
            if self.tunnel_upstream_eof:
                self._end_tunnel()
                return False
            self.tunnel.tunnel_write_eof()
            return True                   # half-closed: the upstream may still answer
        if self.active is None or self.state == CLIENT_LINGERING or self.parsing is not None:
            if self.active is not None and self.active.upstream is not None:
                self.active.flags = "DC"
                self.active.upstream.abort()
                self.active.upstream = None
            self._close()
            return False
        return True

    def pause_writing(self):
        # The client reads slower than the upstream sends: stop reading the upstream, and give
        # the client idle_timeout to make progress (a client that never reads is dropped).
        self.write_blocked = True
        self.arm(monotonic() + self.listener.idle_timeout)
        if self.active is not None and self.active.upstream is not None:
            self.active.upstream.set_reading(False)

    def resume_writing(self):
        self.write_blocked = False
        if self.active is not None:
            self.arm(0)
            if self.active.upstream is not None:
                self.active.upstream.set_reading(True)

    # --- parser callbacks (llhttp's, and the same steps for heads read by _simple_request) -------

    def on_url(self, bytes url):
        self._on_url(url)

    def on_header(self, bytes name, bytes value):
        self._on_header(name, value, known_header(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)))

    def on_headers_complete(self):
        self._on_headers_complete()

    cdef int _on_url(self, bytes url) except -1:
        cdef Request req = self.parsing
        if self.state == CLIENT_CLOSED or self.closing and self.active is None and req is None:
            raise _Reject("connection closing")
        if req is None:
            req = self.parsing = Request.__new__(Request)
            req.headers = []
            req.content_length = -1
            req.status = 0
            req.flags = "-"
            req.max_body = -1
            self.in_head = True
            self.head_fed = 0
            req.url = url
        else:
            req.url += url
        req.head_bytes += PyBytes_GET_SIZE(url)
        if PyBytes_GET_SIZE(req.url) > self.listener.max_url_bytes:
            self._reject(414, "uri_too_long", "request target too long")
        return 0

    cdef int _on_header(self, bytes name, bytes value, int known) except -1:
        cdef Request req = self.parsing
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
        cdef const char* s = PyBytes_AS_STRING(name)
        req.header_count += 1
        req.head_bytes += n + PyBytes_GET_SIZE(value) + 4
        if req.header_count > self.listener.max_headers:
            self._reject(431, "too_many_headers", "too many request headers")
        if req.head_bytes > self.listener.max_header_bytes:
            self._reject(431, "header_too_large", "request head too large")
        if known == H_HOST:
            if req.host is not None:
                self._reject(400, "bad_request", "more than one Host header")
            req.host = value
        elif known == H_CONTENT_LENGTH:
            if req.content_length != -1:
                self._reject(400, "bad_request", "more than one Content-Length")
            req.content_length = parse_content_length(value)
            if req.content_length < 0:
                self._reject(400, "bad_request", "invalid Content-Length")
        elif known == H_TRANSFER_ENCODING:
            # RFC 9112 §6.1: only "chunked", alone, is accepted; an unknown coding is 501.
            if req.chunked:
                self._reject(400, "bad_request", "more than one Transfer-Encoding")
            if ascii_lower(value) != b"chunked":
                if b"," in value or ascii_lower(value).strip() in (b"chunked", b""):
                    self._reject(400, "bad_request", "Transfer-Encoding must be exactly chunked")
                self._reject(501, "not_implemented", "unsupported transfer coding")
            req.chunked = True
        elif known == H_CONNECTION:
            req.connection |= connection_flags(value)
            if req.connection & CONN_NAMES:
                req.connection_tokens = (req.connection_tokens or []) + connection_tokens(value)
        elif known == H_EXPECT:
            if ascii_lower(value) != b"100-continue":
                self._reject(417, "expectation_failed", "only 100-continue is supported")
            req.expect_continue = True
        elif known == H_X_FORWARDED_FOR:
            req.forwarded_for = value if req.forwarded_for is None else req.forwarded_for + b", " + value
        elif known == H_X_REQUEST_ID:
            if _valid_request_id(value):
                req.request_id = value
        elif known == H_TRACEPARENT:
            req.traceparent = value
        elif known == H_UPGRADE:
            req.upgrade = value                   # forwarded only when Connection names it
        elif known == H_X_CONSUMER_NAME:
            if self.listener.internal:            # an aggregation call passes its caller's identity
                req.consumer = value
        elif known == H_X_FASTGW_CLIENT_IP and self.listener.internal:
            self.client_ip = value                # ... and its client (internal connections are reused)
            # else dropped: the proxy writes its own, only after authentication
        elif known == H_X_FORWARDED_PROTO or known == H_X_FORWARDED_HOST or \
                hop_by_hop_field(known, s, n) and known != H_PROXY_AUTHORIZATION:
            # The proxy writes its own. Proxy-Authorization goes on (RFC 9110 §11.7.2: a proxy
            # relays it unless it consumes it, as nginx and HAProxy do): the plugin that reads
            # its credential from it removes it.
            pass
        elif memchr(s, b'_', n) is not NULL:
            # Dropped, as nginx does (underscores_in_headers off): CGI-style backends read
            # Transfer_Encoding, Content_Length or X_Forwarded_For as the fields with "-".
            pass
        else:
            if known == H_USER_AGENT:
                req.user_agent = value
            req.headers.append(name)
            req.headers.append(value)
        return 0

    cdef int _on_headers_complete(self) except -1:
        cdef Request req = self.parsing
        cdef ListenerState listener = self.listener
        self.in_head = False
        if self.line_method is not None:
            req.method = self.line_method
            self.line_method = None
        else:
            req.method = self.parser.get_method()
        if self.line_version:
            req.http11 = self.line_version == 11
            self.line_version = 0
        else:
            version = self.parser.get_http_version()
            req.http11 = version == "1.1"
            if not req.http11 and version != "1.0":
                self._reject(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1")
        # RFC 9112 §9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive".
        if req.connection & CONN_CLOSE:
            req.keep_alive = False
        else:
            req.keep_alive = req.http11 or bool(req.connection & CONN_KEEP_ALIVE)
        req.started = monotonic()
        listener.requests += 1
        if req.chunked and req.content_length != -1:
            self._reject(400, "bad_request", "both Content-Length and Transfer-Encoding")
        if req.host is None and req.http11:
            self._reject(400, "bad_request", "missing Host header")
        if req.host is None:
            req.host = b""
        if req.connection_tokens:
            req.headers = drop_named(req.headers, req.connection_tokens)
        if req.upgrade is not None:
            if req.http11 and req.connection & CONN_UPGRADE and self.upgrading is None:
                self.upgrading = req
            else:
                req.upgrade = None
        if req.method == b"CONNECT":
            self._reject(501, "not_implemented", "CONNECT is not supported")
        if self.active is None:
            self.arm(self._body_deadline() if req.chunked or req.content_length > 0 else 0)
            self.active = self.ready = req
        else:
            self.queued.append(req)
            self._pause(PAUSE_PIPELINE)
        return 0

    def on_body(self, bytes data):
        cdef Request req = self.parsing
        req.body_bytes += PyBytes_GET_SIZE(data)
        if not self.write_blocked:            # else idle_timeout holds: the client does not read
            self.arm(self._body_deadline())
        if req.max_body >= 0 and req.body_bytes > req.max_body:
            self._reject(413, "payload_too_large", "request body too large")
        if req is self.active and req is not self.ready:
            if req.upstream is not None:
                self._send_body(req, data)
                if req.upstream.transport is None:
                    self._pause(PAUSE_UPSTREAM)       # until the upstream connection is made
                return
            if req.response_done or req.rule is None or \
                    (not _answers_locally(req.rule.route) and not req.in_plugins):
                return                                # answered already: read and drop
        if req.body_buffer is None:
            req.body_buffer = []
        req.body_buffer.append(data)

    def on_message_complete(self):
        if self.parsing is not None:
            self._on_message_done()

    cdef void _on_message_done(self):
        cdef Request req = self.parsing
        self.parsing = None
        req.body_done = True
        if not self.write_blocked:
            self.arm(0)                       # the body timer's job is over
        if req is not self.active or req is self.ready:
            return
        if req.upstream is not None:
            if req.chunked:
                req.upstream.send(b"0\r\n\r\n")
                self._keep_for_replay(req, b"0\r\n\r\n")
        elif req.answer_ready:
            if req.rule.route.kind == ROUTE_ECHO:
                self._answer_echo(req)
            else:
                self._run_handler(req)
        if req.response_done:
            self._finish(req)

    # --- rejecting bad requests ------------------------------------------------------------------

    cdef int _reject(self, int status, str code, str message) except -1:
        """From a parser callback: remember why, and stop llhttp."""
        if self.fatal_status == 0:
            self.fatal_status = status
            self.fatal_code = code
            self.fatal_message = message
        raise _Reject(code)

    cdef void _reject_now(self, int status, str code, str message):
        """The bytes being parsed are bad: stop reading; answer the requests before them, then
        this one with `status`, then close."""
        if self.fatal_status == 0:
            self.fatal_status = status
            self.fatal_code = code
            self.fatal_message = message
        self._pause(PAUSE_FATAL)
        if self.ready is not None and self.ready is not self.parsing:
            self._dispatch_ready()        # complete and valid: it came before the bad bytes
        self.ready = None
        self._reject_pending()

    cdef void _reject_pending(self):
        """Send the fatal error once nothing before it is left to answer, then close."""
        cdef Request req
        if self.state == CLIENT_CLOSED:
            return
        if self.active is not None and self.active is not self.parsing:
            return                        # _finish comes back here when it is answered
        if self.active is not None and self.active.response_started:
            self._abort_client()          # its body turned out bad after the answer began
            return
        req = self.parsing if self.parsing is not None else self.active
        if req is None:
            req = Request.__new__(Request)
            req.headers = []
            req.flags = "-"
        if req.upstream is not None:
            req.upstream.abort()          # the upstream got a head and part of a body: cut it
            req.upstream = None
        self.parsing = None
        self.queued = []
        self.active = req
        self.closing = True
        req.status = self.fatal_status
        self.closing = write_error(self.out, req, self.fatal_status, self.fatal_code, self.fatal_message,
                                   self.closing)
        self._flush()
        if req.method is not None:
            self._log(req)
        self.active = None
        self._close()

    # --- dispatch --------------------------------------------------------------------------------

    cdef void _dispatch(self, Request req):
        self.active = req
        if self.listener.draining:
            self.closing = True
        self._advance(req)

    cdef void _advance(self, Request req):
        """Walk `req` through its phases (request.pxd, Phase) from the one it stands at: route ->
        filters -> limits -> cache -> answer. A phase that answers the request, or waits (an async
        plugin, Redis limits, a cache fill), returns; what it waited for calls this again, and
        the walk goes on at the phase stored before the wait. Routes without plugins go from the
        route straight to the answer."""
        cdef RouteEntry route
        cdef int status
        cdef list fields
        cdef bint plugins
        if req.phase == PHASE_ROUTE:
            if not self._route(req):
                return                            # refused: 400, 404, 413
            req.phase = PHASE_FILTERS if req.rule.route.plugins is not None else PHASE_ANSWER
        while req.phase != PHASE_ANSWER:
            if req.phase == PHASE_FILTERS:
                req.phase = PHASE_LIMITS
                if not self._run_plugins(req):
                    return                        # answered, or an async plugin decides
            elif req.phase == PHASE_LIMITS:
                req.phase = PHASE_CACHE
                if req.rule.route.plugins.ratelimits and self._rate_limited(req, False):
                    return                        # refused, or waiting for Redis
            else:                                 # PHASE_CACHE
                req.phase = PHASE_ANSWER
                route = req.rule.route
                if route.plugins.cache is not None and \
                        (route.kind == ROUTE_PROXY or route.kind == ROUTE_HANDLER) and \
                        self._from_cache(req, route.plugins.cache):
                    return                        # answered from the cache, or waiting for a fill
        # PHASE_ANSWER: upstream, or answered here.
        route = req.rule.route
        if route.kind == ROUTE_RESPOND:
            # The route's answer like a proxied one: its response edits (response_headers,
            # deprecation) and response plugins (CORS) apply; without either, the head compiled
            # with the config goes out as it is (fastgw/_core/answers.pyx).
            req.body_buffer = None
            req.status = status = route.respond_status
            fields = route.respond_fields
            plugins = req.view is not None and route.plugins.response_plugins
            if plugins:
                fields = self._response_plugins(req, &status, fields)
            self.closing = write_respond(self.out, req, status, fields, plugins, self.closing)
            self._flush()
            self._response_finished(req)
        elif route.kind == ROUTE_ECHO or route.kind == ROUTE_HANDLER:
            if not req.body_done:
                req.answer_ready = True           # _on_message_done answers
                if req.expect_continue:
                    self.transport.write(CONTINUE)
            elif route.kind == ROUTE_ECHO:
                self._answer_echo(req)
            else:
                self._run_handler(req)
        else:
            self._forward(req)

    cdef bint _route(self, Request req):
        """The route phase: the request target read (RFC 9112 §3.2) and matched to a route, the
        body size checked against it. False when that refused the request (answered)."""
        cdef ListenerState listener = self.listener
        cdef PathRule rule
        cdef Py_ssize_t q
        cdef bytes url = req.url
        cdef const char* u = PyBytes_AS_STRING(url)
        # Request target (RFC 9112 §3.2): origin-form, or absolute-form whose authority replaces
        # Host (§3.2.2). Host and path are brought to their one canonical form (uri.pyx) before
        # routing: what the router judges is exactly what goes upstream.
        if u[0] != b'/':
            url = _absolute_form(req, url)
            if url is None:
                self._fail_request(req, 400, "bad_request", "invalid request target")
                return False
        # One pass over the target: where the query starts, and whether the path needs work.
        cdef int target_flags = _scan_target(url, &q)
        if target_flags & TARGET_FRAGMENT:
            self._fail_request(req, 400, "bad_request", "fragment in request target")
            return False
        if q >= 0:
            # Not url[:q]: Cython slices bytes through PySequence_GetSlice and a slice object.
            u = PyBytes_AS_STRING(url)
            req.path = PyBytes_FromStringAndSize(u, q)
            req.query = PyBytes_FromStringAndSize(u + q, PyBytes_GET_SIZE(url) - q)
        else:
            req.path = url
            req.query = b""
        try:
            req.host = canonical_host(req.host)
            if target_flags & TARGET_NEEDS_NORMALISING:
                req.path = canonical_path(req.path, listener.keep_escaped_slashes)
        except ValueError as exc:
            self._fail_request(req, 400, "bad_request", str(exc))
            return False
        if listener.router.profiles:
            req.profile = listener.router.classify(req.headers, req.query)
        rule = listener.router.match(req.method, PyBytes_AS_STRING(req.host),
                                     PyBytes_GET_SIZE(req.host), PyBytes_AS_STRING(req.path),
                                     PyBytes_GET_SIZE(req.path), &req.caps, req.headers, req.query,
                                     req.profile)
        if rule is None:
            req.flags = "NR"
            self._fail_request(req, 404, "no_route", "no route matches the request")
            return False
        req.rule = rule
        req.max_body = rule.route.max_body if rule.route.max_body >= 0 else listener.max_body_bytes
        if req.content_length > req.max_body or req.body_bytes > req.max_body:
            self.closing = True           # the body is not read: the connection cannot be reused
            self._fail_request(req, 413, "payload_too_large", "request body too large")
            return False
        return True

    # --- the response cache (fastgw/_core/cache.pyx, the `cache` plugin) ------------------------

    cdef bint _from_cache(self, Request req, ResponseCache cache):
        """Answer `req` from the cache, or park it until the request fetching its key is done;
        False: it goes upstream (and, a GET, fills the key)."""
        cdef CachedResponse entry
        cdef double now = monotonic()
        cdef bytes credential = None
        if req.method != b"GET" and req.method != b"HEAD":
            return False
        if req.consumer is None:
            if req.rule.route.plugins.credential_fields is not None:
                credential = self._cache_credential(req)   # let through, no consumer: keyed by it
            elif _header_value(req.headers, b"authorization") or \
                    _header_value(req.headers, b"proxy-authorization"):
                return False              # someone's credentials nothing checked: not shared
        req.cache_key = cache.key_for(req.host, req.path, req.query, req.headers, req.consumer,
                                      credential)
        entry = cache.lookup(req.cache_key, req.headers, now)
        if entry is not None and now < entry.fresh_until:
            cache.hits += 1
            self._write_cached(req, entry, b"HIT", now)
            return True
        waiting = cache.filling.get(req.cache_key)
        if waiting is not None:
            self._cache_wait(req, waiting)   # coalesced: one upstream fetch per key (per worker)
            return True
        cache.misses += 1
        record_route_event(req.rule.route.metric_slot, EV_CACHE_MISS)
        req.cache_stale = entry
        if req.method == b"GET":
            cache.filling[req.cache_key] = []
            req.cache_fill = True
        return False

    cdef bytes _cache_credential(self, Request req):
        """The digest of what the request showed the route's authentication plugins."""
        cdef bytes certificate = None
        if self.listener.scheme is not HTTP_SCHEME:
            tls = self.transport.get_extra_info("ssl_object")
            if tls is not None:
                certificate = tls.getpeercert(True)
        return credential_digest(req.headers, req.rule.route.plugins.credential_fields, certificate)

    cdef void _cache_wait(self, Request req, list waiting):
        waiting.append((self, req))
        req.in_plugins = True
        self._pause(PAUSE_PLUGIN)

    def _cache_wake(self, Request req, ResponseCache cache):
        """The fill this request waited for is over: a hit now, or upstream on its own. The fill
        may have stored another variant (RFC 9111 §4.1): then this request fetches its own, or
        waits once more for a request already fetching the key."""
        cdef double now = monotonic()
        if self.state == CLIENT_CLOSED or req is not self.active:
            return
        req.in_plugins = False
        self._resume(PAUSE_PLUGIN)
        entry = cache.lookup(req.cache_key, req.headers, now)
        if entry is not None and now < (<CachedResponse>entry).fresh_until:
            cache.hits += 1
            self._write_cached(req, entry, b"HIT", now)
            return
        waiting = cache.filling.get(req.cache_key)
        if waiting is not None and not req.cache_rewaited:
            req.cache_rewaited = True     # once: never a chain of fills of variants not stored
            self._cache_wait(req, waiting)
            return
        cache.misses += 1
        record_route_event(req.rule.route.metric_slot, EV_CACHE_MISS)
        req.cache_stale = entry
        if waiting is None and req.method == b"GET":
            cache.filling[req.cache_key] = []
            req.cache_fill = True
        self._advance(req)                # on at the answer phase

    cdef void _write_cached(self, Request req, CachedResponse entry, bytes state, double now):
        record_route_event(req.rule.route.metric_slot, EV_CACHE_HIT if state == b"HIT" else EV_CACHE_STALE)
        cdef list headers = entry.headers
        cdef int status = entry.status
        if req.view is not None and req.rule.route.plugins.response_plugins:
            headers = self._response_plugins(req, &status, headers)
        self.closing = write_cached(self.out, req, entry, status, headers, state, now, self.closing)
        self._flush()
        self._response_finished(req)

    cdef bint _serve_stale(self, Request req):
        """stale_if_error: the upstream failed; an expired entry still within its grace answers."""
        cdef double now = monotonic()
        if req.cache_stale is None or req.response_started or now >= req.cache_stale.stale_until:
            return False
        req.rule.route.plugins.cache.stale_hits += 1
        self._write_cached(req, req.cache_stale, b"STALE", now)
        return True

    cdef void _cache_begin(self, Request req, int status, list headers):
        """The answer that fills the key has its head: keep its body as it passes, if storable."""
        cdef ResponseCache cache = req.rule.route.plugins.cache
        req.cache_ttl = cache.storable_ttl(status, headers)
        if req.cache_ttl > 0:
            req.cache_status = status
            req.cache_headers = headers
            req.cache_parts = []
            req.cache_bytes = 0

    cdef void _cache_store(self, Request req, bytes body):
        req.cache_parts = None
        req.rule.route.plugins.cache.store(
            req.cache_key, req.host, req.path, req.query, req.headers, req.cache_status,
            req.cache_headers, body, req.cache_ttl, monotonic())

    # --- rate limits (fastgw/_core/ratelimit.pyx) --------------------------------------------------

    cdef bint _rate_limited(self, Request req, bint before_plugins):
        """Decide the route's rate limits. True when the request was refused (answered 429), or
        waits for Redis (limits with per-request cluster decisions; it goes on from there).

        Before the access plugins: the limits whose key needs no identity, so that failed
        authentication attempts count; and a limit keyed on the consumer refuses an address whose
        failed attempts used up its allowance (looked at, not counted). After them: the limits
        keyed on the consumer, and those decided in Redis."""
        cdef Policy policy
        cdef Decision d
        cdef long long limit
        cdef unsigned long long window_ns
        cdef list remote = None
        for p in req.rule.route.plugins.ratelimits:
            policy = <Policy>p
            early = not policy.needs_identity and policy.remote is None
            if before_plugins and policy.needs_identity:
                if policy.remote is None and policy.algorithm != ALG_CONCURRENCY and policy.exhausted(
                        self._limit_key(req, policy, True), policy.limit, policy.window_ns, &d):
                    self._limit_decided(req, policy, policy.limit, policy.window_ns, &d)
                    return True
                continue
            if early != before_plugins:
                continue
            limit, window_ns = policy.limit, policy.window_ns
            if req.consumer is not None and policy.plans:
                plan = policy.plans.get(req.consumer)
                if plan is not None:
                    limit, window_ns = plan
            key = self._limit_key(req, policy, False)
            if policy.remote is not None:
                if remote is None:
                    remote = []
                remote.append((policy, key, limit, window_ns))
                continue
            policy.decide(key, limit, window_ns, &d)
            if self._limit_decided(req, policy, limit, window_ns, &d):
                return True
        if remote is None:
            return False
        req.remote_limits = remote
        self._await(req, _remote_decisions(remote), AWAIT_LIMITS)
        return True

    cdef bint _refusal_limited(self, Request req, object resp):
        """The access plugins refused the request (401, 403): the attempt is charged to the
        limits keyed on the consumer as the client address's. True when that refused it (429)."""
        cdef Policy policy
        cdef Decision d
        if resp.status != 401 and resp.status != 403 or not req.rule.route.plugins.ratelimits:
            return False
        for p in req.rule.route.plugins.ratelimits:
            policy = <Policy>p
            if policy.needs_identity and policy.remote is None and policy.algorithm != ALG_CONCURRENCY:
                policy.decide(self._limit_key(req, policy, True), policy.limit, policy.window_ns, &d)
                if self._limit_decided(req, policy, policy.limit, policy.window_ns, &d):
                    return True
        return False

    cdef void _remote_limits_decided(self, Request req, object results):
        cdef Decision d
        cdef Policy policy
        if isinstance(results, BaseException):   # not expected (failures come back one by one)
            results = [results] * len(req.remote_limits)
        for (p, key, limit, window_ns), result in zip(req.remote_limits, results):
            policy = <Policy>p
            if isinstance(result, BaseException):
                # Redis away or too slow: on_store_error (local: this host's share, in shared memory).
                if policy.on_store_error == 0:
                    policy.decide(key, limit, window_ns, &d)
                else:
                    d.admitted = policy.on_store_error == 1
                    d.remaining, d.reset, d.retry_after = (limit if d.admitted else 0), 0, 1
            else:
                d.admitted, d.remaining, d.reset, d.retry_after = result
            if self._limit_decided(req, policy, limit, window_ns, &d):
                return
        self._advance(req)

    cdef bint _limit_decided(self, Request req, Policy policy, long long limit,
                             unsigned long long window_ns, Decision* d):
        """Headers for one decision; True when it refused the request (answered 429)."""
        if policy.headers:
            lines = policy.header_lines(req.rule.route.name, limit, window_ns, d)
            req.limit_headers = lines if req.limit_headers is None else req.limit_headers + lines
        record_route_event(req.rule.route.metric_slot,
                           EV_RATELIMIT_ALLOWED if d.admitted else EV_RATELIMIT_REJECTED)
        if self.listener.access_log is not None:
            self._note_limit(req, policy, limit, window_ns, d)
        if not d.admitted:
            req.flags = "RL"
            req.retry_after = <int>(d.retry_after + 0.999) or 1
            self._fail_request(req, 429, "rate_limited", "rate limit exceeded")
            return True
        if policy.algorithm == ALG_CONCURRENCY and d.entry != NULL:
            if req.limit_release is None:
                req.limit_release = []
            req.limit_release.append(<size_t>d.entry)
        return False

    cdef void _note_limit(self, Request req, Policy policy, long long limit,
                          unsigned long long window_ns, Decision* d):
        """Keep the decision that binds for the access log's `ratelimit`: the refusal, else the
        limit with the fewest requests left."""
        cdef tuple kept = req.limit_logged
        if kept is not None and (not kept[4] or d.admitted and kept[3] <= d.remaining):
            return
        req.limit_logged = (policy.name or req.rule.route.name, limit, window_ns / 1e9,
                            d.remaining, d.admitted)

    cdef bytes _limit_key(self, Request req, Policy policy, bint anonymous):
        """The parts of the request the policy counts by, NUL-separated. `anonymous`: as if no
        consumer were identified (a refused attempt), the identity parts are the client address."""
        cdef list parts = []
        for kind, name in policy.key_parts:
            if kind == "consumer":
                parts.append(req.consumer if req.consumer is not None and not anonymous
                             else b"ip:" + self._limit_client(req, policy))
            elif kind == "ip":
                parts.append(self._limit_client(req, policy))
            elif kind == "claim" and anonymous:
                parts.append(b"ip:" + self._limit_client(req, policy))
            elif kind == "route":
                parts.append(req.rule.route.name.encode())
            elif kind == "service":
                service = req.rule.route.service
                parts.append(service.name.encode() if service is not None else b"")
            elif kind == "header":
                parts.append(_header_value(req.headers, name))
            elif kind == "query":
                parts.append(_query_value(req.query, name))
            elif kind == "profile":
                parts.append(req.profile.encode() if req.profile is not None else b"")
            else:                                 # claim: from the jwt plugin, when it ran
                claims = req.view.ctx.get("jwt_claims") if req.view is not None else None
                value = claims.get(name.decode()) if claims else None
                parts.append(b"" if value is None else str(value).encode())
        return b"\0".join(parts)

    cdef bytes _limit_client(self, Request req, Policy policy):
        """The client address as ip_filter reads it (fastgw/plugins/client_address.py): the
        socket peer, or what a trusted proxy says. The gateway's own calls carry their client."""
        if self.listener.internal:
            return self.client_ip
        if policy.client_key is None:
            return self.peer_ip
        return policy.client_key(self.peer_ip, self.client_ip, req.forwarded_for)

    # --- plugins (fastgw/plugins): only routes that have a chain come here -----------------------

    cdef bint _run_plugins(self, Request req):
        """The filters phase. True: the request goes on to the next phase now; False: it was
        answered, or an async plugin decides (its result goes on from _awaited)."""
        if req.rule.route.plugins.ratelimits and self._rate_limited(req, True):
            return False                          # refused before authentication
        natives = req.rule.route.plugins.native
        if natives is not None:
            return self._run_native_checks(req, natives)
        req.view = self._plugin_view(req)
        try:
            result = req.rule.route.plugins.run_request(req.view)
        except Exception as exc:
            return self._plugins_decided(req, exc)
        if result is None or isinstance(result, PluginResponse):
            return self._plugins_decided(req, result)
        self._await(req, result, AWAIT_PLUGINS)      # an async plugin
        return False

    cdef object _plugin_view(self, Request req):
        """The fastgw.Request that plugins and handlers see."""
        return PluginRequest(
            req.method.decode("latin-1"), req.host.decode("latin-1"), req.path.decode("latin-1"),
            req.query.decode("latin-1"), Headers(raw=req.headers),
            self.client_ip.decode(), self.peer_ip.decode(), req.rule.route.name,
            request_id_of(req).decode("latin-1"),
            req.forwarded_for.decode("latin-1") if req.forwarded_for is not None else None,
            self.transport.get_extra_info("peercert") if self.listener.scheme is not HTTP_SCHEME else None)

    cdef bint _run_native_checks(self, Request req, tuple natives):
        """Every plugin of the route has a data-plane check (fastgw/_core/native.pyx). True when
        they all let the request through."""
        for check in natives:
            try:
                result = (<NativeCheck>check).run(req.headers, self.peer_ip, self.client_ip,
                                                  req.forwarded_for, req.consumer)
            except Exception as exc:
                return self._plugins_decided(req, exc)
            if result is None:
                continue
            if type(result) is bytes:
                req.consumer = result
                continue
            if not self._refusal_limited(req, result):
                self._write_plugin_answer(req, result)
            return False
        return True

    cdef void _await(self, Request req, object work, int then):
        """Run `work` (an awaitable: an async plugin, Redis limits, a handler) for `req`: reads
        pause and the body is held (at most one read) until it is done; then its result (or
        exception) goes on to `then`, unless the client went away meanwhile."""
        req.in_plugins = True
        self._pause(PAUSE_PLUGIN)
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda t, r=req, k=then: self._awaited(r, t, k))

    def _awaited(self, Request req, task, int then):
        if task.cancelled() or self.state == CLIENT_CLOSED or req is not self.active:
            return
        req.in_plugins = False
        self._resume(PAUSE_PLUGIN)
        exc = task.exception()
        result = exc if exc is not None else task.result()
        if then == AWAIT_PLUGINS:
            if self._plugins_decided(req, result):
                self._advance(req)
        elif then == AWAIT_LIMITS:
            self._remote_limits_decided(req, result)
        else:
            self._handler_done(req, result)

    cdef bint _plugins_decided(self, Request req, object result):
        """Take what the plugins changed and return True (the request goes on to its next
        phase), or answer as they said and return False."""
        view = req.view
        if isinstance(result, BaseException):
            log_exception(f"plugin failed on route {req.rule.route.name}", result)
            self._write_plugin_answer(req, PluginResponse.error(500, "plugin_error", "a plugin failed"))
            return False
        if view.consumer is not None:
            req.consumer = view.consumer.name.encode()
        if result is not None:
            if not self._refusal_limited(req, result):
                self._write_plugin_answer(req, result)
            return False
        try:
            if view.headers.changed:
                req.headers = _encode_fields(view.headers)
            query = view.query.encode("latin-1")
            if query != req.query:
                if query and (query[0] != 0x3F or any(c <= 0x20 or c >= 0x7F for c in query)):
                    raise ValueError(f"invalid query string {view.query!r} from a plugin")
                req.query = query
        except ValueError as exc:
            return self._plugins_decided(req, exc)
        return True

    cdef void _write_plugin_answer(self, Request req, object resp):
        """A plugin's local answer, after the response plugins saw it."""
        req.body_buffer = None
        if resp.status < 200 or resp.status > 599:
            resp = PluginResponse.error(500, "plugin_error", f"a plugin answered status {resp.status}")
        if resp.headers.get("content-type") == "application/json" and resp.body.startswith(b'{"error"'):
            # Our error shape: the request id goes into the body as on every other error.
            resp.body = error_body_with_request_id(req, resp.body)
        fields = self._answer_fields(req, resp)
        if req.cache_key is not None and req.rule.route.kind == ROUTE_HANDLER:
            if resp.status >= 500 and self._serve_stale(req):
                return
            if req.cache_fill:
                self._cache_begin(req, resp.status, fields)
                if req.cache_parts is not None:
                    self._cache_store(req, resp.body)
            fields += [b"x-cache", b"MISS"]
        # A handler's answer is the route's: its response_headers edits apply, as to a proxied one.
        self._write_answer(req, resp.status, fields, resp.body,
                           req.rule.route.response_edits if req.rule.route.kind == ROUTE_HANDLER else None)

    cdef void _write_answer(self, Request req, int status, list fields, bytes body, HeaderEdits edits):
        """A whole answer made here (fastgw/_core/answers.pyx) goes out; the request is finished."""
        self.closing = write_answer(self.out, req, status, fields, body, edits, self.closing)
        self._flush()
        self._response_finished(req)

    # --- handler routes (aggregation, gRPC): Python answers with the whole request at hand ------

    cdef void _run_handler(self, Request req):
        req.answer_ready = False
        if req.view is None:
            req.view = self._plugin_view(req)
        body = b"".join(req.body_buffer) if req.body_buffer else b""
        req.body_buffer = None
        forward = {"x-request-id": request_id_of(req).decode("latin-1"),
                   "traceparent": self._outgoing_traceparent(req).decode("latin-1")}
        if req.consumer is not None:
            forward["x-consumer-name"] = req.consumer.decode("latin-1")
        try:
            work = req.rule.route.handler.handle(req.view, req.rule.params(req.path, &req.caps),
                                                 body, forward, req.profile)
        except Exception as exc:
            self._handler_done(req, exc)
            return
        self._await(req, work, AWAIT_HANDLER)

    def _handler_done(self, Request req, result):
        if isinstance(result, BaseException):
            log_exception(f"handler of route {req.rule.route.name} failed", result)
            result = PluginResponse.error(500, "handler_error", "the route's handler failed")
        elif not isinstance(result, PluginResponse):
            result = PluginResponse.error(500, "handler_error", "the route's handler answered nothing")
        if result.stream is not None:
            self._write_stream_head(req, result)
        else:
            self._write_plugin_answer(req, result)

    cdef list _answer_fields(self, Request req, resp):
        """A made answer's header fields, after the route's response plugins saw it (fields
        that cannot be sent as bytes are dropped)."""
        if req.view is not None and req.rule.route.plugins is not None:
            req.rule.route.plugins.run_response(req.view, resp)
        try:
            return _encode_fields(resp.headers)
        except ValueError:
            return []

    def _write_stream_head(self, Request req, resp):
        """A handler's streamed answer (gRPC server streaming as NDJSON): the head now, each
        chunk as the handler's iterator yields it (_pump_stream)."""
        cdef WriteBuffer o = self.out
        fields = self._answer_fields(req, resp)
        req.status = resp.status
        o.write_bytes(<bytes>STATUS_LINES[resp.status])
        o.write_bytes(date_header())
        write_fields(o, fields, req.rule.route.response_edits)
        o.write(b"x-request-id: ", 14)
        o.write_bytes(request_id_of(req))
        o.write(b"\r\n", 2)
        if req.http11:
            o.write(b"transfer-encoding: chunked\r\n", 28)
            req.chunked_out = req.method != b"HEAD"
        else:
            self.closing = True           # HTTP/1.0: the body ends when we close
        self.closing = write_connection_header(o, req, self.closing)
        o.write(b"\r\n", 2)
        req.response_started = True
        req.bytes_out += o.length
        self._flush()
        asyncio.ensure_future(_pump_stream(self, req, resp.stream))

    def _stream_chunk(self, Request req, bytes chunk):
        """False when the client is gone (the handler's stream is then closed)."""
        if self.state == CLIENT_CLOSED or req is not self.active:
            return False
        if req.method != b"HEAD":
            self.upstream_body(chunk)
            self._flush()
        return True

    def _stream_end(self, Request req, bint complete):
        if self.state == CLIENT_CLOSED or req is not self.active:
            return
        if not complete:
            req.flags = "UC"              # cut short: the client must not see a complete body
            self._log(req)
            self._abort_client()
            return
        if req.chunked_out:
            self.out.write(b"0\r\n\r\n", 5)
        self._flush()
        self._response_finished(req)

    cdef bytes _outgoing_traceparent(self, Request req):
        cdef WriteBuffer h = _scratch
        self._write_traceparent(h, req)
        return h.take()

    cdef list _response_plugins(self, Request req, int* status, list headers):
        """The response plugins of the route look at (and may change) the upstream's answer."""
        resp = PluginResponse(status[0], Headers([(headers[i].decode("latin-1"), headers[i + 1].decode("latin-1"))
                                                   for i in range(0, len(headers), 2)]))
        req.rule.route.plugins.run_response(req.view, resp)
        if 200 <= resp.status <= 599:
            status[0] = resp.status
        if not resp.headers.changed:
            return headers
        try:
            return _encode_fields(resp.headers)
        except ValueError:
            return headers


    cdef void _forward(self, Request req):
        cdef Service service = <Service>req.rule.route.service
        cdef Py_ssize_t n = len(service.targets)
        cdef Target target
        cdef unsigned long long now = monotonic_ns()
        if n == 0:
            target = None
        elif n == 1:                      # nothing to choose: no balancer call at all
            target = service.targets[0]
            if not target_available(target.metric_slot, now):
                target = None
        else:
            target = (<Balancer>service.balancer).pick(
                self._hash_key(req, service.hash_on) if service.hash_on is not None else None)
        if target is None and service.backup_balancer is not None:
            target = (<Balancer>service.backup_balancer).pick(None)
        cdef UpstreamConnection conn
        cdef bint reused = False
        cdef double timeout = req.rule.route.timeout
        if target is None and service.unresolved and n == 0:
            # Not a connect error: no name of the service resolved, so there is no one to ask.
            req.flags = "DF"
            self._fail_request(req, 503, "upstream_unresolved",
                               "no target name of the service resolves (DNS)")
            return
        if target is None or not circuit_admit(target.metric_slot, now):
            req.flags = "UH"
            if service.circuit_window > 0 and _any_circuit_open(service.targets):
                self._fail_request(req, 503, "circuit_open",
                                   "the circuit breaker of every available target is open")
            else:
                self._fail_request(req, 503, "no_healthy_upstream", "no target of the service is up")
            return
        conn = target.acquire(self, &reused)
        if conn is None:
            req.flags = "UO"
            self._fail_request(req, 503, "no_healthy_upstream",
                               "every target is at max_connections_per_target")
            return
        count_request(req, service)
        req.upstream_started = monotonic()
        req.deadline = req.upstream_started + timeout if timeout > 0 else 0
        self._start_try(req, service, target, conn, reused)
        if req.replay is None:
            self._build_upstream_head(req)
        if len(req.replay) == 1:
            conn.send(req.replay[0])
        else:
            conn.send_many(req.replay)
        if req.body_buffer is not None:
            chunks = req.body_buffer
            req.body_buffer = None
            for chunk in chunks:
                self._send_body(req, chunk)
        if req.body_done and req.chunked:
            # Also when the body had no data at all (only its last chunk), so nothing was held.
            conn.send(b"0\r\n\r\n")
            self._keep_for_replay(req, b"0\r\n\r\n")
        if req.expect_continue and not req.body_done and req.attempts == 1:
            self.transport.write(CONTINUE)

    cdef void _start_try(self, Request req, Service service, Target target,
                         UpstreamConnection conn, bint reused):
        """One try of `req` on `target` over `conn`: counted, and with its response-head
        deadline (the route timeout, or the per-try timeout when that comes first)."""
        cdef double deadline = req.deadline
        req.target = target
        req.target_counted = True
        target_begin(target.metric_slot)
        req.upstream = conn
        req.upstream_reused = reused
        req.collect = None                # a retry's answer starts afresh
        req.attempts += 1
        if service.per_try_timeout > 0 and \
                (deadline == 0 or req.upstream_started + service.per_try_timeout < deadline):
            deadline = req.upstream_started + service.per_try_timeout
        conn.begin(self, req.method == b"HEAD", deadline)
        conn.upgrade_expected = req.upgrade is not None

    cdef bytes _hash_key(self, Request req, tuple hash_on):
        """The consistent-hash key of a request, or None (then a random target)."""
        kind, name = hash_on
        if kind == "ip":
            return self.client_ip
        if kind == "path":
            return req.path
        if kind == "header" or kind == "cookie":
            wanted = b"cookie" if kind == "cookie" else name
            for i in range(0, len(req.headers), 2):
                if ascii_lower(<bytes>req.headers[i]) == wanted:
                    if kind == "header":
                        return req.headers[i + 1]
                    for part in (<bytes>req.headers[i + 1]).split(b";"):
                        key, _, value = part.strip().partition(b"=")
                        if key == name:
                            return value
            return None
        if kind == "query":
            for part in req.query[1:].split(b"&"):
                key, _, value = part.partition(b"=")
                if key == name:
                    return value
            return None
        return req.consumer               # None before (or without) authentication

    cdef void _write_upstream_target(self, WriteBuffer h, Request req):
        """The request target sent upstream: the route's path rewrite, then its query."""
        cdef PathRule rule = req.rule
        rule.write_path(h, PyBytes_AS_STRING(req.path), PyBytes_GET_SIZE(req.path), &req.caps)
        if rule.route.query_rewrite is not None:
            h.write_bytes(rule.route.query_rewrite)
        else:
            h.write_bytes(req.query)

    cdef str _upstream_uri(self, Request req):
        """For the access log: the target that went upstream, or None when none went."""
        if req.attempts == 0 or req.rule is None or req.path is None:
            return None
        cdef WriteBuffer h = WriteBuffer()
        self._write_upstream_target(h, req)
        return h.take().decode("latin-1")

    cdef void _build_upstream_head(self, Request req):
        cdef WriteBuffer h = _scratch
        cdef PathRule rule = req.rule
        cdef HeaderEdits edits = rule.route.request_edits
        cdef list headers = req.headers
        h.write_bytes(req.method)
        h.write(b" ", 1)
        self._write_upstream_target(h, req)
        h.write(b" HTTP/1.1\r\nhost: ", 17)
        h.write_bytes(rule.route.host_rewrite if rule.route.host_rewrite is not None else req.host)
        h.write(b"\r\n", 2)
        if _has_client_address_field(headers) and not (
                rule.route.plugins is not None and rule.route.plugins.trusted is not None and
                rule.route.plugins.trusted.trusts_peer(self.peer_ip)):
            headers = _without_client_address_fields(headers)
        write_fields(h, headers, edits)
        h.write(b"x-forwarded-for: ", 17)
        if req.forwarded_for is not None:
            h.write_bytes(req.forwarded_for)
            h.write(b", ", 2)
        h.write_bytes(self.client_ip)
        h.write(b"\r\nx-forwarded-proto: ", 21)
        h.write_bytes(self.listener.scheme)
        h.write(b"\r\nx-forwarded-host: ", 20)
        h.write_bytes(req.host)
        h.write(b"\r\nvia: 1.1 fastgw\r\nx-request-id: ", 33)
        h.write_bytes(request_id_of(req))
        if req.consumer is not None:
            h.write(b"\r\nx-consumer-name: ", 19)
            h.write_bytes(req.consumer)
        h.write(b"\r\ntraceparent: ", 15)
        self._write_traceparent(h, req)
        if req.upgrade is not None:
            h.write(b"\r\nconnection: upgrade\r\nupgrade: ", 32)
            h.write_bytes(req.upgrade)
        if req.chunked:
            h.write(b"\r\ntransfer-encoding: chunked\r\n\r\n", 32)
        elif req.content_length > 0:
            h.write(b"\r\ncontent-length: ", 18)
            h.write_int(req.content_length)
            h.write(b"\r\n\r\n", 4)
        elif req.content_length == 0 or _method_expects_body(req.method):
            h.write(b"\r\ncontent-length: 0\r\n\r\n", 23)
        else:
            h.write(b"\r\n\r\n", 4)
        req.replay = [h.take()]

    cdef void _write_traceparent(self, WriteBuffer h, Request req):
        """W3C Trace Context: keep trace id and flags, new parent id; start a trace if none."""
        cdef bytes tp = req.traceparent
        cdef const char* s
        if tp is not None and PyBytes_GET_SIZE(tp) == 55:
            s = PyBytes_AS_STRING(tp)
            if s[0] == b'0' and s[1] == b'0' and s[2] == b'-' and s[35] == b'-' and \
                    s[52] == b'-' and _is_hex(s + 3, 32) and _is_hex(s + 53, 2):
                req.span_id = random64()
                # The caller's sampling decision stands (flags bit 0, W3C Trace Context §3.2.2.5).
                req.sampled = _hex_value(s[54]) & 1
                h.write(s, 36)
                h.write_hex_fixed(req.span_id, 16)
                h.write(s + 52, 3)
                return
        req.traceparent = None
        req.trace_hi = random64()
        req.trace_lo = random64()
        req.span_id = random64()
        req.sampled = self.listener.trace_sample_ratio > 0 and \
            (random64() >> 11) * (1.0 / 9007199254740992.0) < self.listener.trace_sample_ratio
        h.write(b"00-", 3)
        h.write_hex_fixed(req.trace_hi, 16)
        h.write_hex_fixed(req.trace_lo, 16)
        h.write(b"-", 1)
        h.write_hex_fixed(req.span_id, 16)
        h.write(b"-01" if req.sampled else b"-00", 3)

    cdef void _send_body(self, Request req, bytes data):
        cdef WriteBuffer h
        if req.chunked:
            if PyBytes_GET_SIZE(data) == 0:
                return
            h = _scratch
            h.write_hex(PyBytes_GET_SIZE(data))
            h.write(b"\r\n", 2)
            chunk_head = h.take()
            req.upstream.send_many([chunk_head, data, b"\r\n"])
            self._keep_for_replay(req, chunk_head)
            self._keep_for_replay(req, data)
            self._keep_for_replay(req, b"\r\n")
        else:
            req.upstream.send(data)
            self._keep_for_replay(req, data)

    cdef inline void _keep_for_replay(self, Request req, bytes data):
        if req.replay is not None:
            if req.body_bytes > REPLAY_LIMIT:
                req.replay = None
            else:
                req.replay.append(data)

    # --- answers produced here -------------------------------------------------------------------

    cdef void _answer_echo(self, Request req):
        payload = echo_body(req, self.client_ip)
        # The echo service's answer is the route's: response edits and plugins apply to it.
        cdef int status = 200
        cdef list fields = ECHO_FIELDS
        if req.view is not None and req.rule.route.plugins.response_plugins:
            fields = self._response_plugins(req, &status, fields)
        self._write_answer(req, status, fields, payload, req.rule.route.response_edits)

    cdef void _fail_request(self, Request req, int status, str code, str message):
        """Answer `req` with a JSON error and finish it."""
        req.status = status
        self.closing = write_error(self.out, req, status, code, message, self.closing)
        self._flush()
        self._response_finished(req)

    # --- the upstream's answer (Downstream interface) --------------------------------------------

    cdef int upstream_head(self, UpstreamConnection conn, int status, list headers,
                           int framing, long long length) except -1:
        cdef Request req = self.active
        cdef WriteBuffer o = self.out
        cdef HeaderEdits edits = req.rule.route.response_edits
        cdef Service service = <Service>req.rule.route.service
        service.record_result(req.target, status >= 500)
        if retries_status(req, service, status) and self._retry_elsewhere(req):
            conn.abort()                  # its answer is not wanted: drop it with the connection
            return 0
        req.upstream_status = status
        req.upstream_elapsed = monotonic() - req.upstream_started
        if status == 101:
            self._start_tunnel(req, conn, headers)
            return 0
        if req.cache_key is not None:
            if status >= 500 and req.cache_stale is not None and self._serve_stale(req):
                conn.abort()
                return 0
            if req.cache_fill:
                self._cache_begin(req, status, headers)
        if req.rule.route.shapes is not None and req.profile is not None and \
                req.method != b"HEAD" and _is_json(headers):
            req.collect = req.rule.route.shapes.get(req.profile)
            if req.collect is not None:
                # Reshaped for the client's profile: held whole, answered at the end.
                req.collect_status = status
                req.collect_headers = headers
                req.collect_parts = []
                req.collect_bytes = 0
                return 0
        if req.view is not None and req.rule.route.plugins.response_plugins:
            headers = self._response_plugins(req, &status, headers)
        req.status = status
        req.response_started = True
        o.write_bytes(<bytes>STATUS_LINES[status])
        write_fields(o, headers, edits)
        if req.cache_key is not None:
            o.write(b"x-cache: MISS\r\n", 15)
        if not conn.has_date:
            o.write_bytes(date_header())      # RFC 9110 §6.6.1: a proxy with a clock adds it
        if framing == FRAMING_LENGTH or (framing == FRAMING_NONE and length >= 0):
            o.write(b"content-length: ", 16)
            o.write_int(length)
            o.write(b"\r\n", 2)
        elif framing == FRAMING_CHUNKED or framing == FRAMING_CLOSE:
            if req.http11:
                o.write(b"transfer-encoding: chunked\r\n", 28)
                req.chunked_out = True
            else:
                self.closing = True       # HTTP/1.0: the body ends when we close
        elif framing == FRAMING_NONE and conn.chunked:
            o.write(b"transfer-encoding: chunked\r\n", 28)
        self.closing = write_connection_header(o, req, self.closing)
        o.write(b"\r\n", 2)
        return 0

    cdef void _start_tunnel(self, Request req, UpstreamConnection conn, list headers):
        """The upstream switched protocols (RFC 9110 §7.8): pass its 101 on, then bytes both ways as
        they come, with each side's backpressure holding the other's reads."""
        cdef WriteBuffer o = self.out
        cdef Service service = <Service>req.rule.route.service
        req.status = 101
        req.response_started = True
        o.write_bytes(<bytes>STATUS_LINES[101])
        write_fields(o, headers, req.rule.route.response_edits)
        o.write(b"connection: upgrade\r\nupgrade: ", 30)
        o.write_bytes(conn.upgrade)
        o.write(b"\r\n\r\n", 4)
        # The handshake is the request's latency sample; the tunnel stays an active connection
        # of the target (least_conn balances WebSockets by how many are open).
        if req.target_counted:
            req.target_counted = False
            target_end(req.target.metric_slot, req.upstream_elapsed, False)
            target_begin(req.target.metric_slot)
            req.tunnel_counted = True
        if req.service_counted:
            uncount_request(req, service)
        self.tunnel = conn
        self.upgrading = None
        self.queued = []                  # nothing after the upgrade request is HTTP
        self._flush()
        for chunk in self.upgrade_rest or ():
            conn.tunnel_send(chunk)
        self.upgrade_rest = None
        self._resume(PAUSE_UPGRADE)

    cdef void _end_tunnel(self):
        """Either side closed, or the tunnel was idle for timeouts.read: close both."""
        cdef UpstreamConnection conn = self.tunnel
        cdef Request req = self.active
        self.tunnel = None
        conn.abort()
        if req is not None:
            req.upstream = None
            if req.tunnel_counted:
                req.tunnel_counted = False
                target_release(req.target.metric_slot)
            req.response_done = True
            self._log(req)
            self.active = None
        self._close()

    cdef int upstream_tunnel_eof(self) except -1:
        self.tunnel_upstream_eof = True
        if self.tunnel_client_eof:
            self._end_tunnel()
        else:
            self._flush()
            if self.state != CLIENT_CLOSED and self.transport.can_write_eof():
                self.transport.write_eof()
        return 0

    cdef int upstream_tunnel_closed(self) except -1:
        if self.tunnel is not None:
            self._end_tunnel()
        return 0

    cdef int upstream_body(self, object data) except -1:
        """`data` is bytes, or a memoryview of more than 16 KiB (written without a copy)."""
        cdef Request req = self.active
        cdef WriteBuffer o = self.out
        cdef Py_ssize_t n = len(data)
        if req.collect is not None:
            req.collect_bytes += n
            if req.collect_bytes > COLLECT_LIMIT:
                req.collect = None
                req.upstream.abort()
                req.upstream = None
                self._fail_request(req, 502, "upstream_error", "the JSON answer to reshape is too large")
                return 0
            req.collect_parts.append(bytes(data))
            return 0
        if req.cache_parts is not None:
            req.cache_bytes += n
            if req.cache_bytes > req.rule.route.plugins.cache.max_entry_bytes:
                req.cache_parts = None    # too large to keep: passed through only
            else:
                req.cache_parts.append(bytes(data))
        req.bytes_out += n
        if req.chunked_out:
            if n == 0:
                return 0
            o.write_hex(n)
            o.write(b"\r\n", 2)
            if n <= 16384:
                o.write(PyBytes_AS_STRING(data), n)
                o.write(b"\r\n", 2)
            else:
                self.transport.writelines([o.take(), data, b"\r\n"])
        elif n <= 16384 and o.length + n <= 65536:
            o.write(PyBytes_AS_STRING(data), n)
        else:
            if o.length:
                self.transport.writelines([o.take(), data])
            else:
                self.transport.write(data)
        return 0

    cdef int upstream_flush(self) except -1:
        self._flush()
        return 0

    cdef bint upstream_complete(self, UpstreamConnection conn) except -1:
        cdef Request req = self.active
        if req.collect is not None:
            req.upstream = None
            self._answer_collected(req)
            return req.body_done
        if req.chunked_out:
            self.out.write(b"0\r\n\r\n", 5)
        req.upstream = None
        if req.cache_parts is not None:
            self._cache_store(req, b"".join(req.cache_parts))
        self._flush()
        self._response_finished(req)
        return req.body_done

    cdef void _answer_collected(self, Request req):
        """The held JSON answer, reshaped for the client's profile."""
        cdef int status = req.collect_status
        cdef list headers = req.collect_headers
        shape, req.collect = req.collect, None
        try:
            body = shape.apply_json(b"".join(req.collect_parts))
        except ValueError as exc:
            req.collect_parts = None
            self._fail_request(req, 502, "upstream_error", f"cannot reshape the answer: {exc}")
            return
        req.collect_parts = None
        if req.view is not None and req.rule.route.plugins is not None and \
                req.rule.route.plugins.response_plugins:
            headers = self._response_plugins(req, &status, headers)
        self._write_answer(req, status, headers, body, req.rule.route.response_edits)

    cdef int upstream_failed(self, UpstreamConnection conn, int error) except -1:
        cdef Request req = self.active
        if req is None or req.upstream is not conn:
            return 0
        if conn is self.tunnel:
            self._end_tunnel()            # idle for timeouts.read, or gone
            return 0
        req.upstream = None
        if retries_stale_connection(req, error) and self._retry_fresh(req, conn.head_deadline):
            # A pooled connection the upstream closed as we reused it (RFC 9112 §9.3.1.1): not
            # the target failing, so the same try goes on over a fresh connection, whether it is
            # the first try or a retry (fastgw/_core/retry.pyx decides).
            return 0
        cdef Service service = <Service>req.rule.route.service
        if error != UPSTREAM_POOL_FULL:
            service.record_result(req.target, True)
        # Connect failures retry any method, resets and per-try timeouts only idempotent ones
        # (RFC 9110 §9.2.2): fastgw/_core/retry.pyx decides, the retry is made here.
        if retries_failure(req, service, error) and self._retry_elsewhere(req):
            return 0
        if req.response_started and error == UPSTREAM_INVALID and req.bytes_out == 0 and self.out.length:
            # Invalid framing in the read that brought the head: the head is still in our
            # buffer and no body byte went on, so the client has seen nothing yet: a 502.
            self.out.take()
            req.response_started = False
            req.chunked_out = False
            req.cache_parts = None
        if req.response_started:
            # Part of the answer is out: the client must see it cut short, never "complete".
            req.flags = "UC"
            req.cache_parts = None
            self._log(req)
            self._abort_client()
            return 0
        if self._serve_stale(req):
            return 0
        if error == UPSTREAM_CONNECT_FAILED:
            req.flags = "UF"
            self._fail_request(req, 502, "upstream_error", "could not connect to the upstream")
        elif error == UPSTREAM_CONNECT_TIMEOUT:
            req.flags = "UF"
            self._fail_request(req, 504, "upstream_timeout", "timed out connecting to the upstream")
        elif error == UPSTREAM_TIMEOUT:
            req.flags = "UT"
            self._fail_request(req, 504, "upstream_timeout", "the upstream did not answer in time")
        elif error == UPSTREAM_INVALID:
            self._fail_request(req, 502, "upstream_error", "invalid response from the upstream")
        else:
            req.flags = "UC"
            self._fail_request(req, 502, "upstream_error", "the upstream closed the connection")
        return 0

    cdef bint _retry_fresh(self, Request req, double head_deadline):
        """Send `req` again to its target over a new connection, within the try's deadline.
        False when the target is at max_connections_per_target (then it is retried elsewhere)."""
        cdef bint reused
        cdef UpstreamConnection conn
        # The pool is used newest first: the connections under the stale one are older, most
        # likely closed too (or the target restarted), so none of them is tried.
        req.target.drop_idle()
        conn = req.target.acquire(self, &reused)
        if conn is None:
            return False
        req.upstream = conn
        req.upstream_reused = False
        req.attempts += 1
        conn.begin(self, req.method == b"HEAD", head_deadline)
        conn.send_many(req.replay)
        return True

    cdef bint _retry_elsewhere(self, Request req):
        """Send what we hold of `req` to another target than the one that just failed.
        False when there is no other target to try."""
        cdef Service service = <Service>req.rule.route.service
        cdef Target failed = req.target, target
        cdef UpstreamConnection conn
        cdef bint reused = False
        cdef unsigned long long now = monotonic_ns()
        if len(service.targets) < 2:
            return False
        # Not the target that failed, and rather not one that refused us lately (Balancer.pick).
        target = (<Balancer>service.balancer).pick(
            self._hash_key(req, service.hash_on) if service.hash_on is not None else None, failed)
        if target is None or not circuit_admit(target.metric_slot, now):
            return False
        conn = target.acquire(self, &reused)
        if conn is None:
            return False
        if req.target_counted:
            target_end(failed.metric_slot, monotonic() - req.upstream_started, True)
        count_retry(req, service)
        req.upstream_started = monotonic()
        self._start_try(req, service, target, conn, reused)
        conn.send_many(req.replay)
        return True

    cdef int upstream_writable(self, bint writable) except -1:
        if writable:
            self._resume(PAUSE_UPSTREAM)
        else:
            self._pause(PAUSE_UPSTREAM)
        return 0

    # --- finishing requests ----------------------------------------------------------------------

    cdef void _response_finished(self, Request req):
        req.phase = PHASE_DONE
        req.response_done = True
        self._log(req)
        if req.body_done:
            self._finish(req)
        elif self.closing or not can_discard(req):
            self._linger_close()
        # else: the rest of the body is read and dropped, then _on_message_done finishes it

    cdef void _linger_close(self):
        """Answer sent, body unread: stop sending, drop what still comes for a moment, close.
        Closing at once would make the kernel reset the connection and the client could lose
        the answer (RFC 9112 §9.6)."""
        self.closing = True
        self.state = CLIENT_LINGERING
        self.active = None
        self.queued = []
        self._flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._resume(self.paused)
        self.arm(monotonic() + LINGER_SECONDS)

    cdef void _finish(self, Request req):
        """`req` is answered and fully read: close, or go on with the next request."""
        cdef Request nxt
        if req is not self.active:
            return
        self.active = None
        if self.state == CLIENT_CLOSED:
            return
        if self.closing and not self.fatal_status:
            self._close()
            return
        if self.in_finish_loop:
            return                        # the loop below picks up the next request
        self.in_finish_loop = True
        try:
            while self.active is None and self.queued and self.state != CLIENT_CLOSED:
                nxt = self.queued.pop(0)
                self._dispatch(nxt)
                if self.active is None and self.closing and not self.fatal_status:
                    self._close()
                    return
        finally:
            self.in_finish_loop = False
        if self.active is None and not self.queued:
            if self.fatal_status:
                self._reject_pending()
                return
            self._resume(PAUSE_PIPELINE)
            if self.parsing is None:
                self.arm(monotonic() + self.listener.idle_timeout)
            elif not self.in_head:
                self.arm(self._body_deadline())   # the next request's body, read from now on

    def close_if_idle(self):
        self.closing = True
        if self.active is None and self.parsing is None:
            self._close()

    cdef void _log(self, Request req):
        """The request is over (answered, failed or abandoned): let go of what it holds, then
        record it (fastgw/_core/observe.pyx) and run the route's log plugins. Called exactly once
        per request."""
        cdef object sink = self.listener.access_log
        cdef double now = monotonic()
        cdef RouteEntry route
        if req.method is None:
            return
        route = req.rule.route if req.rule is not None else None
        if req.target_counted:
            req.target_counted = False
            # Failed: no response head came, or the body was cut short.
            target_end(req.target.metric_slot, now - req.upstream_started,
                       req.upstream_status == 0 or req.flags == "UC")
        if req.cache_fill:
            req.cache_fill = False
            waiting = route.plugins.cache.filling.pop(req.cache_key, None)
            if waiting:
                self.loop.call_soon(_wake_cache_waiters, waiting, route.plugins.cache)
        if req.limit_release is not None:
            for entry in req.limit_release:
                release(<uint64_t*><size_t>entry)
            req.limit_release = None
        if req.service_counted:
            uncount_request(req, <Service>route.service)
        record_finished(req, route, self.listener.internal, self.listener.tracer, self.client_ip,
                        now)
        if req.view is not None and route.plugins is not None and route.plugins.log_plugins:
            route.plugins.run_log(req.view, PluginResponse(req.status))
        if sink is not None:
            write_access_log(sink, req, self.client_ip, self._upstream_uri(req), now)

    # --- transport helpers -----------------------------------------------------------------------

    cdef inline void _flush(self):
        if self.out.length and self.state != CLIENT_CLOSED:
            self.transport.write(self.out.take())

    cdef void _pause(self, int reason):
        if self.paused == 0 and self.state != CLIENT_CLOSED:
            self.transport.pause_reading()
        self.paused |= reason

    cdef void _resume(self, int reason):
        if self.paused & reason:
            self.paused &= ~reason
            if self.paused == 0 and self.state != CLIENT_CLOSED:
                self.transport.resume_reading()

    cdef void _close(self):
        if self.state != CLIENT_CLOSED:
            self.state = CLIENT_CLOSED
            self._flush()
            self.transport.close()

    cdef void _abort_client(self):
        if self.state != CLIENT_CLOSED:
            self.state = CLIENT_CLOSED
            self.out.take()
            self.transport.abort()

    # --- header, body and idle timeouts ----------------------------------------------------------

    cdef double _body_deadline(self):
        """limits.body_timeout from now: the next request body byte is due by then (0: off)."""
        return monotonic() + self.listener.body_timeout if self.listener.body_timeout > 0 else 0

    cdef void _body_timed_out(self):
        """No byte of the active request's body for limits.body_timeout: 408 and close (the
        upstream, which got part of the body, is cut). Not while we stopped reading ourselves."""
        if self.paused:
            self.arm(self._body_deadline())
        elif self.active.response_done:
            self._close()                 # answered already: only its unread rest is missing
        else:
            self._reject_now(408, "request_timeout", "request body not received in time")

    cdef double due(self):
        return 0 if self.state == CLIENT_CLOSED else self.deadline

    cdef void expired(self):
        if self.state == CLIENT_LINGERING:
            self._close()
        elif self.write_blocked:
            if self.active is not None:
                self.active.flags = "DC"
                self._log(self.active)
                if self.active.upstream is not None:
                    self.active.upstream.abort()
                    self.active.upstream = None
            # Reset rather than close: a close would leave the kernel trickling its full send
            # buffer to a peer that does not read (nginx: reset_timedout_connection).
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self._abort_client()
        elif self.active is not None and self.parsing is self.active:
            self._body_timed_out()
        elif self.active is not None:
            return
        elif self.parsing is not None or self.in_head:
            self._reject_now(408, "request_timeout", "request head not received in time")
        else:
            self._close()                 # idle keep-alive connection


cdef int _request_line_version(object data):
    """11 or 10 when `data` starts with a whole request line ending in HTTP/1.1 or HTTP/1.0,
    else 0 (then the parser is asked). Spares a per-request string from httptools; llhttp still
    validates the line."""
    if type(data) is not bytes:
        return 0
    cdef const char* s = PyBytes_AS_STRING(<bytes>data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(<bytes>data)
    cdef const char* cr = <const char*>memchr(s, b'\r', n if n < 8192 else 8192)
    if cr is NULL or cr - s < 12 or memcmp(cr - 9, b" HTTP/1.", 8) != 0:
        return 0
    if (cr - 1)[0] == b'1':
        return 11
    if (cr - 1)[0] == b'0':
        return 10
    return 0


cdef bytes GET = b"GET", POST = b"POST", PUT = b"PUT", DELETE = b"DELETE", HEAD = b"HEAD"


cdef bytes _request_line_method(bytes data):
    """The method of a request line that starts `data`, when it is one of the common ones (as
    a shared constant: no bytes object per request), else None (then httptools is asked).
    llhttp still validates the line."""
    cdef const char* s = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n > 4 and memcmp(s, b"GET ", 4) == 0:
        return GET
    if n > 5 and memcmp(s, b"POST ", 5) == 0:
        return POST
    if n > 4 and memcmp(s, b"PUT ", 4) == 0:
        return PUT
    if n > 5 and memcmp(s, b"HEAD ", 5) == 0:
        return HEAD
    if n > 7 and memcmp(s, b"DELETE ", 7) == 0:
        return DELETE
    return None


cdef inline bint _method_expects_body(bytes method):
    """POST/PUT/PATCH without a body still get "content-length: 0" (RFC 9110 §8.6)."""
    cdef const char* m = PyBytes_AS_STRING(method)
    return m[0] == b'P' and PyBytes_GET_SIZE(method) in (3, 4, 5)


cdef enum:
    TARGET_FRAGMENT = 1
    TARGET_NEEDS_NORMALISING = 2


cdef int _scan_target(bytes url, Py_ssize_t* query_at):
    """Flags for a request target, and the offset of its '?' (-1 if none)."""
    cdef const char* s = PyBytes_AS_STRING(url)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(url)
    cdef int flags = 0
    cdef bint in_query = False
    query_at[0] = -1
    for i in range(n):
        if s[i] == b'#':
            return TARGET_FRAGMENT
        if in_query:
            continue
        if s[i] == b'?':
            in_query = True
            query_at[0] = i
        elif s[i] == b'%' or s[i] == b'\\' or ((s[i] == b'.' or s[i] == b'/') and i > 0 and s[i - 1] == b'/'):
            flags |= TARGET_NEEDS_NORMALISING
    return flags


cdef bytes _absolute_form(Request req, bytes url):
    """`http://authority/path?query` (RFC 9112 §3.2.2): the authority becomes the request's Host,
    the rest its target; None when `url` is not an http(s) URI with an authority."""
    cdef Py_ssize_t start, end, n = PyBytes_GET_SIZE(url)
    lower = url[:8].lower()
    if lower.startswith(b"http://"):
        start = 7
    elif lower.startswith(b"https://"):
        start = 8
    else:
        return None
    end = start
    while end < n and url[end] != 47 and url[end] != 63:      # '/', '?'
        end += 1
    if end == start:
        return None
    req.host = url[start:end]
    if end == n or url[end] == 63:
        return b"/" + url[end:]                                # "http://h?q" is "/?q"
    return url[end:]


cdef inline bint _answers_locally(RouteEntry route):
    """Echo and handler routes answer here once they hold the whole request body."""
    return route.kind == ROUTE_ECHO or route.kind == ROUTE_HANDLER


cdef bint _is_json(list headers):
    cdef Py_ssize_t i
    for i in range(0, len(headers), 2):
        if ascii_lower(<bytes>headers[i]) == b"content-type":
            return b"json" in ascii_lower(<bytes>headers[i + 1])
    return False


async def _pump_stream(conn, req, stream):
    complete = False
    try:
        async for chunk in stream:
            if not conn._stream_chunk(req, chunk):
                break
        else:
            complete = True
    except Exception as exc:
        log_exception("a handler's stream failed", exc)
    finally:
        if hasattr(stream, "aclose"):
            await stream.aclose()
    conn._stream_end(req, complete)


def _wake_cache_waiters(list waiting, cache):
    for conn, req in waiting:
        conn._cache_wake(req, cache)
