# cython: language_level=3
"""Upstream side: services, targets, keep-alive pools and one HTTP/1.1 exchange per connection.

An UpstreamConnection parses responses with httptools and reports to its Downstream (the client
connection) through C-level calls. The common answer (a whole head in the first read, plain
fields, a Content-Length body) is read by the codec's head scanner instead (`_simple_response`,
with fastgw/_core/http1.pyx `scan_fields`), which hands anything it does not fully validate to
httptools. Responses get the same strictness as requests: anything that is not valid HTTP/1.x, or
whose framing is ambiguous (RFC 9112 §6.3), fails the exchange and discards the connection.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr

from fastgw._core.buffer cimport ascii_lower, monotonic
from fastgw._core.health cimport (circuit_admit, circuit_record, target_available, target_eject,
                                  target_end, target_failure, target_success)
from fastgw._core.http1 cimport (CONN_CLOSE, CONN_KEEP_ALIVE, CONN_NAMES, H_CONNECTION, H_CONTENT_LENGTH,
                                 H_DATE, H_TRANSFER_ENCODING, H_UPGRADE, HEAD_FIELDS_MAX, FieldSpan,
                                 connection_flags, connection_options, connection_tokens, content_length_of,
                                 drop_named, end_of_head, hop_by_hop_field, known_header,
                                 parse_content_length, plain_text, scan_fields, status_line)
from fastgw._core.shm cimport CIRCUIT_CLOSED, CIRCUIT_OPEN, monotonic_ns, target_begin

import asyncio

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from fastgw.log import log


cdef class Downstream:
    cdef int upstream_head(self, UpstreamConnection conn, int status, list headers,
                           int framing, long long length) except -1:
        return 0

    cdef int upstream_body(self, object data) except -1:
        return 0

    cdef int upstream_flush(self) except -1:
        return 0

    cdef bint upstream_complete(self, UpstreamConnection conn) except -1:
        return False

    cdef int upstream_failed(self, UpstreamConnection conn, int error) except -1:
        return 0

    cdef int upstream_writable(self, bint writable) except -1:
        return 0

    cdef int upstream_tunnel_eof(self) except -1:
        return 0

    cdef int upstream_tunnel_closed(self) except -1:
        return 0


cdef enum:
    PASS_THROUGH_MIN = 16384      # body bytes still due for a response to skip the parser

class _InvalidResponse(Exception):
    """Raised inside parser callbacks to stop llhttp on a response we refuse."""


cdef class Target:
    def __init__(self, Service service, str address, int weight=1, int metric_slot=-1,
                 str server_name=None):
        host, _, port = address.rpartition(":")
        self.service = service
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.server_name = server_name or self.host
        self.weight = weight
        self.idle = []
        self.open_connections = 0
        self.active = 0
        self.metric_slot = metric_slot

    cdef UpstreamConnection acquire(self, Downstream down, bint* reused):
        """An idle pooled connection, or a new one being connected (None if the cap is hit)."""
        cdef UpstreamConnection conn
        while self.idle:
            conn = self.idle.pop()
            if conn.state == CONN_IDLE:         # a closed one left the list in _close_idle
                reused[0] = True
                conn.state = CONN_BUSY
                return conn
        reused[0] = False
        if self.service.max_connections and self.open_connections >= self.service.max_connections:
            return None
        return self._connect(down)

    cdef UpstreamConnection _connect(self, Downstream down):
        # Apart from acquire: the lambdas below make Cython allocate a closure scope on every
        # call of the function that holds them, and acquire's pooled path needs none.
        cdef UpstreamConnection conn = UpstreamConnection(self)
        self.open_connections += 1
        conn.downstream = down
        conn.arm(monotonic() + self.service.connect_timeout)
        if self.service.ssl_context is None:
            connecting = conn.loop.create_connection(lambda: conn, self.host, self.port)
        else:
            connecting = conn.loop.create_connection(
                lambda: conn, self.host, self.port, ssl=self.service.ssl_context,
                server_hostname=self.service.tls_server_name or self.server_name,
                ssl_handshake_timeout=self.service.connect_timeout)
        conn.connect_task = conn.loop.create_task(connecting)
        conn.connect_task.add_done_callback(conn._on_connect_done)
        return conn

    cdef void release(self, UpstreamConnection conn):
        if self.retired or len(self.idle) >= self.service.max_idle or conn.transport is None:
            conn.abort()
            return
        conn.state = CONN_IDLE
        conn.downstream = None
        if conn.paused_by_client:
            # The last client's backpressure paused it; idle it must read (to see a close) and
            # the next exchange must get its answer.
            conn.set_reading(True)
        conn.last_activity = monotonic()
        conn.arm(conn.last_activity + self.service.idle_timeout)
        self.idle.append(conn)

    cdef void drop_idle(self):
        """Close every pooled connection."""
        for conn in self.idle:
            (<UpstreamConnection>conn).abort()
        self.idle.clear()

    # --- calls made by other clients than UpstreamConnection (gRPC) -----------------------------

    def call_admitted(self):
        """Begin a call to this target: False when its circuit breaker refuses it."""
        if not circuit_admit(self.metric_slot, monotonic_ns()):
            return False
        target_begin(self.metric_slot)
        return True

    def call_finished(self, double seconds, bint failed):
        """The call's result counts like a proxied request's: latency EWMA, the circuit breaker,
        passive health."""
        target_end(self.metric_slot, seconds, failed)
        self.service.record_result(self, failed)

    def retire(self):
        """Its service was replaced by a reload: close the idle pool, and close busy connections
        when their exchange ends instead of pooling them."""
        self.retired = True
        self.drop_idle()

    def __repr__(self):
        return f"<Target {self.address} open={self.open_connections} idle={len(self.idle)}>"


cdef class Service:
    def __init__(self, str name, int kind=0, *, double connect_timeout=5.0,
                 double read_timeout=60.0, double write_timeout=60.0, double idle_timeout=60.0,
                 int max_idle=128, int max_connections=0):
        self.name = name
        self.kind = kind
        self.targets = []
        self.backups = []
        self.balancer = None
        self.backup_balancer = None
        self.hash_on = None
        self.passive_failures = 0
        self.ejection_time = 30.0
        self.max_ejected_percent = 50
        self.circuit_window = 0
        self.retries = 1
        self.retry_connect = True
        self.retry_reset = True
        self.retry_statuses = frozenset()
        self.per_try_timeout = 0
        self.budget_ratio = -1
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_connections = max_connections

    def add_target(self, str address, int weight=1, int metric_slot=-1, bint backup=False,
                   str server_name=None):
        target = Target(self, address, weight, metric_slot, server_name)
        (self.backups if backup else self.targets).append(target)
        return target

    cdef void record_result(self, Target target, bint failed):
        """Feed one result to the circuit breaker and to passive health (Envoy's outlier
        detection): `passive_failures` failures in a row eject the target for ejection_time x
        (its ejections + 1), at most 10 x; never more than max_ejected_percent of the service's
        targets at once."""
        cdef unsigned long long now, base
        cdef long long failures
        cdef int down = 0, change
        if self.circuit_window > 0:
            change = circuit_record(target.metric_slot, monotonic_ns(), failed,
                                    <unsigned long long>(self.circuit_window * 1e9),
                                    self.circuit_min_requests, self.circuit_failure_ratio,
                                    <unsigned long long>(self.circuit_open_for * 1e9),
                                    self.circuit_trials)
            if change == CIRCUIT_OPEN:
                log(f"circuit of {self.name} target {target.address} is open for "
                    f"{self.circuit_open_for:g}s", "warning")
            elif change == CIRCUIT_CLOSED:
                log(f"circuit of {self.name} target {target.address} is closed again")
        if self.passive_failures <= 0:
            return
        if not failed:
            target_success(target.metric_slot)
            return
        failures = target_failure(target.metric_slot)
        if failures < self.passive_failures:
            return
        now = monotonic_ns()
        for t in self.targets:
            if not target_available((<Target>t).metric_slot, now):
                down += 1
        if (down + 1) * 100 > self.max_ejected_percent * len(self.targets):
            return
        base = <unsigned long long>(self.ejection_time * 1e9)
        if target_eject(target.metric_slot, now, base, base * 10):
            log(f"ejected {self.name} target {target.address} after {failures} failures in a row",
                "warning")

    def keep_target(self, Target target, bint backup=False):
        """Take over a target (and its pooled connections) of the service this one replaces."""
        (self.backups if backup else self.targets).append(target)

    def __repr__(self):
        return f"<Service {self.name} targets={len(self.targets)}>"


cdef class UpstreamConnection:
    def __init__(self, Target target):
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.transport = None
        self.parser = HttpResponseParser(self)
        self.state = CONN_CONNECTING
        self.pending = []
        self.headers = []
        self.connection_tokens = None
        self.head_deadline = 0
        self.content_length = -1

    # --- the exchange, driven by the client connection -------------------------------------------

    cdef int begin(self, Downstream down, bint head_request, double head_deadline) except -1:
        self.downstream = down
        self.head_request = head_request
        self.head_deadline = head_deadline
        self.interim = False
        self.head_done = False
        self.framing = FRAMING_NONE
        self.complete = False
        self.keep_alive = False
        self.error = UPSTREAM_OK
        self.received = 0
        self.content_length = -1
        self.chunked = False
        self.body_received = 0
        self.body_left = 0
        self.sends = 0
        self.has_date = False
        self.connection = 0
        self.peeked_status = 0
        self.peeked_version = 0
        self.headers = []
        self.connection_tokens = None
        self.upgrade_expected = False
        self.upgrade = None
        self.last_activity = monotonic()
        self.target.active += 1
        self.arm(self.due())
        return 0

    cdef int send(self, object data) except -1:
        self.sends += 1
        if self.transport is not None:
            self.transport.write(data)
        else:
            self.pending.append(data)
        return 0

    cdef int send_many(self, list chunks) except -1:
        self.sends += 2
        if self.transport is not None:
            self.transport.writelines(chunks)
        else:
            self.pending.extend(chunks)
        return 0

    cdef int tunnel_send(self, object data) except -1:
        """Client bytes after a 101: written as they are (activity in either direction keeps
        the tunnel open for another timeouts.read)."""
        self.last_activity = monotonic()
        if self.transport is not None:
            self.transport.write(data)
        return 0

    cdef void tunnel_write_eof(self):
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    cdef void set_reading(self, bint reading):
        self.paused_by_client = not reading
        if self.transport is None or self.state == CONN_CLOSED:
            return
        if reading:
            self.last_activity = monotonic()
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    cdef void abort(self):
        if self.state == CONN_CLOSED:
            return
        if self.state == CONN_BUSY:
            self.target.active -= 1
        self.state = CONN_CLOSED
        self.downstream = None
        self.disarm()
        if self.transport is not None:
            self.transport.abort()
        elif self.connect_task is not None:
            self.connect_task.cancel()
            self.parser = None            # no connection_lost will come to break the cycle

    cdef int _fail(self, int error) except -1:
        cdef Downstream down = self.downstream
        self.error = error
        if error == UPSTREAM_CONNECT_FAILED:
            self.target.connect_failed_at = monotonic()
        self.abort()
        if down is not None:
            down.upstream_failed(self, error)
        return 0

    cdef int _finish(self) except -1:
        cdef Downstream down = self.downstream
        cdef bint reusable = self.keep_alive and self.error == UPSTREAM_OK
        self.target.active -= 1
        self.state = CONN_IDLE
        self.downstream = None
        if self.head_request:
            # llhttp does not know the request was HEAD and would wait for the body its
            # Content-Length announces: start the next response on a fresh parser.
            self.parser = HttpResponseParser(self)
        if down is not None and not down.upstream_complete(self):
            reusable = False          # the request body was not fully sent
        if reusable and (self.write_blocked or self.sends > 1) and \
                self.transport.get_write_buffer_size():
            reusable = False          # part of that body still waits in our buffer
        if reusable:
            self.target.release(self)
        else:
            self.abort()
        return 0

    # --- deadlines ------------------------------------------------------------------------------

    cdef double due(self):
        cdef double d
        if self.state == CONN_BUSY:
            if self.paused_by_client:
                return 0                  # a client that does not read is not the upstream's fault
            d = self.last_activity + self.target.service.read_timeout
            if self.received == 0 and self.head_deadline and self.head_deadline < d:
                d = self.head_deadline
            if self.write_blocked and self.write_blocked_at + self.target.service.write_timeout < d:
                d = self.write_blocked_at + self.target.service.write_timeout
            return d
        return 0 if self.state == CONN_CLOSED else self.deadline

    cdef void expired(self):
        if self.state == CONN_CONNECTING:
            self._fail(UPSTREAM_CONNECT_TIMEOUT)
        elif self.state == CONN_BUSY:
            self._fail(UPSTREAM_TIMEOUT)
        else:
            self._close_idle()

    cdef void _close_idle(self):
        try:
            self.target.idle.remove(self)
        except ValueError:
            pass
        self.abort()

    # --- asyncio protocol ------------------------------------------------------------------------

    def _on_connect_done(self, task):
        self.connect_task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.state == CONN_CONNECTING:
            self._fail(UPSTREAM_CONNECT_FAILED)

    def connection_made(self, transport):
        if self.state == CONN_CLOSED:
            transport.abort()
            return
        self.transport = transport
        self.state = CONN_BUSY
        self.connect_task = None
        self.target.connect_failed_at = 0
        if self.pending:
            transport.writelines(self.pending)
            self.pending = []
        if self.paused_by_client:
            transport.pause_reading()
        self.last_activity = monotonic()
        self.arm(self.due())
        if self.downstream is not None:
            self.downstream.upstream_writable(True)

    def data_received(self, data):
        if self.state != CONN_BUSY:
            # Bytes on an idle connection are not an answer to anything: drop the connection.
            self._close_idle()
            return
        self.last_activity = monotonic()
        if self.tunneling:
            self.downstream.upstream_body(data)
            self.downstream.upstream_flush()
            return
        if self.body_left > 0:
            self._pass_body(data)
            return
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t head_end = -1
        if self.received == 0:
            self.peeked_version = status_line(data, &self.peeked_status)
            if self.peeked_version:
                head_end = end_of_head(data)
                if head_end > 0 and self._simple_response(<bytes>data, head_end):
                    return
                if n <= PASS_THROUGH_MIN:
                    head_end = -1
        self.received += n
        try:
            if head_end > 0:
                # A big first read: parse the head alone, so that a long Content-Length body in
                # the rest of it can bypass the parser (no copy) like the reads after it.
                self.parser.feed_data(memoryview(data)[:head_end])
                if self._starts_pass_through(n - head_end):
                    self._pass_body(memoryview(data)[head_end:])
                    return
                if head_end < n:
                    self.parser.feed_data(memoryview(data)[head_end:])
            else:
                self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # The 101's head is out (on_headers_complete): what follows it is the new protocol.
            if self.tunneling and exc.args[0] < n:
                self.downstream.upstream_body(data[exc.args[0]:])
            self.downstream.upstream_flush()
            return
        except (HttpParserError, _InvalidResponse):
            if self.complete and self.state == CONN_BUSY and not self.interim:
                # The answer was whole; what followed it (a second response, a body sent with
                # a 204/304 or to a HEAD) is not the answer to anything: it ends the connection.
                self.keep_alive = False
                if self.downstream is not None:
                    self.downstream.upstream_flush()
                self._finish()
            else:
                self._fail(UPSTREAM_INVALID)
            return
        if self.state != CONN_BUSY:
            return
        self._starts_pass_through(0)
        if self.downstream is not None:
            self.downstream.upstream_flush()
        if self.complete:
            self._finish()

    cdef bint _simple_response(self, bytes data, Py_ssize_t head_end) except -1:
        """Read the head of `data` (it ends at `head_end`) in one scan, without llhttp and a
        Python callback per field, when it is the common case: a final status other than
        204/304 to a request that is not HEAD and asked for no upgrade, fields that are plain
        tokens and text on CRLF lines, one Content-Length, no Transfer-Encoding and no
        Connection header naming other fields, and no more bytes than that body. The body then
        passes through as read. Anything else returns False with nothing changed, and the
        parser reads the response (and refuses it if it is invalid)."""
        cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), eol, count, i
        cdef const unsigned char* nl
        cdef int status = self.peeked_status, connection = 0, known
        cdef long long length = -1
        cdef bint has_date = False, keep_alive
        cdef list headers = []
        cdef FieldSpan spans[HEAD_FIELDS_MAX]
        cdef FieldSpan* f
        if status < 200 or status == 204 or status == 304 or self.head_request or \
                self.upgrade_expected:
            return False
        # The status line (RFC 9112 §4): "HTTP/1.x NNN " was checked by status_line(); then the
        # reason.
        nl = <const unsigned char*>memchr(s, b'\n', head_end)
        eol = nl - s
        if eol < 13 or s[eol - 1] != b'\r' or not plain_text(s + 13, eol - 14):
            return False
        count = scan_fields(s, eol + 1, head_end, spans, HEAD_FIELDS_MAX)
        if count < 0:
            return False
        for i in range(count):
            f = &spans[i]
            known = f.known
            if known == H_CONTENT_LENGTH:
                if length != -1:
                    return False
                length = content_length_of(<const char*>s + f.value, f.value_end - f.value)
                if length < 0:
                    return False
            elif known == H_TRANSFER_ENCODING:
                return False
            elif known == H_CONNECTION:
                connection |= connection_options(<const char*>s + f.value, f.value_end - f.value)
                if connection & CONN_NAMES:
                    return False
            elif not hop_by_hop_field(known, <const char*>s + f.name, f.colon - f.name):
                if known == H_DATE:
                    has_date = True
                headers.append(PyBytes_FromStringAndSize(<const char*>s + f.name, f.colon - f.name))
                headers.append(PyBytes_FromStringAndSize(<const char*>s + f.value, f.value_end - f.value))
        if length < 0 or n - head_end > length:
            return False
        # The same state as the parser's callbacks would leave (on_header, on_headers_complete).
        self.received = head_end
        self.peeked_status = 0
        self.headers = headers
        self.content_length = length
        self.connection = connection
        self.has_date = has_date
        self.framing = FRAMING_LENGTH
        self.head_done = True
        if self.peeked_version == 11:
            keep_alive = not (connection & CONN_CLOSE)
        else:
            keep_alive = bool(connection & CONN_KEEP_ALIVE) and not (connection & CONN_CLOSE)
        self.keep_alive = keep_alive
        self.body_left = length
        if self.downstream is not None:
            self.downstream.upstream_head(self, status, headers, FRAMING_LENGTH, length)
        if self.state != CONN_BUSY:
            return True                       # the head ended the exchange (a retry elsewhere)
        if n > head_end:
            # A short rest is copied (not data[head_end:]: Cython slices bytes through a slice
            # object); a long one is passed on as a view.
            self._pass_body(memoryview(data)[head_end:] if n - head_end > PASS_THROUGH_MIN else
                            PyBytes_FromStringAndSize(<const char*>s + head_end, n - head_end))
        elif length == 0:
            self.complete = True
            if self.downstream is not None:
                self.downstream.upstream_flush()
            self._finish()
        elif self.downstream is not None:
            self.downstream.upstream_flush()
        return True

    cdef bint _starts_pass_through(self, Py_ssize_t unparsed) except -1:
        """Switch to passing a long Content-Length body through as read, without the parser's
        copy of every chunk. The parser would wait for that body: the next response gets a
        fresh one."""
        if self.state != CONN_BUSY or self.complete or self.interim or not self.head_done or \
                self.framing != FRAMING_LENGTH or \
                self.content_length - self.body_received < PASS_THROUGH_MIN:
            return False
        self.body_left = self.content_length - self.body_received
        self.parser = HttpResponseParser(self)
        if self.downstream is not None and unparsed == 0:
            self.downstream.upstream_flush()
        return True

    cdef int _pass_body(self, object data) except -1:
        cdef Py_ssize_t n = len(data)
        self.received += n
        if n > self.body_left:
            # More than the announced length: the connection is out of step, never reuse it.
            data = data[:self.body_left]
            n = self.body_left
            self.keep_alive = False
        self.body_left -= n
        if n <= PASS_THROUGH_MIN and type(data) is not bytes:
            data = bytes(data)                 # small pieces are copied into the write batch
        if self.downstream is not None:
            self.downstream.upstream_body(data)
            self.downstream.upstream_flush()
        if self.body_left == 0 and self.state == CONN_BUSY:
            self.complete = True
            self._finish()
        return 0

    def eof_received(self):
        if self.tunneling:
            if self.downstream is not None:
                self.downstream.upstream_tunnel_eof()
            return True                   # half-closed: the client may still send
        if self.state == CONN_BUSY:
            if not self.head_done:
                self._fail(UPSTREAM_RESET)
            elif self.framing != FRAMING_CLOSE or self.body_left:
                self._fail(UPSTREAM_CLOSED_EARLY)
            else:
                # A close-delimited body (RFC 9112 §6.3 rule 8) ends here.
                self.keep_alive = False
                self.complete = True
                if self.downstream is not None:
                    self.downstream.upstream_flush()
                self._finish()
        elif self.state == CONN_IDLE:
            self._close_idle()
        return False

    def connection_lost(self, exc):
        cdef Downstream down = self.downstream
        if self.tunneling:
            self.tunneling = False
            if self.state == CONN_BUSY:   # not aborted by us already
                self.target.active -= 1
                self.state = CONN_CLOSED
                self.downstream = None
                if down is not None:
                    down.upstream_tunnel_closed()
        elif self.state == CONN_BUSY:
            self.eof_received()
        elif self.state == CONN_IDLE:
            self._close_idle()
        elif self.state == CONN_CONNECTING:
            self._fail(UPSTREAM_CONNECT_FAILED)
        self.disarm()
        self.state = CONN_CLOSED
        self.target.open_connections -= 1
        self.transport = None
        self.parser = None                # it holds our bound methods: break the cycle

    def pause_writing(self):
        self.write_blocked = True
        self.write_blocked_at = monotonic()
        self.arm(self.due())
        if self.downstream is not None:
            self.downstream.upstream_writable(False)

    def resume_writing(self):
        self.write_blocked = False
        self.last_activity = monotonic()
        if self.downstream is not None:
            self.downstream.upstream_writable(True)

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self):
        if self.head_done:
            # Bytes after the end of the final response (RFC 9112 §6.3 says where it ends),
            # in the same read: never taken as the answer to the next request on this connection.
            raise _InvalidResponse("bytes after the end of the response")

    def on_header(self, bytes name, bytes value):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
        cdef const char* s = PyBytes_AS_STRING(name)
        cdef int known = known_header(s, n)
        if known == H_CONTENT_LENGTH:
            # RFC 9112 §6.3 rule 5: a repeated or invalid length is unrecoverable framing.
            if self.content_length != -1:
                raise _InvalidResponse("duplicate Content-Length")
            self.content_length = parse_content_length(value)
            if self.content_length < 0:
                raise _InvalidResponse("invalid Content-Length")
        elif known == H_TRANSFER_ENCODING:
            # Only exactly "chunked" is understood (RFC 9112 §6.1); anything else is ambiguous
            # framing.
            if self.chunked or ascii_lower(value) != b"chunked":
                raise _InvalidResponse("unsupported Transfer-Encoding")
            self.chunked = True
        elif known == H_CONNECTION:
            self.connection |= connection_flags(value)
            if self.connection & CONN_NAMES:
                self.connection_tokens = (self.connection_tokens or []) + connection_tokens(value)
        elif known == H_UPGRADE and self.upgrade_expected:
            self.upgrade = value
        elif not hop_by_hop_field(known, s, n):
            if known == H_DATE:
                self.has_date = True
            self.headers.append(name)
            self.headers.append(value)

    def on_headers_complete(self):
        cdef int status = self.peeked_status, version = self.peeked_version
        cdef int framing
        cdef bint keep_alive
        if status:
            self.peeked_status = 0            # only the first head of this read is peeked
        else:
            status = self.parser.get_status_code()
            self.peeked_version = 0
            # Not llhttp's should_keep_alive(): it does not know the request was HEAD and takes
            # an answer without Content-Length for a close-delimited body (RFC 9112 §6.3 rule 1:
            # it has none), closing a reusable connection.
            version = 11 if self.parser.get_http_version() == "1.1" else 10
        if self.chunked and self.content_length >= 0:
            raise _InvalidResponse("both Content-Length and Transfer-Encoding")
        if 100 <= status < 200:
            if status == 101:
                if not self.upgrade_expected or self.upgrade is None:
                    raise _InvalidResponse("101 Switching Protocols without an upgrade request")
                # RFC 9110 §7.8: after the 101 the connection is a raw tunnel; it never returns to the pool.
                self.tunneling = True
                self.head_done = True
                self.keep_alive = False
                if self.downstream is not None:
                    self.downstream.upstream_head(self, 101, self.headers, FRAMING_NONE, -1)
                return
            # RFC 9110 §15.2: interim responses are not the answer; wait for the final one.
            self.interim = True
            self.headers = []
            self.content_length = -1
            self.chunked = False
            self.connection = 0
            self.has_date = False
            return
        if self.head_request or status == 204 or status == 304:
            framing = FRAMING_NONE
        elif self.chunked:
            framing = FRAMING_CHUNKED
        elif self.content_length >= 0:
            framing = FRAMING_LENGTH
        else:
            framing = FRAMING_CLOSE
        self.framing = framing
        self.head_done = True
        if version == 11:
            keep_alive = not (self.connection & CONN_CLOSE)
        else:
            keep_alive = bool(self.connection & CONN_KEEP_ALIVE) and not (self.connection & CONN_CLOSE)
        self.keep_alive = framing != FRAMING_CLOSE and keep_alive
        if self.connection_tokens:
            self.headers = drop_named(self.headers, self.connection_tokens)
        if self.downstream is not None:
            self.downstream.upstream_head(self, status, self.headers, framing, self.content_length)
        if framing == FRAMING_NONE:
            self.complete = True

    def on_body(self, bytes data):
        self.body_received += PyBytes_GET_SIZE(data)
        if self.complete or self.interim:
            # Body bytes after a response that has none (HEAD): the connection is out of step.
            self.keep_alive = False
            return
        if self.downstream is not None:
            self.downstream.upstream_body(data)

    def on_message_complete(self):
        if self.interim:
            self.interim = False
            return
        if not self.tunneling:
            self.complete = True


# --- test entry point: one response read by a real UpstreamConnection, without a socket ---------

cdef class _RecordingDownstream(Downstream):
    """Keeps what an exchange reports, in order (tests only)."""
    cdef list events

    cdef int upstream_head(self, UpstreamConnection conn, int status, list headers,
                           int framing, long long length) except -1:
        self.events.append(("head", status, list(headers), framing, length))
        return 0

    cdef int upstream_body(self, object data) except -1:
        self.events.append(("body", bytes(data)))
        return 0

    cdef bint upstream_complete(self, UpstreamConnection conn) except -1:
        self.events.append(("complete", conn.keep_alive))
        return True

    cdef int upstream_failed(self, UpstreamConnection conn, int error) except -1:
        self.events.append(("failed", error))
        return 0


def _read_response(list reads, bint head_request=False, bint upgrade_expected=False,
                   bint eof=False):
    """Feed `reads` to a fresh connection as its transport would (then an EOF if `eof`).
    Returns the events it reported ("head", status, headers, framing, length), ("body", bytes),
    ("complete", keep_alive), ("failed", error), and whether llhttp read the head (False: the
    single-scan path did). Call it inside a running event loop: the exchange arms its timer."""
    cdef Target target = Target(Service("test"), "127.0.0.1:9")
    cdef UpstreamConnection conn = UpstreamConnection(target)
    cdef _RecordingDownstream down = _RecordingDownstream()
    first_parser = conn.parser
    down.events = []
    conn.state = CONN_BUSY                    # as connection_made leaves it
    conn.begin(down, head_request, 0)
    conn.upgrade_expected = upgrade_expected
    for data in reads:
        conn.data_received(data)
    if eof:
        conn.eof_received()
    conn.abort()
    return down.events, first_parser.get_status_code() != 0
