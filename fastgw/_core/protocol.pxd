from fastgw._core.buffer cimport WriteBuffer
from fastgw._core.cache cimport CachedResponse, ResponseCache
from fastgw._core.router cimport Captures, HeaderEdits, PathRule, Router
from fastgw._core.ratelimit cimport Decision, Policy
from fastgw._core.upstream cimport Downstream, Service, Target, UpstreamConnection

cdef enum PauseReason:
    PAUSE_PIPELINE = 1        # a complete request waits behind the active one
    PAUSE_UPSTREAM = 2        # the upstream's write buffer is full (request body backpressure)
    PAUSE_FATAL = 4           # a later request was invalid: read nothing more
    PAUSE_PLUGIN = 8          # an async plugin decides about the active request
    PAUSE_UPGRADE = 16        # an upgrade request waits for its 101: the next bytes are not HTTP


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


cdef class Request:
    cdef bytes method
    cdef bytes url
    cdef list headers                     # [name, value, ...] that are forwarded as they came
    cdef bytes host
    cdef bytes forwarded_for
    cdef bytes request_id
    cdef bytes traceparent                # as received, when valid
    cdef unsigned long long trace_hi      # a trace started here (no valid traceparent came)
    cdef unsigned long long trace_lo
    cdef unsigned long long span_id       # ours: the parent id sent upstream
    cdef bint sampled                     # the trace flags say sampled: export a span
    cdef bytes user_agent
    cdef bytes upgrade                    # Upgrade header of a request whose Connection names it
    cdef bint tunnel_counted              # after its 101: the target counts the tunnel as active
    cdef list connection_tokens
    cdef int connection                   # ConnectionOption bits of the request
    cdef long long content_length         # -1: none
    cdef bint chunked
    cdef bint expect_continue
    cdef bint keep_alive
    cdef bint http11
    cdef int header_count
    cdef long long head_bytes
    cdef long long max_body
    # body
    cdef long long body_bytes
    cdef bint body_done
    cdef list body_buffer                 # body bytes not yet sent anywhere
    cdef list replay                      # everything sent upstream, while small enough to resend
    # routing
    cdef bytes path                       # normalised path, no query
    cdef bytes query                      # including the '?', or b""
    cdef PathRule rule
    cdef object profile                   # client profile name (str) or None
    cdef Captures caps
    # upstream
    cdef Target target
    cdef bint target_counted              # counted in the target's active requests (shm)
    cdef UpstreamConnection upstream
    cdef bint upstream_reused
    cdef int attempts
    cdef int retried_elsewhere            # retries on another target (retries.attempts caps it)
    cdef bint service_counted             # counted in the service's in_flight (retry budget)
    cdef bint retry_counted               # ... and in its retries_in_flight
    cdef double deadline                  # the route timeout, over all tries; 0 = none
    cdef double started
    cdef double upstream_started
    cdef double upstream_elapsed
    # response
    cdef int status
    cdef int upstream_status
    cdef bint response_started
    cdef bint response_done
    cdef bint chunked_out
    cdef long long bytes_out
    cdef str flags
    # plugins (only on routes that have them)
    cdef object view                      # the fastgw.Request plugins see
    cdef bytes consumer                   # the consumer's name once a plugin identified it
    cdef bint in_plugins                  # an async plugin or a handler runs: body bytes are held
    cdef bint answer_ready                # echo/handler routes: answer once the body is complete
    # a JSON answer reshaped for the client's profile: the upstream's response held whole
    cdef object collect                   # fastgw.handlers.shape.Shape, or None
    cdef int collect_status
    cdef list collect_headers
    cdef list collect_parts
    cdef long long collect_bytes
    # response cache (routes with the cache plugin)
    cdef bint cache_checked               # looked up once, after plugins and rate limits
    cdef bytes cache_key                  # set when the cache was consulted
    cdef bint cache_fill                  # this request fetches the key; others wait for it
    cdef bint cache_rewaited              # woken by a fill of another variant, it waits once more
    cdef CachedResponse cache_stale       # an expired entry that stale_if_error may still serve
    cdef list cache_parts                 # the answer's body as it streams past, while storable
    cdef long long cache_bytes
    cdef int cache_status
    cdef list cache_headers
    cdef double cache_ttl
    # rate limits
    cdef bytes limit_headers              # RateLimit(-Policy) lines for the answer, or None
    cdef list limit_release               # concurrency entries (addresses) to release at the end
    cdef int retry_after                  # seconds, for a 429
    cdef bint limits_done                 # the route's rate limits were decided
    cdef list remote_limits               # (policy, key, limit, window) waiting for Redis
    cdef tuple limit_logged               # for the access log: (name, limit, window_s, remaining, admitted)


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
    cdef bint closed
    cdef bint admitted                    # counted in open_connections
    cdef bint lingering
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
    cdef int _on_header(self, bytes name, bytes value) except -1
    cdef int _on_headers_complete(self) except -1
    cdef list _answer_fields(self, Request req, resp)
    cdef void _dispatch_ready(self)
    cdef void _on_message_done(self)
    cdef int _reject(self, int status, str code, str message) except -1
    cdef void _reject_now(self, int status, str code, str message)
    cdef void _reject_pending(self)
    cdef void _dispatch(self, Request req)
    cdef bytes _read_proxy_header(self, data)
    cdef void _answer_route(self, Request req)
    cdef bint _rate_limited(self, Request req, bint before_plugins)
    cdef bint _refusal_limited(self, Request req, object resp)
    cdef bint _limit_decided(self, Request req, Policy policy, long long limit,
                             unsigned long long window_ns, Decision* d)
    cdef bytes _limit_key(self, Request req, Policy policy, bint anonymous)
    cdef bytes _limit_client(self, Request req, Policy policy)
    cdef void _run_plugins(self, Request req)
    cdef void _run_native_checks(self, Request req, tuple natives)
    cdef void _plugins_decided(self, Request req, object result)
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
    cdef bytes _request_id(self, Request req)
    cdef void _write_traceparent(self, WriteBuffer h, Request req)
    cdef void _send_body(self, Request req, bytes data)
    cdef void _keep_for_replay(self, Request req, bytes data)
    cdef void _write_respond(self, Request req)
    cdef void _write_connection_header(self, Request req)
    cdef void _answer_echo(self, Request req)
    cdef void _fail_request(self, Request req, int status, str code, str message)
    cdef void _start_tunnel(self, Request req, UpstreamConnection conn, list headers)
    cdef void _end_tunnel(self)
    cdef void _send_error(self, Request req, int status, str code, str message)
    cdef bint _retry_fresh(self, Request req, double head_deadline)
    cdef bint _may_retry(self, Request req, Service service)
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
    cdef void _export_span(self, Request req, double now)
    cdef void _flush(self)
    cdef void _pause(self, int reason)
    cdef void _resume(self, int reason)
    cdef void _close(self)
    cdef void _abort_client(self)
    cdef void _write_simple(self, Request req, int status, bytes content_type, bytes body, int retry_after=*)
    cdef void _finish_head_and_body(self, Request req, bytes body, int retry_after, bint request_id)
