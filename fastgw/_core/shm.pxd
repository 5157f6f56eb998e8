from libc.stdint cimport uint64_t

cdef extern from "atomics.h":
    uint64_t fg_add(uint64_t* p, uint64_t v) noexcept nogil
    uint64_t fg_sub(uint64_t* p, uint64_t v) noexcept nogil
    uint64_t fg_load(uint64_t* p) noexcept nogil
    void fg_store(uint64_t* p, uint64_t v) noexcept nogil
    int fg_cas(uint64_t* p, uint64_t* expected, uint64_t desired) noexcept nogil


# The values of a target's T_CIRCUIT word (the state machine is fastgw/_core/health.pyx).
cdef enum:
    CIRCUIT_CLOSED = 0
    CIRCUIT_OPEN = 1
    CIRCUIT_HALF_OPEN = 2

# The words of a target slot (the layout is described at the top of shm.pyx).
cdef enum:
    T_HEALTHY = 0
    T_DRAINING = 1
    T_EJECTED_UNTIL = 2
    T_CIRCUIT = 3                       # 0 closed, 1 open, 2 half_open
    T_CONSECUTIVE_FAILURES = 4
    T_EJECTIONS = 5
    T_ACTIVE = 6
    T_EWMA = 7                          # latency EWMA, ns (0 = no sample yet)
    T_REQUESTS = 8
    T_FAILURES = 9
    T_UP_SINCE = 10                     # ns when it last became healthy (slow start); 0 = long ago
    T_CB_WINDOW = 11                    # circuit breaker: start of the counting window (ns)
    T_CB_REQUESTS = 12                  # ... results in that window
    T_CB_FAILURES = 13                  # ... failures among them
    T_CB_OPEN_UNTIL = 14                # open: no requests until then (ns)
    T_CB_TRIALS = 15                    # half-open: trial requests let through so far
    T_CB_TRIAL_OK = 16                  # half-open: trials that succeeded
    T_CB_TRIAL_LIMIT = 17               # half-open: trials allowed (half_open_requests)
    T_CB_OPEN_NS = 18                   # open_for, for trials whose results never came back
    # 19..23 are kept for the balancer
    T_DURATION = 24
    T_SUM = 40
    T_COUNT = 41
    TARGET_WORDS = 48


# The target section of the active segment: set by Segment.activate, NULL / 0 while this process
# has none. Read it only through target_words.
cdef uint64_t* target_table
cdef int target_slots


cdef inline uint64_t* target_words(int slot) noexcept:
    """The words of target slot `slot`, or NULL when it is not tracked here: no active segment,
    slot -1 (a target without a slot) or out of range. Inline: every health decision starts with
    it, on the path of every proxied request."""
    if target_table == NULL or slot < 0 or slot >= target_slots:
        return NULL
    return target_table + <Py_ssize_t>slot * TARGET_WORDS


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
cdef void target_release(int slot) noexcept
cdef uint64_t target_count_end(uint64_t* t, double seconds, bint failed) noexcept   # the ns
cdef bint target_draining(int slot) noexcept
cdef uint64_t* ratelimit_table(Py_ssize_t* entries) noexcept
cdef const uint64_t* ratelimit_key() noexcept
cdef uint64_t cluster_nodes() noexcept
cdef bint cluster_down() noexcept
cdef long long target_active(int slot) noexcept      # -1: not tracked
cdef unsigned long long monotonic_ns() noexcept


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
