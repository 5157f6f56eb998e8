from fastgw._core.buffer cimport WriteBuffer
from fastgw._core.timer cimport TimedProtocol

cdef enum UpstreamError:
    UPSTREAM_OK = 0
    UPSTREAM_CONNECT_FAILED = 1     # nothing accepted the connection -> 502 (UF)
    UPSTREAM_CONNECT_TIMEOUT = 2    # -> 504 (UF)
    UPSTREAM_TIMEOUT = 3            # no (complete) response in time -> 504 (UT)
    UPSTREAM_RESET = 4              # closed before the response head -> 502 (UC)
    UPSTREAM_INVALID = 5            # not valid HTTP/1.x or ambiguous framing -> 502
    UPSTREAM_CLOSED_EARLY = 6       # body cut short after the head went out (UC)
    UPSTREAM_POOL_FULL = 7          # max_connections_per_target reached everywhere -> 503

cdef enum Framing:
    FRAMING_NONE = 0                # no body (HEAD, 204, 304)
    FRAMING_LENGTH = 1
    FRAMING_CHUNKED = 2
    FRAMING_CLOSE = 3               # body ends when the upstream closes

cdef enum ConnState:
    CONN_CONNECTING = 0
    CONN_BUSY = 1
    CONN_IDLE = 2
    CONN_CLOSED = 3



cdef class Downstream(TimedProtocol):
    """The side an upstream connection reports to (the client connection of the exchange)."""
    cdef int upstream_head(self, UpstreamConnection conn, int status, list headers,
                           int framing, long long length) except -1
    cdef int upstream_body(self, object data) except -1
    cdef int upstream_flush(self) except -1
    cdef bint upstream_complete(self, UpstreamConnection conn) except -1
    cdef int upstream_failed(self, UpstreamConnection conn, int error) except -1
    cdef int upstream_writable(self, bint writable) except -1
    cdef int upstream_tunnel_eof(self) except -1      # after a 101: the upstream half-closed
    cdef int upstream_tunnel_closed(self) except -1   # after a 101: the upstream connection is gone


cdef class Target:
    cdef readonly str address
    cdef readonly str host
    cdef readonly int port
    cdef readonly str server_name         # TLS name sent and verified: a resolved target's DNS name
    cdef readonly int weight
    cdef readonly Service service
    cdef list idle
    cdef readonly int open_connections
    cdef readonly int active
    cdef readonly int metric_slot         # shared-memory counters and health words, -1 = none
    cdef bint retired                     # its service was replaced: released connections close
    cdef readonly double connect_failed_at  # monotonic time of this worker's last failed connect, 0 = none

    cdef UpstreamConnection acquire(self, Downstream down, bint* reused)
    cdef UpstreamConnection _connect(self, Downstream down)
    cdef void release(self, UpstreamConnection conn)
    cdef void drop_idle(self)


cdef class Service:
    cdef readonly str name
    cdef readonly int kind
    cdef readonly list targets            # the primaries
    cdef readonly list backups            # used only when no primary is up
    cdef public object backup_balancer
    cdef public object balancer           # fastgw._core.balancer.Balancer, set by the compiler
    cdef public tuple hash_on             # consistent_hash key: (kind, name), or None
    cdef public int passive_failures      # consecutive failures that eject a target, 0 = off
    cdef public double ejection_time      # seconds, times the number of ejections so far
    cdef public int max_ejected_percent
    # circuit breaker per target (state in shared memory); circuit_window 0 = off
    cdef public double circuit_window
    cdef public int circuit_min_requests
    cdef public double circuit_failure_ratio
    cdef public double circuit_open_for
    cdef public int circuit_trials        # half_open_requests
    # retries: other targets tried after a failed try (idempotent, whole request held, except
    # connect failures: those reached nobody, any method)
    cdef public int retries               # retries.attempts
    cdef public bint retry_connect
    cdef public bint retry_reset
    cdef public frozenset retry_statuses  # 5xx answers (and per-try timeouts, as 504) retried
    cdef public double per_try_timeout    # each try's response head within this; 0 = off
    cdef public double budget_ratio       # retries in flight <= max(3, ratio x requests in flight); <0 off
    # the retry budget's counters, kept by fastgw/_core/retry.pxd (count_request, count_retry)
    cdef public int in_flight             # this worker's requests to the service
    cdef public int retries_in_flight     # ... of which are on a retry
    cdef public int send_proxy_protocol   # Layer 4: PROXY header version written to targets, 0 = none
    cdef public object ssl_context        # scheme https: ssl.SSLContext for the targets, else None
    cdef public str tls_server_name       # ... the name sent and verified (None: the target's host)
    cdef public bint unresolved           # a target name resolves to nothing: no target -> 503 DF

    cdef void record_result(self, Target target, bint failed)
    cdef readonly double connect_timeout
    cdef readonly double read_timeout
    cdef readonly double write_timeout
    cdef readonly double idle_timeout
    cdef readonly int max_idle
    cdef readonly int max_connections



cdef class UpstreamConnection(TimedProtocol):
    cdef object transport
    cdef object parser
    cdef readonly Target target
    cdef Downstream downstream
    cdef readonly int state
    cdef bint head_request
    cdef bint interim               # parsing a 1xx response that is not forwarded
    cdef bint head_done             # the final response head has been parsed
    cdef int framing
    cdef bint complete
    cdef bint keep_alive
    cdef bint paused_by_client
    cdef bint write_blocked           # our writes wait for the upstream to read (timeouts.write)
    cdef double write_blocked_at
    cdef int error
    cdef long long received         # response bytes of the current exchange
    cdef long long content_length
    cdef long long body_received    # body bytes the parser delivered
    cdef long long body_left        # Content-Length body bytes passed through without the parser
    cdef bint chunked
    cdef int connection             # ConnectionOption bits of the response
    cdef readonly bint has_date
    cdef int peeked_status          # status and version read off the raw status line, 0 = ask
    cdef int peeked_version
    cdef list headers               # [name, value, name, value, ...] as received
    cdef list connection_tokens     # extra header names the upstream's Connection header lists
    cdef list pending               # request bytes written before the connection was made
    cdef int sends                  # writes of this exchange (more than one: it had a body)
    cdef object connect_task
    cdef double head_deadline       # route timeout: the response head must arrive by then
    cdef double last_activity
    cdef public bint upgrade_expected   # the request asked to switch protocols: 101 is valid
    cdef readonly bint tunneling        # a 101 came: raw bytes both ways from now on
    cdef bytes upgrade                  # the 101's Upgrade header

    cdef int begin(self, Downstream down, bint head_request, double head_deadline) except -1
    cdef int send(self, object data) except -1
    cdef int send_many(self, list chunks) except -1
    cdef void set_reading(self, bint reading)
    cdef int tunnel_send(self, object data) except -1
    cdef void tunnel_write_eof(self)
    cdef void abort(self)
    cdef void _close_idle(self)
    cdef bint _simple_response(self, bytes data, Py_ssize_t head_end) except -1
    cdef bint _starts_pass_through(self, Py_ssize_t unparsed) except -1
    cdef int _pass_body(self, object data) except -1
    cdef int _fail(self, int error) except -1
    cdef int _finish(self) except -1
