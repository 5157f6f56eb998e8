# cython: language_level=3
"""Layer 4: a `protocol: tcp` listener proxies bytes to one service's targets (and an `https`
listener with `tls.passthrough` to the service its clients' TLS server name picks).

Each client connection is balanced once, when it arrives (the service's algorithm; `consistent_hash`
on `ip`), and paired with one upstream connection. A connect that fails goes on to another target
(nothing was sent yet, so this is always safe) up to `retries.attempts` times. Bytes flow both ways
with backpressure coupled (a side that cannot keep up pauses the other's reading); a FIN is passed
on as a FIN (half-close), and the pair closes when both directions have ended, when either side
resets, or after the listener's `idle_timeout` without a byte either way.
"""
from fastgw._core.balancer cimport Balancer
from fastgw._core.buffer cimport monotonic
from fastgw._core.health cimport circuit_admit, target_available
from fastgw._core.shm cimport (listener_admits, listener_closed, monotonic_ns, target_begin,
                               target_release)
from fastgw._core.timer cimport TimedProtocol
from fastgw._core.upstream cimport Service, Target

import asyncio

from fastgw._core.proxyproto import ProxyHeaderError, build_proxy_header, parse_proxy_header, peer_trusted
from fastgw._core.sni import SniError, read_sni, sni_lookup

PENDING_LIMIT = 256 * 1024        # client bytes held while the upstream connects; then pause


cdef class TcpListenerState:
    """Per tcp listener and worker: its service and limits (swapped whole on reload; a
    connection keeps the service it started with)."""

    def __init__(self, str name, Service service, *, loop=None):
        self.name = name
        self.loop = loop if loop is not None else asyncio.get_event_loop()
        self.service = service
        self.accept_proxy = False
        self.proxy_trusted = None
        self.proxy_untrusted_plain = False
        self.header_timeout = 10.0
        self.idle_timeout = 60.0
        self.max_connections = 10000
        self.metric_slot = -1
        self.sni_exact = {}
        self.sni_wildcard = {}
        self.draining = False
        self.open_connections = 0
        self.rejected_connections = 0
        self.connections = set()

    def configure(self, *, header_timeout, idle_timeout, max_connections, metric_slot,
                  accept_proxy=False, proxy_trusted=None, proxy_untrusted_plain=False, **http_limits):
        """The listener limits that apply to bytes (the HTTP parsing limits do not)."""
        self.header_timeout = header_timeout          # for the PROXY header
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.metric_slot = metric_slot
        self.accept_proxy = accept_proxy
        self.proxy_trusted = proxy_trusted
        self.proxy_untrusted_plain = proxy_untrusted_plain

    def route_sni(self, dict routes, dict services):
        """TLS passthrough: server name ("api.example.com" or "*.example.com") -> service name."""
        self.sni_exact = {name: services[svc] for name, svc in routes.items() if not name.startswith("*.")}
        self.sni_wildcard = {name[2:]: services[svc] for name, svc in routes.items() if name.startswith("*.")}

    cdef Service service_for(self, server_name):
        found = sni_lookup(self.sni_exact, self.sni_wildcard, server_name)
        return found if found is not None else self.service

    def protocol_factory(self):
        return TcpClient(self)

    def close_idle_connections(self):
        """Drain: a byte stream has no point between requests to stop at, so connections run
        until they end or drain.timeout is over."""


cdef class TcpClient(TimedProtocol):

    def __init__(self, TcpListenerState listener):
        self.listener = listener
        self.loop = listener.loop
        self.service = listener.service
        self.pending = []
        self.preamble = b""
        self.tried = []

    # --- client side (asyncio protocol) ----------------------------------------------------------

    def connection_made(self, transport):
        cdef TcpListenerState listener = self.listener
        self.transport = transport
        if not listener_admits(listener.metric_slot, listener.max_connections, listener.open_connections):
            listener.rejected_connections += 1
            self.closed = True
            transport.abort()
            return
        self.admitted = True
        listener.open_connections += 1
        listener.connections.add(self)
        self.source = transport.get_extra_info("peername")
        self.dest = transport.get_extra_info("sockname")
        self.last_activity = monotonic()
        self.awaiting_proxy = listener.accept_proxy
        if self.awaiting_proxy and not peer_trusted(listener.proxy_trusted, self.source[0] if self.source else ""):
            if not listener.proxy_untrusted_plain:
                self._close(abort=True)   # only the balancers in front may say who the client is
                return
            self.awaiting_proxy = False
        self.awaiting_hello = bool(listener.sni_exact or listener.sni_wildcard)
        if self.awaiting_proxy or self.awaiting_hello:
            self.arm(self.last_activity + listener.header_timeout)
        else:
            self.arm(self.last_activity + listener.idle_timeout)
            self._connect_next()

    def data_received(self, data):
        self.last_activity = monotonic()
        if self.upstream_transport is not None:
            self.upstream_transport.write(data)
        elif self.closed:
            return
        elif self.awaiting_proxy or self.awaiting_hello:
            self._read_preamble(data)
        else:
            self._hold(data)

    def eof_received(self):
        if self.awaiting_proxy or self.awaiting_hello:
            self._close(abort=True)       # done sending before it said who it is or wants
            return False
        self.client_eof = True
        if self.upstream_transport is not None:
            self._pass_eof(self.upstream_transport)
        return True                       # keep our sending half open: the answer may follow

    def connection_lost(self, exc):
        if not self.admitted:
            return
        self.closed = True
        self.disarm()
        self.listener.open_connections -= 1
        self.listener.connections.discard(self)
        listener_closed(self.listener.metric_slot)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.upstream_transport is not None:
            # A client that reset its side resets ours; one that closed cleanly lets what we
            # still hold for the target go out first.
            if exc is None:
                self.upstream_transport.close()
            else:
                self.upstream_transport.abort()
        self._release_target()

    def pause_writing(self):
        if self.upstream_transport is not None:
            self.upstream_transport.pause_reading()

    def resume_writing(self):
        if self.upstream_transport is not None:
            self.upstream_transport.resume_reading()

    # --- deadlines -------------------------------------------------------------------------------

    cdef double due(self):
        if self.closed:
            return 0
        if self.awaiting_proxy or self.awaiting_hello:
            return self.deadline
        return self.last_activity + self.listener.idle_timeout

    cdef void expired(self):
        self._close(abort=True)

    # --- what comes before the stream: PROXY header, TLS ClientHello ----------------------------

    cdef void _read_preamble(self, data):
        """A PROXY header from a trusted balancer in front (its client address replaces the
        peer's), then for TLS passthrough the ClientHello, whose server name picks the service.
        Neither is consumed from the stream sent on except the PROXY header."""
        cdef bytes head = self.preamble + bytes(data)
        if self.awaiting_proxy:
            try:
                used, client = parse_proxy_header(head)
            except ProxyHeaderError:
                self._close(abort=True)
                return
            if used == 0:
                self.preamble = head
                return
            self.awaiting_proxy = False
            if client is not None:
                self.source = client
            head = head[used:]
        if self.awaiting_hello:
            try:
                complete, server_name = read_sni(head)
            except SniError:
                self._close(abort=True)
                return
            if not complete:
                self.preamble = head
                return
            self.awaiting_hello = False
            self.service = self.listener.service_for(server_name)
            if self.service is None:          # no route for that name and no default service
                self._close(abort=True)
                return
        self.preamble = b""
        if head:
            self._hold(head)
        self.arm(self.last_activity + self.listener.idle_timeout)
        self._connect_next()

    cdef void _hold(self, data):
        """Client bytes that arrive before the target accepted; past PENDING_LIMIT, stop reading."""
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > PENDING_LIMIT:
            self.transport.pause_reading()

    # --- upstream side ---------------------------------------------------------------------------

    cdef Target _pick(self):
        """A target not tried yet for this connection, by the service's balancer when it offers
        one, else the next one up."""
        cdef Service service = self.service
        cdef Target target = None
        cdef unsigned long long now = monotonic_ns()
        key = self.source[0].encode() if self.source else None
        if len(service.targets) > 1:
            target = (<Balancer>service.balancer).pick(key)
        elif service.targets and target_available((<Target>service.targets[0]).metric_slot, now):
            target = service.targets[0]
        if target is None or target in self.tried:
            target = None
            for candidate in service.targets:
                if candidate not in self.tried and target_available((<Target>candidate).metric_slot, now):
                    target = candidate
                    break
        if target is None and service.backup_balancer is not None:
            target = (<Balancer>service.backup_balancer).pick(None)
            if target in self.tried:
                target = None
        if target is not None and not circuit_admit(target.metric_slot, now):
            target = None
        return target

    cdef void _connect_next(self):
        cdef Target target = self._pick()
        if target is None:
            self._close(abort=False)
            return
        self.target = target
        self.tried.append(target)
        self.counted = True               # counted from now: least_conn must see it connecting
        target_begin(target.metric_slot)
        self.connect_task = asyncio.ensure_future(asyncio.wait_for(
            self.loop.create_connection(lambda: TcpUpstream(self), target.host, target.port),
            self.service.connect_timeout))
        self.connect_task.add_done_callback(self._on_connect_done)

    def _on_connect_done(self, task):
        if task is not self.connect_task:
            return                        # cancelled because the client went away
        self.connect_task = None
        if task.cancelled() or self.closed:
            return
        if task.exception() is None:
            return                        # TcpUpstream.connection_made has taken over
        self.service.record_result(self.target, True)
        self._release_target()
        self.target = None
        if self.service.retry_connect and len(self.tried) <= self.service.retries:
            self._connect_next()
        else:
            self._close(abort=False)

    cdef void upstream_made(self, TcpUpstream upstream, object transport):
        if self.closed:
            transport.abort()
            return
        self.upstream_transport = transport
        self.service.record_result(self.target, False)
        if self.service.send_proxy_protocol:
            transport.write(build_proxy_header(self.service.send_proxy_protocol, self.source, self.dest))
        if self.pending:
            transport.writelines(self.pending)
            self.pending = []
            self.pending_bytes = 0
            self.transport.resume_reading()
        if self.client_eof:
            self._pass_eof(transport)

    cdef void upstream_data(self, data):
        self.last_activity = monotonic()
        self.transport.write(data)

    cdef void upstream_eof(self):
        self.upstream_done = True
        self._pass_eof(self.transport)

    cdef void upstream_lost(self, object exc):
        self.upstream_transport = None
        self._release_target()
        if not self.closed:
            self._close(abort=exc is not None)

    cdef void _pass_eof(self, transport):
        """Half-close: pass a FIN on; once both directions have ended, the pair is done."""
        if transport.can_write_eof():
            transport.write_eof()
        if self.client_eof and self.upstream_done:
            self._close(abort=False)

    cdef void _release_target(self):
        if self.counted:
            self.counted = False
            target_release(self.target.metric_slot)

    cdef void _close(self, bint abort):
        if self.upstream_transport is not None:
            if abort:
                self.upstream_transport.abort()
            else:
                self.upstream_transport.close()
        if abort:
            self.transport.abort()
        else:
            self.transport.close()


cdef class TcpUpstream:
    """The target side of a TcpClient's pair."""

    def __init__(self, TcpClient client):
        self.client = client

    def connection_made(self, transport):
        self.client.upstream_made(self, transport)

    def data_received(self, data):
        self.client.upstream_data(data)

    def eof_received(self):
        self.client.upstream_eof()
        return True

    def connection_lost(self, exc):
        self.client.upstream_lost(exc)
        self.client = None

    def pause_writing(self):
        self.client.transport.pause_reading()

    def resume_writing(self):
        if not self.client.closed:
            self.client.transport.resume_reading()
