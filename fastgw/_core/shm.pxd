from libc.stdint cimport uint64_t

cdef extern from "atomics.h":
    uint64_t fg_add(uint64_t* p, uint64_t v) noexcept nogil
    uint64_t fg_sub(uint64_t* p, uint64_t v) noexcept nogil
    uint64_t fg_load(uint64_t* p) noexcept nogil
    void fg_store(uint64_t* p, uint64_t v) noexcept nogil
    int fg_cas(uint64_t* p, uint64_t* expected, uint64_t desired) noexcept nogil


cdef enum:
    CIRCUIT_CLOSED = 0
    CIRCUIT_OPEN = 1
    CIRCUIT_HALF_OPEN = 2

# Per-route event counters (words of a route's slot, after its request counters and histogram).
cdef enum RouteEvent:
    EV_CACHE_HIT = 354
    EV_CACHE_MISS = 355
    EV_CACHE_STALE = 356
    EV_RATELIMIT_ALLOWED = 357
    EV_RATELIMIT_REJECTED = 358


# What the data plane records. Each is a no-op when this process has no active segment or the
# slot is -1 (not tracked) or out of range, so compiled tables without slots cost nothing extra.
cdef int method_index(const char* method, Py_ssize_t n) noexcept
cdef void record_request(int route_slot, int method, int status, double seconds) noexcept
cdef void record_route_event(int route_slot, int event) noexcept
cdef void record_analytics(uint64_t key, double seconds, bint error) noexcept
cdef uint64_t consumer_analytics_key(bytes name) noexcept   # None: the anonymous key ("-")
cdef uint64_t unmatched_analytics_key() noexcept            # requests that matched no route
cdef int listener_admit(int slot, long long limit) noexcept
cdef bint listener_admits(int slot, long long limit, long long open_here) noexcept
cdef void listener_opened(int slot) noexcept
cdef void listener_closed(int slot) noexcept
cdef void listener_rejected(int slot) noexcept
cdef void target_begin(int slot) noexcept
cdef void target_end(int slot, double seconds, bint failed) noexcept
cdef void target_release(int slot) noexcept
cdef bint target_draining(int slot) noexcept
cdef uint64_t* ratelimit_table(Py_ssize_t* entries) noexcept
cdef const uint64_t* ratelimit_key() noexcept
cdef uint64_t cluster_nodes() noexcept
cdef bint cluster_down() noexcept
cdef long long target_active(int slot) noexcept      # -1: not tracked
cdef unsigned long long target_ewma_ns(int slot) noexcept   # 0: no sample or not tracked
# Health: the supervisor's active checks write `healthy`; passive ejection is decided in the data
# plane by whichever worker sees the failure that crosses the threshold.
cdef unsigned long long monotonic_ns() noexcept
cdef bint target_available(int slot, unsigned long long now) noexcept
cdef long long target_failure(int slot) noexcept      # consecutive failures after this one, -1 untracked
cdef void target_success(int slot) noexcept
cdef unsigned long long target_up_since(int slot, unsigned long long now) noexcept
cdef bint circuit_admit(int slot, unsigned long long now) noexcept
cdef int circuit_record(int slot, unsigned long long now, bint failed, unsigned long long window_ns,
                        unsigned long long min_requests, double failure_ratio,
                        unsigned long long open_ns, unsigned long long trials) noexcept
cdef bint circuit_is_open(int slot) noexcept
cdef bint target_eject(int slot, unsigned long long now, unsigned long long base_ns, unsigned long long max_ns) noexcept


cdef class Segment:
    cdef object _file                 # keeps the memfd / temp file open
    cdef object _map                  # the mmap object: the memory stays mapped while it lives
    cdef uint64_t* base
    cdef readonly Py_ssize_t size
    cdef readonly dict capacity

    cdef uint64_t* _section(self, int header_offset, int header_count, int slot, int words) except NULL
    cdef uint64_t* _worker(self, int index) except NULL
    cdef uint64_t* _route(self, int slot) except NULL
    cdef uint64_t* _target(self, int slot) except NULL
    cdef uint64_t* _listener(self, int slot) except NULL
