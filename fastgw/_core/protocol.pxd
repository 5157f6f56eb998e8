from fastgw._core.buffer cimport WriteBuffer
from fastgw._core.cache cimport CachedResponse, ResponseCache
from fastgw._core.router cimport Captures, HeaderEdits, PathRule, Router
from fastgw._core.ratelimit cimport Decision, Policy
from fastgw._core.request cimport Request
from fastgw._core.upstream cimport Downstream, Service, Target, UpstreamConnection

cdef enum PauseReason:
    PAUSE_PIPELINE = 1        # a complete request waits behind the active one
    PAUSE_UPSTREAM = 2        # the upstream's write buffer is full (request body backpressure)
    PAUSE_FATAL = 4           # a later request was invalid: read nothing more
    PAUSE_PLUGIN = 8          # an async plugin decides about the active request
    PAUSE_UPGRADE = 16        # an upgrade request waits for its 101: the next bytes are not HTTP


cdef enum ClientState:
    CLIENT_OPEN = 0               # reading and answering requests
    CLIENT_LINGERING = 1          # answered before its body ended: what still comes is dropped for
                                  # a moment, then the connection closes (RFC 9112 §9.6)
    CLIENT_CLOSED = 2             # closed, aborted or turned away: nothing more is read or written


cdef class ListenerState:
    """Per listener and worker: limits, the current routing table, counters."""
    cdef readonly str name
    cdef readonly object loop
    cdef public Router router
    cdef public object access_log          # callable(tuple) or None
    cdef public object tracer              # callable(tuple) for sampled requests, or None
    cdef public double trace_sample_ratio  # of requests that start a trace here
    cdef public bint draining
    cdef public long long max_header_bytes
    cdef public int max_headers
    cdef public long long max_url_bytes
    cdef public long long max_body_bytes
    cdef public double header_timeout
    cdef public double idle_timeout
    cdef public int max_connections
    cdef public int metric_slot           # shared-memory listener gauges, -1 = none
    cdef public bint accept_proxy         # a PROXY v1/v2 header starts every connection
    cdef public bint keep_escaped_slashes # %2F, %5C and a raw backslash in paths are kept, not refused
    cdef public object proxy_trusted      # ... from these peers (ip networks), None = any peer
    cdef public bint proxy_untrusted_plain   # other peers: read as plain HTTP (else refused)
    cdef public double body_timeout       # a request body stalled this long: 408
    cdef public bytes scheme              # b"http" or b"https" (X-Forwarded-Proto)
    cdef public bint internal             # requests made by the gateway itself (aggregation):
                                          # their x-consumer-name is believed
    cdef readonly int open_connections
    cdef readonly long long rejected_connections
    cdef readonly long long requests
    cdef readonly set connections


cdef class ClientConnection(Downstream):
    cdef object transport
    cdef ListenerState listener
    cdef object parser
    cdef bytes client_ip                  # the peer's, or the one a PROXY header gave
    cdef bytes peer_ip                    # always the socket peer's
    cdef bytes proxy_head                 # an incomplete PROXY header (accept_proxy)
    cdef Request parsing                  # the request whose bytes are being parsed
    cdef Request active                   # the request being answered
    cdef Request ready                    # active, dispatched when the current feed ends
    cdef list queued                      # complete heads waiting behind `active` (pipelining)
    cdef WriteBuffer out                  # response bytes batched into one write
    cdef int paused
    cdef bint closing
    cdef ClientState state
    cdef bint admitted                    # counted in open_connections
    cdef bint write_blocked               # the client is not reading what we send
    cdef bint in_head
    cdef int line_version                 # 11/10 read off the raw request line, 0 = ask httptools
    cdef bytes line_method                # a common method read off it, None = ask httptools
    cdef long long head_fed
    cdef int fatal_status
    cdef str fatal_code
    cdef str fatal_message
    cdef bint in_finish_loop
    # protocol upgrades (WebSocket, any 101): raw bytes both ways once the upstream agrees
    cdef Request upgrading                # the upgrade request waiting for its answer
    cdef list upgrade_rest                # client bytes after that request's head
    cdef UpstreamConnection tunnel        # after the 101
    cdef bint tunnel_client_eof
    cdef bint tunnel_upstream_eof

    cdef void _feed(self, data)
    cdef bint _simple_request(self, bytes data) except -1
    cdef int _on_url(self, bytes url) except -1
    cdef int _on_header(self, bytes name, bytes value, int known) except -1   # known: KnownHeader
    cdef int _on_headers_complete(self) except -1
    cdef list _answer_fields(self, Request req, resp)
    cdef void _dispatch_ready(self)
    cdef void _on_message_done(self)
    cdef int _reject(self, int status, str code, str message) except -1
    cdef void _reject_now(self, int status, str code, str message)
    cdef void _reject_pending(self)
    cdef void _dispatch(self, Request req)
    cdef bytes _read_proxy_header(self, data)
    cdef void _advance(self, Request req)
    cdef bint _route(self, Request req)
    cdef bint _rate_limited(self, Request req, bint before_plugins)
    cdef bint _refusal_limited(self, Request req, object resp)
    cdef bint _limit_decided(self, Request req, Policy policy, long long limit,
                             unsigned long long window_ns, Decision* d)
    cdef bytes _limit_key(self, Request req, Policy policy, bint anonymous)
    cdef bytes _limit_client(self, Request req, Policy policy)
    cdef bint _run_plugins(self, Request req)
    cdef bint _run_native_checks(self, Request req, tuple natives)
    cdef bint _plugins_decided(self, Request req, object result)
    cdef void _await(self, Request req, object work, int then)
    cdef void _remote_limits_decided(self, Request req, object results)
    cdef void _write_plugin_answer(self, Request req, object resp)
    cdef void _write_answer(self, Request req, int status, list fields, bytes body, HeaderEdits edits)
    cdef object _plugin_view(self, Request req)
    cdef void _run_handler(self, Request req)
    cdef bytes _outgoing_traceparent(self, Request req)
    cdef void _answer_collected(self, Request req)
    cdef bint _from_cache(self, Request req, ResponseCache cache)
    cdef void _write_cached(self, Request req, CachedResponse entry, bytes state, double now)
    cdef bint _serve_stale(self, Request req)
    cdef void _cache_begin(self, Request req, int status, list headers)
    cdef void _cache_store(self, Request req, bytes body)
    cdef bytes _cache_credential(self, Request req)
    cdef void _cache_wait(self, Request req, list waiting)
    cdef list _response_plugins(self, Request req, int* status, list headers)
    cdef void _forward(self, Request req)
    cdef void _start_try(self, Request req, Service service, Target target,
                         UpstreamConnection conn, bint reused)
    cdef bytes _hash_key(self, Request req, tuple hash_on)
    cdef void _build_upstream_head(self, Request req)
    cdef void _write_upstream_target(self, WriteBuffer h, Request req)
    cdef void _write_traceparent(self, WriteBuffer h, Request req)
    cdef void _send_body(self, Request req, bytes data)
    cdef void _keep_for_replay(self, Request req, bytes data)
    cdef void _answer_echo(self, Request req)
    cdef void _fail_request(self, Request req, int status, str code, str message)
    cdef void _start_tunnel(self, Request req, UpstreamConnection conn, list headers)
    cdef void _end_tunnel(self)
    cdef bint _retry_fresh(self, Request req, double head_deadline)
    cdef bint _retry_elsewhere(self, Request req)
    cdef void _response_finished(self, Request req)
    cdef void _linger_close(self)
    cdef double _body_deadline(self)
    cdef void _body_timed_out(self)
    cdef void _finish(self, Request req)
    cdef void _log(self, Request req)
    cdef void _note_limit(self, Request req, Policy policy, long long limit,
                          unsigned long long window_ns, Decision* d)
    cdef str _upstream_uri(self, Request req)
    cdef void _flush(self)
    cdef void _pause(self, int reason)
    cdef void _resume(self, int reason)
    cdef void _close(self)
    cdef void _abort_client(self)
