# cython: language_level=3
"""Rate-limit decisions over the shared-memory table, exact across all workers of a host.

The table is the segment's `ratelimit` region (fastgw/_core/shm.pyx): open addressing over entries
of eight words, [key hash, state, cluster marker, idle after, cluster name, 3 spare]. The key hash
is SipHash-2-4 under the segment's secret key (drawn by the supervisor, the same in every worker,
never sent anywhere), so a client cannot compute offline which keys land near each other. A key's
entry is found or claimed (CAS of the hash word) within PROBE entries of its home slot. When all of
those belong to other keys, an entry whose `idle after` time has passed is taken over: by then its
state decides exactly as a new key's would (GCRA's theoretical arrival time is in the past, the
window is over, nothing is in flight), so eviction never changes an active key's decisions. When
all of them are active, the request is refused (fails closed): a key the table cannot hold is never
unlimited. Each algorithm keeps its state in one word that changes only by CAS, so two workers
deciding at once can never both take the last unit of quota.

Without an active segment (`fastgw check`, in-process tests) a process-local table is used, keyed
with a secret of this process.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport UINT64_MAX
from libc.stdlib cimport calloc
from libc.string cimport memcpy, memset

import os

from fastgw._core.buffer cimport hash64
from fastgw._core.shm cimport (cluster_down, cluster_nodes, fg_add, fg_cas, fg_load, fg_store,
                               monotonic_ns, ratelimit_key, ratelimit_table)
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

cdef enum:
    PROBE = 16
    WORDS = 8                    # shm.pyx RATELIMIT_WORDS
    W_KEY = 0
    W_STATE = 1
    W_CLUSTER = 2                # cluster entries: (window ms << 32) | (limit << 8) | 1
    W_IDLE_AFTER = 3
    W_NAME = 4                   # cluster entries: the key's name in Redis, the same on every host
    LOCAL_ENTRIES = 4096

ALG_GCRA, ALG_SLIDING, ALG_FIXED, ALG_CONCURRENCY = 0, 1, 2, 3
ALGORITHMS = {"gcra": ALG_GCRA, "sliding_window": ALG_SLIDING, "fixed_window": ALG_FIXED,
              "concurrency": ALG_CONCURRENCY}
HEADERS_NONE, HEADERS_DRAFT, HEADERS_LEGACY = 0, 1, 2
STORE_ERROR = {"local": 0, "allow": 1, "deny": 2}
CLUSTER_MAX = (1 << 24) - 1      # cluster limits pack used and allowed counts in 24 bits each
SLIDING_MAX = (1 << 24) - 1      # sliding_window packs two 24-bit counts into the state word

cdef uint64_t* _local = NULL
cdef uint64_t _local_key[2]
_local_key[0] = int.from_bytes(os.urandom(8), "little")
_local_key[1] = int.from_bytes(os.urandom(8), "little")


cdef uint64_t* _table(Py_ssize_t* n) noexcept:
    global _local
    cdef uint64_t* t = ratelimit_table(n)
    if t != NULL and n[0] > 0:
        return t
    if _local == NULL:
        _local = <uint64_t*>calloc(LOCAL_ENTRIES * WORDS, sizeof(uint64_t))
    n[0] = LOCAL_ENTRIES if _local != NULL else 0
    return _local


# --- SipHash-2-4 (Aumasson and Bernstein, "SipHash: a fast short-input PRF", 2012) --------------

cdef inline uint64_t _rotl(uint64_t x, int b) noexcept:
    return (x << b) | (x >> (64 - b))


cdef inline void _sipround(uint64_t* v) noexcept:
    v[0] += v[1]; v[1] = _rotl(v[1], 13); v[1] ^= v[0]; v[0] = _rotl(v[0], 32)
    v[2] += v[3]; v[3] = _rotl(v[3], 16); v[3] ^= v[2]
    v[0] += v[3]; v[3] = _rotl(v[3], 21); v[3] ^= v[0]
    v[2] += v[1]; v[1] = _rotl(v[1], 17); v[1] ^= v[2]; v[2] = _rotl(v[2], 32)


cdef uint64_t siphash24(uint64_t k0, uint64_t k1, const unsigned char* data, Py_ssize_t n) noexcept:
    cdef uint64_t v[4]
    cdef uint64_t m
    cdef Py_ssize_t i, j, whole = n - n % 8
    v[0] = k0 ^ 0x736f6d6570736575ULL
    v[1] = k1 ^ 0x646f72616e646f6dULL
    v[2] = k0 ^ 0x6c7967656e657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    i = 0
    while i <= n:                          # the words, then the last one: the rest and the length
        m = 0
        if i < whole:
            for j in range(8):
                m |= <uint64_t>data[i + j] << (8 * j)
        else:
            for j in range(n - whole):
                m |= <uint64_t>data[i + j] << (8 * j)
            m |= <uint64_t>(n & 0xff) << 56
        v[3] ^= m
        _sipround(v)
        _sipround(v)
        v[0] ^= m
        i += 8
    v[2] ^= 0xff
    for j in range(4):
        _sipround(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _siphash24(bytes key, bytes data):
    """Python entry point (the reference test vectors): SipHash-2-4 of `data` under a 16-byte key."""
    return siphash24(int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little"),
                     <const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


def _decide_at(Policy policy, uint64_t state, uint64_t now):
    """Test entry point: one decision of `policy` at `now` (monotonic ns) for a key whose state
    word is `state`, on an entry outside the table. Returns (the state after, idle after,
    admitted, remaining, reset, retry_after)."""
    cdef uint64_t entry[WORDS]
    cdef Decision d
    memset(entry, 0, sizeof(entry))
    entry[W_STATE] = state
    _decide_in(entry, policy, b"", now, policy.limit, policy.window_ns, &d)
    return entry[W_STATE], entry[W_IDLE_AFTER], d.admitted, d.remaining, d.reset, d.retry_after


cdef inline uint64_t _place(bytes full) noexcept:
    """Where the table keeps a key: SipHash under the active segment's key (or this process's)."""
    cdef const uint64_t* k = ratelimit_key()
    if k == NULL:
        k = _local_key
    return siphash24(k[0], k[1], <const unsigned char*>PyBytes_AS_STRING(full), PyBytes_GET_SIZE(full))


cdef uint64_t* _entry(uint64_t h, uint64_t now, uint64_t* busy_until) noexcept:
    """The entry of key hash `h`, claimed if new; NULL when the probe window is all busy (then
    `busy_until` is when the first of its entries goes idle)."""
    cdef Py_ssize_t n, i
    cdef uint64_t* table = _table(&n)
    cdef uint64_t* e
    cdef uint64_t k, expected, idle
    busy_until[0] = UINT64_MAX
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
        idle = fg_load(e + W_IDLE_AFTER)
        if idle <= now and fg_cas(e + W_KEY, &k, h):
            fg_store(e + W_STATE, 0)
            fg_store(e + W_CLUSTER, 0)
            fg_store(e + W_NAME, 0)
            fg_store(e + W_IDLE_AFTER, 0)
            return e
        if idle < busy_until[0]:
            busy_until[0] = idle
    return NULL


cdef uint64_t* _existing(uint64_t h) noexcept:
    """The entry of key hash `h` if the table has one (nothing is claimed)."""
    cdef Py_ssize_t n, i
    cdef uint64_t* table = _table(&n)
    cdef uint64_t* e
    if table == NULL:
        return NULL
    if h == 0:
        h = 1
    for i in range(PROBE):
        e = table + ((h + <uint64_t>i) % <uint64_t>n) * WORDS
        if fg_load(e + W_KEY) == h:
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
                 tuple key_parts=(), int headers=HEADERS_DRAFT, str name=None, bytes prefix=b"",
                 bint cluster=False, str on_store_error="local"):
        self.algorithm = ALGORITHMS[algorithm]
        self.cluster = cluster
        self.on_store_error = STORE_ERROR[on_store_error]
        self.limit = limit
        self.window_ns = <uint64_t>(window * 1e9)
        self.burst = burst if burst > 0 else limit
        self.key_parts = key_parts
        self.needs_identity = any(kind in ("consumer", "claim") for kind, _ in key_parts)
        self.client_key = None
        self.headers = headers
        self.name = name
        self.prefix = prefix
        self.plans = {}
        self.remote = None

    def check(self, bytes key):
        """Python entry point (tests, benchmarks): (admitted, remaining, reset, retry_after)."""
        cdef Decision d
        self.decide(key, self.limit, self.window_ns, &d)
        return d.admitted, d.remaining, d.reset, d.retry_after

    def key_hash(self, bytes key):
        """A key's name in Redis: a fixed 64-bit hash, the same on every host (the table places
        keys by a keyed hash instead)."""
        cdef bytes full = self.prefix + key
        return hash64(PyBytes_AS_STRING(full), PyBytes_GET_SIZE(full))

    def done(self, bytes key):
        """Python entry point: end one request counted by a concurrency limit."""
        cdef uint64_t busy_until
        cdef uint64_t* e = _entry(_place(self.prefix + key), monotonic_ns(), &busy_until)
        if e != NULL:
            release(e)

    cdef int decide(self, bytes key, long long limit, uint64_t window_ns, Decision* d) except -1:
        cdef bytes full = self.prefix + key
        cdef uint64_t now = monotonic_ns(), busy_until
        cdef uint64_t* e = _entry(_place(full), now, &busy_until)
        d.entry = e
        if e == NULL:                          # every nearby entry busy with a live key: refuse
            d.admitted, d.remaining = False, 0
            d.retry_after = d.reset = _seconds(busy_until - now) if busy_until != UINT64_MAX else 1.0
            return 0
        _decide_in(e, self, full, now, limit, window_ns, d)
        return 0

    cdef bint exhausted(self, bytes key, long long limit, uint64_t window_ns, Decision* d) except -1:
        """Would `key` be refused now? Decided on a copy of its entry, so nothing is counted; a
        key the table does not hold is not exhausted."""
        cdef bytes full = self.prefix + key
        cdef uint64_t copy[WORDS]
        cdef uint64_t* e = _existing(_place(full))
        cdef int i
        if e == NULL:
            return False
        for i in range(WORDS):
            copy[i] = fg_load(e + i)
        _decide_in(copy, self, full, monotonic_ns(), limit, window_ns, d)
        d.entry = NULL
        return not d.admitted

    cdef bytes header_lines(self, str name, long long limit, uint64_t window_ns, Decision* d):
        """The response's rate-limit fields for this decision. What does not change from one
        request to the next (names, policy, quota) is made once per route, limit and window;
        per request only the two numbers are printed into it."""
        cdef bytes head
        cdef char numbers[64]
        cdef int n
        cdef long long reset = <long long>(d.reset + 0.999)
        if name is self.lines_for_route and limit == self.lines_for_limit and \
                window_ns == self.lines_for_window:
            head = self.lines_head
        else:
            head = self._lines_head(name, limit, window_ns)
        n = _print_int(numbers, d.remaining)
        if self.headers == HEADERS_LEGACY:
            memcpy(numbers + n, b"\r\nx-ratelimit-reset: ", 21)
            n += 21
        else:
            memcpy(numbers + n, b";t=", 3)
            n += 3
        n += _print_int(numbers + n, reset)
        memcpy(numbers + n, b"\r\n", 2)
        n += 2
        cdef bytes out = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(head) + n)
        memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
        memcpy(PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(head), numbers, n)
        return out

    cdef bytes _lines_head(self, str name, long long limit, uint64_t window_ns):
        """The fields up to the remaining count, kept for the next request of the same route
        and quota (consumer plans change the quota)."""
        cdef long long window = <long long>((window_ns + 999999999) // 1000000000)
        if self.headers == HEADERS_LEGACY:
            head = f"x-ratelimit-limit: {limit}\r\nx-ratelimit-remaining: ".encode()
        else:
            policy = self.name or name
            head = f'ratelimit-policy: "{policy}";q={limit};w={window}\r\nratelimit: "{policy}";r='.encode()
        self.lines_for_route, self.lines_for_limit, self.lines_for_window = name, limit, window_ns
        self.lines_head = head
        return head


cdef void _decide_in(uint64_t* e, Policy policy, bytes full, uint64_t now, long long limit,
                     uint64_t window_ns, Decision* d) noexcept:
    if policy.cluster:
        _cluster_fixed(e, now, limit, window_ns, policy.on_store_error,
                       hash64(PyBytes_AS_STRING(full), PyBytes_GET_SIZE(full)), d)
    elif policy.algorithm == ALG_GCRA:
        _gcra(e, now, limit, window_ns, policy.burst if limit == policy.limit else limit, d)
    elif policy.algorithm == ALG_FIXED:
        _fixed(e, now, limit, window_ns, d)
    elif policy.algorithm == ALG_SLIDING:
        _sliding(e, now, limit, window_ns, d)
    else:
        _concurrency(e, limit, d)


cdef inline int _print_int(char* out, long long value) noexcept:
    """Decimal digits of `value` (>= 0; negatives print as 0) at `out`; returns their count."""
    cdef char digits[20]
    cdef int n = 0, i
    if value <= 0:
        out[0] = b'0'
        return 1
    while value:
        digits[n] = <char>(48 + value % 10)
        value //= 10
        n += 1
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


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
                # This window is full: the next one starts with all of it as its previous
                # window, so one more fits once that weight is down to (limit - 1) / current.
                d.retry_after = _seconds(window_ns - into) + \
                    (1.0 - (limit - 1) / <double>current) * _seconds(window_ns)
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


# --- cluster scope (several hosts through Redis; fastgw/server/cluster.py syncs) ---------------
# A cluster limit is a fixed window on the wall clock (the same on every host). Redis counts what
# the hosts have *reserved* of each window; a host admits only from its own reserve, so together
# they never pass the limit. A host starts a window with an implicit share, limit / nodes, which
# its syncer reserves in Redis at the next sync (giving back what the window no longer has), and
# reserves more, a share of what is left, whenever its reserve runs low. So a share that an idle
# host never claims goes to the busy ones. While Redis is unreachable, `on_store_error` decides:
# local (limit / nodes per window, the implicit share alone), allow or deny.
# State word: window number (16 bits) | admitted since the syncer last looked (24) | reserve left (24).

cdef inline uint64_t _realtime_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef void _cluster_fixed(uint64_t* e, uint64_t mono_now, long long limit, uint64_t window_ns,
                         int on_store_error, uint64_t name, Decision* d) noexcept:
    cdef uint64_t now = _realtime_ns()
    cdef uint64_t number = now // window_ns
    cdef uint64_t index = number & 0xFFFF
    cdef uint64_t end = (number + 1) * window_ns
    cdef uint64_t nodes = cluster_nodes()
    cdef uint64_t marker = ((window_ns // 1000000) << 32) | (<uint64_t>limit << 8) | 1
    cdef uint64_t old, used, reserve
    if nodes == 0:
        nodes = 1
    if fg_load(e + W_CLUSTER) != marker:
        fg_store(e + W_CLUSTER, marker)
    if fg_load(e + W_NAME) != name:
        fg_store(e + W_NAME, name)
    d.reset = _seconds(end - now)
    if cluster_down() and on_store_error != 0:
        d.admitted = on_store_error == 1           # allow / deny while the store is away
        d.remaining = limit if d.admitted else 0
        d.retry_after = 0 if d.admitted else 1
        return
    old = fg_load(e + W_STATE)
    while True:
        if (old >> 48) == index and old != 0:
            used, reserve = (old >> 24) & 0xFFFFFF, old & 0xFFFFFF
        else:
            used, reserve = 0, <uint64_t>limit // nodes   # a new window: the implicit share
        if reserve == 0:
            d.admitted = False
            d.remaining = 0
            d.retry_after = d.reset
            return
        if fg_cas(e + W_STATE, &old, (index << 48) | ((used + 1) << 24) | (reserve - 1)):
            break
    fg_store(e + W_IDLE_AFTER, mono_now + (end - now) + window_ns)
    d.admitted = True
    d.remaining = <int64_t>(reserve - 1)
    d.retry_after = 0


def cluster_take():
    """For the syncer: every cluster entry of the current window, with what it admitted since the
    last look (zeroed here) and its reserve left:
    [(entry index, key name, window ms, limit, window number, admitted, reserve)]."""
    cdef Py_ssize_t n, i
    cdef uint64_t* table = _table(&n)
    cdef uint64_t* e
    cdef uint64_t marker, h, old, used, reserve, window_ns, number, index, now = _realtime_ns()
    out = []
    for i in range(n):
        e = table + i * WORDS
        marker = fg_load(e + W_CLUSTER)
        h = fg_load(e + W_NAME)
        if marker & 1 == 0 or h == 0 or fg_load(e + W_KEY) == 0 or marker >> 32 == 0:
            continue
        window_ns = (marker >> 32) * 1000000
        number = now // window_ns
        old = fg_load(e + W_STATE)
        while True:
            index, used, reserve = old >> 48, (old >> 24) & 0xFFFFFF, old & 0xFFFFFF
            if used == 0 or fg_cas(e + W_STATE, &old, (index << 48) | reserve):
                break
        if index != (number & 0xFFFF) or old == 0:
            continue                               # not in this window (yet): nothing to settle
        out.append((i, h, marker >> 32, (marker >> 8) & 0xFFFFFF, number, used, reserve))
    return out


def cluster_grant(Py_ssize_t i, uint64_t h, uint64_t number, long long change):
    """Add `change` (negative: give back) to an entry's reserve, if it still holds that key (by
    name) and window; the reserve never goes below zero."""
    cdef Py_ssize_t n
    cdef uint64_t* table = _table(&n)
    cdef uint64_t* e
    cdef uint64_t old, reserve
    cdef long long updated
    if i < 0 or i >= n:
        return
    e = table + i * WORDS
    old = fg_load(e + W_STATE)
    while fg_load(e + W_NAME) == h and (old >> 48) == (number & 0xFFFF) and old != 0:
        reserve = old & 0xFFFFFF
        updated = <long long>reserve + change
        if updated < 0:
            updated = 0
        if updated > CLUSTER_MAX:
            updated = CLUSTER_MAX
        if fg_cas(e + W_STATE, &old, (old & ~(<uint64_t>0xFFFFFF)) | <uint64_t>updated):
            return
