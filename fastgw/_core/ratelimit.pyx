# cython: language_level=3
"""Rate-limit decisions over the shared-memory table, exact across all workers of a host.

The table is the segment's `ratelimit` region (fastgw/_core/shm.pyx): open addressing over entries
of four words, [key hash, state, spare, idle after]. A key's entry is found or claimed (CAS of the
hash word) within PROBE entries of its home slot. When all of those belong to other keys, an entry
whose `idle after` time has passed is taken over: by then its state decides exactly as a new key's
would (GCRA's theoretical arrival time is in the past, the window is over, nothing is in flight), so
eviction never changes an active key's decisions. Each algorithm keeps its state in one word that
changes only by CAS, so two workers deciding at once can never both take the last unit of quota.

Without an active segment (`fastgw check`, in-process tests) a process-local table is used.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport UINT64_MAX
from libc.stdlib cimport calloc

from fastgw._core.buffer cimport hash64
from fastgw._core.shm cimport fg_add, fg_cas, fg_load, fg_store, monotonic_ns, ratelimit_table

cdef enum:
    PROBE = 16
    WORDS = 4
    W_KEY = 0
    W_STATE = 1
    W_IDLE_AFTER = 3
    LOCAL_ENTRIES = 4096

ALG_GCRA, ALG_SLIDING, ALG_FIXED, ALG_CONCURRENCY = 0, 1, 2, 3
ALGORITHMS = {"gcra": ALG_GCRA, "sliding_window": ALG_SLIDING, "fixed_window": ALG_FIXED,
              "concurrency": ALG_CONCURRENCY}
HEADERS_NONE, HEADERS_DRAFT, HEADERS_LEGACY = 0, 1, 2
SLIDING_MAX = (1 << 24) - 1      # sliding_window packs two 24-bit counts into the state word

cdef uint64_t* _local = NULL


cdef uint64_t* _table(Py_ssize_t* n) noexcept:
    global _local
    cdef uint64_t* t = ratelimit_table(n)
    if t != NULL and n[0] > 0:
        return t
    if _local == NULL:
        _local = <uint64_t*>calloc(LOCAL_ENTRIES * WORDS, sizeof(uint64_t))
    n[0] = LOCAL_ENTRIES if _local != NULL else 0
    return _local


cdef uint64_t* _entry(uint64_t h, uint64_t now) noexcept:
    """The entry of key hash `h`, claimed if new; NULL when the probe window is all busy."""
    cdef Py_ssize_t n, i
    cdef uint64_t* table = _table(&n)
    cdef uint64_t* e
    cdef uint64_t k, expected
    if table == NULL:
        return NULL
    if h == 0:
        h = 1                                  # 0 marks a free entry
    for i in range(PROBE):
        e = table + ((h + <uint64_t>i) % <uint64_t>n) * WORDS
        k = fg_load(e + W_KEY)
        if k == h:
            return e
        if k == 0:
            expected = 0
            if fg_cas(e + W_KEY, &expected, h) or expected == h:
                return e
    for i in range(PROBE):                     # take over one that decides like new by now
        e = table + ((h + <uint64_t>i) % <uint64_t>n) * WORDS
        k = fg_load(e + W_KEY)
        if fg_load(e + W_IDLE_AFTER) <= now and fg_cas(e + W_KEY, &k, h):
            fg_store(e + W_STATE, 0)
            fg_store(e + W_IDLE_AFTER, 0)
            return e
    return NULL


cdef void release(uint64_t* entry) noexcept:
    """A request counted by a `concurrency` limit has ended."""
    cdef uint64_t old = fg_load(entry + W_STATE)
    while old > 0:
        if fg_cas(entry + W_STATE, &old, old - 1):
            if old == 1:
                fg_store(entry + W_IDLE_AFTER, monotonic_ns())
            return


cdef class Policy:
    """One `rate_limit` plugin entry, compiled: its algorithm, limit and how keys are made."""

    def __init__(self, str algorithm, long long limit, double window, long long burst=0, *,
                 tuple key_parts=(), int headers=HEADERS_DRAFT, str name=None, bytes prefix=b""):
        self.algorithm = ALGORITHMS[algorithm]
        self.limit = limit
        self.window_ns = <uint64_t>(window * 1e9)
        self.burst = burst if burst > 0 else limit
        self.key_parts = key_parts
        self.headers = headers
        self.name = name
        self.prefix = prefix
        self.plans = {}

    def check(self, bytes key):
        """Python entry point (tests, benchmarks): (admitted, remaining, reset, retry_after)."""
        cdef Decision d
        self.decide(key, self.limit, self.window_ns, &d)
        return d.admitted, d.remaining, d.reset, d.retry_after

    def done(self, bytes key):
        """Python entry point: end one request counted by a concurrency limit."""
        cdef bytes full = self.prefix + key
        cdef uint64_t* e = _entry(hash64(PyBytes_AS_STRING(full), PyBytes_GET_SIZE(full)), monotonic_ns())
        if e != NULL:
            release(e)

    cdef int decide(self, bytes key, long long limit, uint64_t window_ns, Decision* d) except -1:
        cdef bytes full = self.prefix + key
        cdef uint64_t now = monotonic_ns()
        cdef uint64_t* e = _entry(hash64(PyBytes_AS_STRING(full), PyBytes_GET_SIZE(full)), now)
        d.entry = e
        if e == NULL:                          # every nearby entry busy with a live key: let it pass
            d.admitted, d.remaining, d.reset, d.retry_after = True, limit, 0, 0
            return 0
        if self.algorithm == ALG_GCRA:
            _gcra(e, now, limit, window_ns, self.burst if limit == self.limit else limit, d)
        elif self.algorithm == ALG_FIXED:
            _fixed(e, now, limit, window_ns, d)
        elif self.algorithm == ALG_SLIDING:
            _sliding(e, now, limit, window_ns, d)
        else:
            _concurrency(e, limit, d)
        return 0

    cdef bytes header_lines(self, str name, long long limit, uint64_t window_ns, Decision* d):
        cdef long long window = <long long>((window_ns + 999999999) // 1000000000)
        cdef long long reset = <long long>(d.reset + 0.999)
        if self.headers == HEADERS_LEGACY:
            return (f"x-ratelimit-limit: {limit}\r\nx-ratelimit-remaining: {d.remaining}\r\n"
                    f"x-ratelimit-reset: {reset}\r\n").encode()
        policy = self.name or name
        return (f'ratelimit-policy: "{policy}";q={limit};w={window}\r\n'
                f'ratelimit: "{policy}";r={d.remaining};t={reset}\r\n').encode()


cdef inline double _seconds(uint64_t ns) noexcept:
    return ns / 1e9


cdef void _gcra(uint64_t* e, uint64_t now, long long limit, uint64_t window_ns, long long burst,
                Decision* d) noexcept:
    """Generic cell rate: one request per `window/limit`, up to `burst` at once. The state is the
    theoretical arrival time (TAT) of the next request."""
    cdef uint64_t interval = window_ns // <uint64_t>limit
    cdef uint64_t tolerance = interval * <uint64_t>burst
    cdef uint64_t old = fg_load(e + W_STATE), tat, new_tat
    if interval == 0:
        interval = 1
    while True:
        tat = old if old > now else now
        new_tat = tat + interval
        if new_tat - now > tolerance:
            d.admitted = False
            d.remaining = 0
            d.reset = _seconds(tat - now)
            d.retry_after = _seconds(new_tat - now - tolerance)
            return
        if fg_cas(e + W_STATE, &old, new_tat):
            break
    fg_store(e + W_IDLE_AFTER, new_tat)
    d.admitted = True
    d.remaining = <int64_t>((tolerance - (new_tat - now)) // interval)
    d.reset = _seconds(new_tat - now)
    d.retry_after = 0


cdef void _fixed(uint64_t* e, uint64_t now, long long limit, uint64_t window_ns, Decision* d) noexcept:
    """Counts per window: state = (window number << 32) | count."""
    cdef uint64_t index = (now // window_ns) & 0xFFFFFFFF
    cdef uint64_t end = (now // window_ns + 1) * window_ns
    cdef uint64_t old = fg_load(e + W_STATE), count
    while True:
        count = old & 0xFFFFFFFF if (old >> 32) == index else 0
        if count >= <uint64_t>limit:
            d.admitted = False
            d.remaining = 0
            d.reset = d.retry_after = _seconds(end - now)
            return
        if fg_cas(e + W_STATE, &old, (index << 32) | (count + 1)):
            break
    fg_store(e + W_IDLE_AFTER, end)
    d.admitted = True
    d.remaining = limit - <long long>count - 1
    d.reset = _seconds(end - now)
    d.retry_after = 0


cdef void _sliding(uint64_t* e, uint64_t now, long long limit, uint64_t window_ns, Decision* d) noexcept:
    """Counter interpolation (Cloudflare's sliding window): the previous window's count weighted by
    how much of it the sliding window still covers, plus this window's. State = window number
    (16 bits) | this window's count (24) | the previous window's (24)."""
    cdef uint64_t number = now // window_ns
    cdef uint64_t index = number & 0xFFFF
    cdef uint64_t into = now - number * window_ns
    cdef uint64_t old = fg_load(e + W_STATE), seen, current, previous
    cdef double weight = 1.0 - <double>into / window_ns, estimate, needed
    while True:
        seen = old >> 48
        if seen == index:
            current, previous = (old >> 24) & 0xFFFFFF, old & 0xFFFFFF
        elif seen == ((index - 1) & 0xFFFF) and old != 0:
            current, previous = 0, (old >> 24) & 0xFFFFFF
        else:
            current, previous = 0, 0
        estimate = previous * weight + current
        if estimate + 1 > limit:
            d.admitted = False
            d.remaining = 0
            if current + 1 > <uint64_t>limit or previous == 0:
                d.retry_after = _seconds(window_ns - into)
            else:                              # until the previous window's weight has shrunk enough
                needed = 1.0 - (limit - current - 1) / <double>previous
                d.retry_after = (needed - <double>into / window_ns) * _seconds(window_ns)
                if d.retry_after < 0.001:
                    d.retry_after = 0.001
            d.reset = _seconds(window_ns - into)
            return
        if fg_cas(e + W_STATE, &old, (index << 48) | ((current + 1) << 24) | previous):
            break
    fg_store(e + W_IDLE_AFTER, (number + 2) * window_ns)
    d.admitted = True
    d.remaining = <int64_t>(limit - estimate - 1)
    d.reset = _seconds(window_ns - into)
    d.retry_after = 0


cdef void _concurrency(uint64_t* e, long long limit, Decision* d) noexcept:
    """Requests in flight; the protocol releases the entry when the request ends."""
    cdef uint64_t old = fg_load(e + W_STATE)
    while True:
        if old >= <uint64_t>limit:
            d.admitted = False
            d.remaining = 0
            d.reset = 0
            d.retry_after = 1
            return
        if fg_cas(e + W_STATE, &old, old + 1):
            break
    fg_store(e + W_IDLE_AFTER, UINT64_MAX)
    d.admitted = True
    d.remaining = limit - <long long>old - 1
    d.reset = 0
    d.retry_after = 0
