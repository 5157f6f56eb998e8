# One HTTP request as the data plane holds it from its head to its access-log line: what was
# read, where it was routed, what went upstream and what was answered. The behaviour lives in
# fastgw/_core/protocol.pyx; this record sits below it so that the modules that only read a
# finished request (fastgw/_core/observe.pyx) need not import the connection.
from fastgw._core.cache cimport CachedResponse
from fastgw._core.router cimport Captures, PathRule
from fastgw._core.upstream cimport Target, UpstreamConnection


cdef enum Phase:
    # Where a request stands on its one walk (ClientConnection._advance in
    # fastgw/_core/protocol.pyx): each phase either hands on to the next at once, or answers, or
    # waits (an async plugin, Redis, a cache fill) and is resumed at the phase stored here.
    PHASE_ROUTE = 0               # target normalised, route matched, body size checked
    PHASE_FILTERS = 1             # the route's plugins, and the rate limits that need no identity
    PHASE_LIMITS = 2              # the rate limits keyed on the consumer, and those decided in Redis
    PHASE_CACHE = 3               # the response cache: a hit, a wait for a fill, or a miss
    PHASE_ANSWER = 4              # upstream, or answered here (respond, echo, handler)
    PHASE_DONE = 5                # the response is complete


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
    cdef Phase phase
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
    cdef list remote_limits               # (policy, key, limit, window) waiting for Redis
    cdef tuple limit_logged               # for the access log: (name, limit, window_s, remaining, admitted)


cdef bytes request_id_of(Request req)     # X-Request-Id: the client's when valid, else made once
