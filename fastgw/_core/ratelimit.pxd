from libc.stdint cimport int64_t, uint64_t


cdef struct Decision:
    bint admitted
    int64_t remaining          # requests left in the current quota after this one
    double reset               # seconds until the quota is whole again
    double retry_after         # refused: seconds until a request would be admitted
    uint64_t* entry            # concurrency: the entry to release when the request ends


cdef class Policy:
    cdef readonly str name               # for the RateLimit headers; None: the route's name
    cdef readonly int algorithm
    cdef readonly long long limit
    cdef readonly uint64_t window_ns
    cdef readonly long long burst
    cdef readonly tuple key_parts        # ((kind, name bytes or None), ...)
    cdef readonly int headers            # HEADERS_NONE / HEADERS_DRAFT / HEADERS_LEGACY
    cdef readonly bint cluster           # shared by several hosts through Redis
    cdef readonly int on_store_error     # cluster, Redis away: 0 local, 1 allow, 2 deny
    cdef public bytes prefix             # makes this policy's keys its own
    cdef public dict plans               # consumer name (bytes) -> (limit, window_ns)
    cdef readonly bint needs_identity    # keyed on consumer or claim: decided after authentication
    cdef public object client_key        # (peer, PROXY address, X-Forwarded-For) -> the `ip` key; None: the peer
    cdef public object remote            # cluster, sync_interval 0: async (key, limit, window_ns) ->
                                         # (admitted, remaining, reset, retry_after), else None

    cdef str lines_for_route             # header_lines: the last route, quota and window ...
    cdef long long lines_for_limit
    cdef uint64_t lines_for_window
    cdef bytes lines_head                # ... and the fields made for them

    cdef int decide(self, bytes key, long long limit, uint64_t window_ns, Decision* d) except -1
    cdef bint exhausted(self, bytes key, long long limit, uint64_t window_ns, Decision* d) except -1
    cdef bytes header_lines(self, str name, long long limit, uint64_t window_ns, Decision* d)
    cdef bytes _lines_head(self, str name, long long limit, uint64_t window_ns)


cdef void release(uint64_t* entry) noexcept
