"""The shared-memory segment: one fixed layout of 64-bit words that the supervisor creates before it
starts the workers and every worker maps; the data plane updates it with C11 atomics.

The segment lives in a memfd (an unlinked temp file where memfd is missing) so an exec'd worker
maps it from an inherited file descriptor. Layout, in 64-bit words, each section 64-byte aligned
(the header records every capacity and section offset, offsets counted in words from the start):

  header      magic, layout version, size in bytes, capacities, section offsets, config_version,
              created_unix_ns, the rate-limit table's hash key
  workers     [W] pid, started_unix_ns, heartbeat_mono_ns, config_version, generation, state,
                  requests (counted by that worker)
  listeners   [L] open connections (a gauge, may be changed by any worker), accepted, rejected
  routes      [R] requests[8 methods][CODES]; duration histogram (16 buckets), sum ns, count.
                  Slot 0 counts requests that matched no route.
  targets     [T] health words (healthy, draining, ejected_until_mono_ns, circuit,
                  consecutive_failures, ejections, active, ewma_ns, requests, failures), words kept
                  for the balancer, then the upstream duration histogram, sum ns, count
  ratelimit   [K] entries of 8 words (key hash + algorithm state), zeroed and reserved for the
                  rate limiter (open addressing over the key hash, keyed with the header's secret)

The health words are changed by the decisions of fastgw/_core/health.pyx, which reaches a target's
words through `target_words(slot)` (shm.pxd) like every other reader of a target slot here.

Slots are numbered by the supervisor (one writer of the name -> slot tables), so workers never
allocate in shared memory. Pages never touched cost no memory, so capacities are generous.
"""
cimport cython
from libc.stdint cimport uint64_t, int64_t
from libc.string cimport memcmp

import mmap
import os
import tempfile
import time

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    int CLOCK_MONOTONIC

DEF_MAGIC = 0x4853574754534146          # b"FASTGWSH" little-endian
cdef enum:
    LAYOUT_VERSION = 2
    HEADER_WORDS = 64
    # header word indices
    H_MAGIC = 0
    H_VERSION = 1
    H_SIZE = 2
    H_WORKERS = 3
    H_ROUTES = 4
    H_TARGETS = 5
    H_LISTENERS = 6
    H_RATELIMIT = 7
    H_OFF_WORKERS = 8
    H_OFF_LISTENERS = 9
    H_OFF_ROUTES = 10
    H_OFF_TARGETS = 11
    H_OFF_RATELIMIT = 12
    H_CONFIG_VERSION = 13
    H_CREATED = 14
    H_CLUSTER_NODES = 15                # nodes sharing cluster rate limits (0: not clustered)
    H_CLUSTER_DOWN = 16                 # 1 while the cluster store (Redis) cannot be reached
    H_ANALYTICS = 17
    H_OFF_ANALYTICS = 18
    H_RATELIMIT_KEY = 19                # 2 words: the SipHash key of the rate-limit table, drawn at
                                        # creation, so every worker places keys alike and no client
                                        # can compute where a key goes

    WORKER_WORDS = 8
    W_PID = 0
    W_STARTED = 1
    W_HEARTBEAT = 2
    W_CONFIG_VERSION = 3
    W_GENERATION = 4
    W_STATE = 5
    W_REQUESTS = 6

    LISTENER_WORDS = 8
    L_OPEN = 0
    L_ACCEPTED = 1
    L_REJECTED = 2

    N_METHODS = 8
    N_EXACT_CODES = 37
    N_CODES = 42                        # the exact codes, then 1xx..5xx for any other
    N_BUCKETS = 16                      # 15 finite upper bounds and +Inf
    R_DURATION = 336                    # N_METHODS * N_CODES
    R_SUM = 352                         # R_DURATION + N_BUCKETS
    R_COUNT = 353
    # 354..358: RouteEvent counters (shm.pxd)
    ROUTE_WORDS = 360

    # T_*, TARGET_WORDS: the target slot's words (shm.pxd, read by health.pyx too)

    # Rate-limit table: reserved and zeroed here; fastgw/_core/ratelimit.pyx defines the entry
    # (open addressing over the keyed hash, 0 = empty entry, the algorithm's state updated with
    # CAS so every worker enforces the same limit). 8 words: one cache line per entry.
    RATELIMIT_WORDS = 8

    # Analytics (GET /analytics): per key (a route, service or consumer) the last 60 minutes in
    # one-minute buckets. An entry: its key hash, then per bucket the minute it holds (monotonic
    # minutes), requests, 5xx answers and a latency histogram. Open addressing, like rate limits.
    A_MINUTES = 60
    A_BUCKET_WORDS = 19                 # minute, requests, errors, N_BUCKETS histogram words
    A_PROBES = 16
    ANALYTICS_WORDS = 1144              # 1 + A_MINUTES * A_BUCKET_WORDS, rounded up to 8

METHOD_NAMES = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER")
EXACT_CODES = (100, 101, 200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403,
               404, 405, 406, 408, 409, 410, 412, 413, 414, 415, 416, 421, 422, 429, 431, 499,
               500, 501, 502, 503, 504)
CODE_LABELS = tuple(str(c) for c in EXACT_CODES) + ("1xx", "2xx", "3xx", "4xx", "5xx")
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CIRCUIT_STATES = ("closed", "open", "half_open")

assert len(EXACT_CODES) == N_EXACT_CODES and len(CODE_LABELS) == N_CODES
assert len(BUCKETS) == N_BUCKETS - 1

cdef int _code_index[600]
cdef uint64_t _bucket_ns[15]
for _i in range(600):
    _code_index[_i] = N_EXACT_CODES + (_i // 100 - 1 if 100 <= _i < 600 else 4)
for _i, _c in enumerate(EXACT_CODES):
    _code_index[_c] = _i
for _i, _b in enumerate(BUCKETS):
    _bucket_ns[_i] = <uint64_t>(_b * 1e9 + 0.5)

# The segment this process records into (set by Segment.activate), and its worker slot. The
# target section is `target_table` / `target_slots` (declared in shm.pxd for target_words).
cdef uint64_t* _base = NULL
cdef uint64_t* _workers = NULL
cdef uint64_t* _listeners = NULL
cdef uint64_t* _routes = NULL
cdef int _n_listeners = 0
cdef int _n_routes = 0
cdef uint64_t* _ratelimit = NULL
cdef Py_ssize_t _n_ratelimit = 0
cdef uint64_t* _my_requests = NULL
cdef uint64_t* _analytics = NULL
cdef Py_ssize_t _n_analytics = 0


cdef inline uint64_t _ns(double seconds) noexcept:
    # Negative and NaN durations count as 0; absurd ones are clamped (a double -> uint64 cast
    # out of range is undefined behaviour in C).
    if not seconds > 0:
        return 0
    if seconds > 1e9:
        return <uint64_t>1000000000 * 1000000000
    return <uint64_t>(seconds * 1e9)


cdef inline int _bucket(uint64_t ns) noexcept:
    cdef int i
    for i in range(N_BUCKETS - 1):
        if ns <= _bucket_ns[i]:
            return i
    return N_BUCKETS - 1


cdef inline void _observe(uint64_t* histogram, uint64_t ns) noexcept:
    """Histogram words: N_BUCKETS counts, then the sum (ns), then the count."""
    fg_add(histogram + _bucket(ns), 1)
    fg_add(histogram + N_BUCKETS, ns)
    fg_add(histogram + N_BUCKETS + 1, 1)


cdef int method_index(const char* m, Py_ssize_t n) noexcept:
    if n == 3:
        if memcmp(m, b"GET", 3) == 0:
            return 0
        if memcmp(m, b"PUT", 3) == 0:
            return 3
    elif n == 4:
        if memcmp(m, b"HEAD", 4) == 0:
            return 1
        if memcmp(m, b"POST", 4) == 0:
            return 2
    elif n == 6 and memcmp(m, b"DELETE", 6) == 0:
        return 4
    elif n == 5 and memcmp(m, b"PATCH", 5) == 0:
        return 5
    elif n == 7 and memcmp(m, b"OPTIONS", 7) == 0:
        return 6
    return 7


cdef void record_request(int route_slot, int method, int status, double seconds) noexcept:
    if _routes == NULL or route_slot < 0 or route_slot >= _n_routes:
        return
    cdef uint64_t* r = _routes + <Py_ssize_t>route_slot * ROUTE_WORDS
    cdef int code = _code_index[status] if 0 <= status < 600 else N_CODES - 1
    if method < 0 or method >= N_METHODS:
        method = N_METHODS - 1
    fg_add(r + method * N_CODES + code, 1)
    _observe(r + R_DURATION, _ns(seconds))
    if _my_requests != NULL:
        fg_add(_my_requests, 1)


cdef uint64_t* _analytics_entry(uint64_t key, bint create) noexcept:
    cdef Py_ssize_t i, start
    cdef uint64_t* e
    cdef uint64_t seen
    if _analytics == NULL or _n_analytics == 0:
        return NULL
    start = <Py_ssize_t>(key % <uint64_t>_n_analytics)
    for i in range(A_PROBES):
        e = _analytics + ((start + i) % _n_analytics) * ANALYTICS_WORDS
        seen = fg_load(e)
        if seen == key:
            return e
        if seen == 0:
            if not create:
                return NULL
            if fg_cas(e, &seen, key) or seen == key:
                return e
    return NULL                         # the table is full around this key: not counted


cdef void record_analytics(uint64_t key, double seconds, bint error) noexcept:
    """One finished request under `key` (analytics_key(kind, name)). A bucket that still holds an
    older minute is taken over by the first worker to see the new minute; a request counted by
    another worker in that instant may be lost, which a usage view can afford."""
    cdef uint64_t* e = _analytics_entry(key, True)
    cdef uint64_t minute, old
    cdef uint64_t* b
    cdef int i
    if e == NULL:
        return
    minute = _monotonic_ns() // 60000000000ULL
    b = e + 1 + <Py_ssize_t>(minute % A_MINUTES) * A_BUCKET_WORDS
    old = fg_load(b)
    if old != minute and fg_cas(b, &old, minute):
        for i in range(1, A_BUCKET_WORDS):
            fg_store(b + i, 0)
    fg_add(b + 1, 1)
    if error:
        fg_add(b + 2, 1)
    fg_add(b + 3 + _bucket(_ns(seconds)), 1)


cdef uint64_t _fnv(uint64_t h, const char* s, Py_ssize_t n) noexcept:
    """FNV-1a over `s`, continued from `h`."""
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>s[i]) * 1099511628211ULL
    return h


cdef uint64_t _FNV_BASIS = 14695981039346656037ULL
cdef uint64_t _CONSUMER_SEED = _fnv(_FNV_BASIS, b"consumer\x00", 9)
cdef uint64_t _ANONYMOUS = _fnv(_CONSUMER_SEED, b"-", 1) or 1


def analytics_key(str kind, str name):
    """The key a route, service or consumer is counted under (never 0: 0 marks a free entry)."""
    cdef bytes data = (kind + "\x00" + name).encode()
    return _fnv(_FNV_BASIS, data, len(data)) or 1


# The requests that matched no route count under the key of a route named "" (no route has that
# name), so the dashboard's history covers all traffic: analytics_key("route", "").
cdef uint64_t _UNMATCHED = _fnv(_FNV_BASIS, b"route\x00", 6) or 1


cdef uint64_t unmatched_analytics_key() noexcept:
    return _UNMATCHED


cdef uint64_t consumer_analytics_key(bytes name) noexcept:
    if name is None:
        return _ANONYMOUS
    return _fnv(_CONSUMER_SEED, name, len(name)) or 1


cdef void record_route_event(int route_slot, int event) noexcept:
    if _routes != NULL and 0 <= route_slot < _n_routes:
        fg_add(_routes + <Py_ssize_t>route_slot * ROUTE_WORDS + event, 1)


cdef bint listener_admits(int slot, long long limit, long long open_here) noexcept:
    """May a new connection in? Over all workers when the listener has a slot (listener_admit),
    else by this worker's own count of open connections."""
    cdef int admitted = listener_admit(slot, limit)
    return open_here < limit if admitted < 0 else admitted == 1


cdef int listener_admit(int slot, long long limit) noexcept:
    """Count a new connection if the listener, over all workers, has fewer than `limit` open:
    1 admitted, 0 refused (counted as rejected), -1 not tracked here. Add first, then check:
    two workers racing for the last place cannot both win."""
    if _listeners == NULL or slot < 0 or slot >= _n_listeners:
        return -1
    cdef uint64_t* l = _listeners + slot * LISTENER_WORDS
    if <int64_t>fg_add(l + L_OPEN, 1) >= limit:
        fg_sub(l + L_OPEN, 1)
        fg_add(l + L_REJECTED, 1)
        return 0
    fg_add(l + L_ACCEPTED, 1)
    return 1


cdef void listener_opened(int slot) noexcept:
    """Count a connection admitted without a shared limit (see listener_admit for one)."""
    if _listeners != NULL and 0 <= slot < _n_listeners:
        fg_add(_listeners + slot * LISTENER_WORDS + L_OPEN, 1)
        fg_add(_listeners + slot * LISTENER_WORDS + L_ACCEPTED, 1)


cdef void listener_closed(int slot) noexcept:
    if _listeners != NULL and 0 <= slot < _n_listeners:
        fg_sub(_listeners + slot * LISTENER_WORDS + L_OPEN, 1)


cdef void listener_rejected(int slot) noexcept:
    if _listeners != NULL and 0 <= slot < _n_listeners:
        fg_add(_listeners + slot * LISTENER_WORDS + L_REJECTED, 1)


cdef void target_begin(int slot) noexcept:
    cdef uint64_t* t = target_words(slot)
    if t != NULL:
        fg_add(t + T_ACTIVE, 1)


cdef void target_release(int slot) noexcept:
    """A Layer 4 connection ended: in flight again, without a latency sample (a connection's
    life says nothing about the target's speed)."""
    cdef uint64_t* t = target_words(slot)
    if t != NULL:
        fg_sub(t + T_ACTIVE, 1)


cdef uint64_t target_count_end(uint64_t* t, double seconds, bint failed) noexcept:
    """A request to the target `t` (target_words) ended: one fewer in flight, counted among its
    requests and failures, a success's duration in its histogram. Returns the duration in ns
    (fastgw/_core/health.pyx feeds it to the latency EWMA)."""
    cdef uint64_t ns = _ns(seconds)
    fg_sub(t + T_ACTIVE, 1)
    fg_add(t + T_REQUESTS, 1)
    if failed:
        fg_add(t + T_FAILURES, 1)
    else:
        _observe(t + T_DURATION, ns)
    return ns


cdef long long target_active(int slot) noexcept:
    cdef uint64_t* t = target_words(slot)
    return <int64_t>fg_load(t + T_ACTIVE) if t != NULL else -1


cdef unsigned long long monotonic_ns() noexcept:
    return _monotonic_ns()


cdef bint target_draining(int slot) noexcept:
    cdef uint64_t* t = target_words(slot)
    return t != NULL and fg_load(t + T_DRAINING) != 0


cdef uint64_t cluster_nodes() noexcept:
    return fg_load(_base + H_CLUSTER_NODES) if _base != NULL else 0


cdef bint cluster_down() noexcept:
    return _base != NULL and fg_load(_base + H_CLUSTER_DOWN) != 0


cdef uint64_t* ratelimit_table(Py_ssize_t* entries) noexcept:
    """The rate-limit region of the active segment (RATELIMIT_WORDS words per entry), or NULL."""
    entries[0] = _n_ratelimit
    return _ratelimit


cdef const uint64_t* ratelimit_key() noexcept:
    """The active segment's 128-bit rate-limit hash key (2 words), or NULL."""
    return _base + H_RATELIMIT_KEY if _base != NULL else NULL


cdef inline Py_ssize_t _aligned(Py_ssize_t words) noexcept:
    return (words + 7) & ~7                 # 8 words = 64 bytes


def _layout(Py_ssize_t workers, Py_ssize_t routes, Py_ssize_t targets, Py_ssize_t listeners,
            Py_ssize_t ratelimit_entries, Py_ssize_t analytics_entries):
    """(offsets of workers, listeners, routes, targets, ratelimit, analytics in words, size in bytes).
    `attach` recomputes it from the header's capacities, so a header that does not describe a
    segment of its own size is refused before any slot address is derived from it."""
    off_workers = HEADER_WORDS
    off_listeners = _aligned(off_workers + workers * WORKER_WORDS)
    off_routes = _aligned(off_listeners + listeners * LISTENER_WORDS)
    off_targets = _aligned(off_routes + routes * ROUTE_WORDS)
    off_ratelimit = _aligned(off_targets + targets * TARGET_WORDS)
    off_analytics = _aligned(off_ratelimit + ratelimit_entries * RATELIMIT_WORDS)
    words = _aligned(off_analytics + analytics_entries * ANALYTICS_WORDS)
    return off_workers, off_listeners, off_routes, off_targets, off_ratelimit, off_analytics, words * 8


cdef uint64_t _monotonic_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


@cython.final
cdef class Segment:
    """A mapped segment. `create` in the supervisor, `attach(fd)` in a worker."""

    @staticmethod
    def create(*, int workers, int routes, int targets, int listeners,
               int ratelimit_entries=65536, int analytics_entries=1024):
        if min(workers, routes, targets, listeners, ratelimit_entries, analytics_entries) < 1:
            raise ValueError("every capacity must be at least 1")
        off_workers, off_listeners, off_routes, off_targets, off_ratelimit, off_analytics, size = _layout(
            workers, routes, targets, listeners, ratelimit_entries, analytics_entries)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("fastgw-shm", 0)
            file = open(fd, "r+b", buffering=0)
        else:                               # macOS: an unlinked temp file serves the same purpose
            file = tempfile.TemporaryFile()
        os.ftruncate(file.fileno(), size)
        cdef Segment seg = Segment._map_file(file, size)
        cdef uint64_t* h = seg.base
        h[H_VERSION] = LAYOUT_VERSION
        h[H_SIZE] = size
        h[H_WORKERS], h[H_ROUTES], h[H_TARGETS] = workers, routes, targets
        h[H_LISTENERS], h[H_RATELIMIT] = listeners, ratelimit_entries
        h[H_OFF_WORKERS], h[H_OFF_LISTENERS], h[H_OFF_ROUTES] = off_workers, off_listeners, off_routes
        h[H_OFF_TARGETS], h[H_OFF_RATELIMIT] = off_targets, off_ratelimit
        h[H_ANALYTICS], h[H_OFF_ANALYTICS] = analytics_entries, off_analytics
        h[H_CREATED] = time.time_ns()
        h[H_RATELIMIT_KEY] = int.from_bytes(os.urandom(8), "little")
        h[H_RATELIMIT_KEY + 1] = int.from_bytes(os.urandom(8), "little")
        for slot in range(targets):
            seg._target(slot)[T_HEALTHY] = 1
        h[H_MAGIC] = DEF_MAGIC               # last: a half-written header never validates
        seg._read_capacity()
        return seg

    @staticmethod
    def attach(int fd):
        file = open(os.dup(fd), "r+b", buffering=0)
        size = os.fstat(file.fileno()).st_size
        if size < HEADER_WORDS * 8:
            file.close()
            raise ValueError(f"fd {fd} is not a fastgw shared-memory segment ({size} bytes)")
        cdef Segment seg = Segment._map_file(file, size)
        cdef uint64_t* h = seg.base
        if h[H_MAGIC] != DEF_MAGIC:
            seg.close()
            raise ValueError(f"fd {fd} is not a fastgw shared-memory segment (bad magic)")
        if h[H_VERSION] != LAYOUT_VERSION:
            version = h[H_VERSION]
            seg.close()
            raise ValueError(f"fd {fd} is a fastgw shared-memory segment of layout version "
                             f"{version}, this build reads {LAYOUT_VERSION} (mixed fastgw versions?)")
        expected = (h[H_OFF_WORKERS], h[H_OFF_LISTENERS], h[H_OFF_ROUTES], h[H_OFF_TARGETS],
                    h[H_OFF_RATELIMIT], h[H_OFF_ANALYTICS], h[H_SIZE])
        if h[H_SIZE] != <uint64_t>size or max(h[H_WORKERS], h[H_ROUTES], h[H_TARGETS],
                                               h[H_LISTENERS], h[H_RATELIMIT], h[H_ANALYTICS]) >= 1 << 31 \
                or _layout(h[H_WORKERS], h[H_ROUTES], h[H_TARGETS], h[H_LISTENERS],
                           h[H_RATELIMIT], h[H_ANALYTICS]) != expected:
            recorded = h[H_SIZE]
            seg.close()
            raise ValueError(f"fd {fd} is a fastgw shared-memory segment of {size} bytes whose "
                             f"header says {recorded} bytes or an inconsistent layout")
        seg._read_capacity()
        return seg

    @staticmethod
    def _map_file(file, Py_ssize_t size):
        cdef Segment seg = Segment.__new__(Segment)
        cdef unsigned char[::1] view
        seg._file = file
        seg._map = mmap.mmap(file.fileno(), size)
        view = seg._map
        seg.base = <uint64_t*>&view[0]
        seg.size = size
        return seg

    def _read_capacity(self):
        cdef uint64_t* h = self.base
        self.capacity = {"workers": h[H_WORKERS], "routes": h[H_ROUTES], "targets": h[H_TARGETS],
                         "listeners": h[H_LISTENERS], "ratelimit": h[H_RATELIMIT],
                         "analytics": h[H_ANALYTICS]}

    @property
    def fd(self):
        return self._file.fileno()

    def activate(self, int worker_index=-1):
        """Make this the segment the data plane of this process records into."""
        global _base, _workers, _listeners, _routes, target_table, _n_listeners, _n_routes, target_slots
        global _my_requests, _ratelimit, _n_ratelimit, _analytics, _n_analytics
        cdef uint64_t* h = self.base
        _analytics, _n_analytics = h + h[H_OFF_ANALYTICS], h[H_ANALYTICS]
        _workers = h + h[H_OFF_WORKERS]
        _listeners = h + h[H_OFF_LISTENERS]
        _routes = h + h[H_OFF_ROUTES]
        target_table = h + h[H_OFF_TARGETS]
        _n_listeners, _n_routes, target_slots = h[H_LISTENERS], h[H_ROUTES], h[H_TARGETS]
        _ratelimit, _n_ratelimit = h + h[H_OFF_RATELIMIT], h[H_RATELIMIT]
        _my_requests = self._worker(worker_index) + W_REQUESTS if worker_index >= 0 else NULL
        _base = h

    def close(self):
        global _base, _workers, _listeners, _routes, target_table, _n_listeners, _n_routes, target_slots
        global _my_requests, _ratelimit, _n_ratelimit, _analytics, _n_analytics
        if self.base == NULL:
            return
        if _base == self.base:
            _base = _workers = _listeners = _routes = target_table = _my_requests = _ratelimit = NULL
            _analytics = NULL
            _n_listeners = _n_routes = target_slots = _n_ratelimit = _n_analytics = 0
        self.base = NULL
        try:
            self._map.close()
        except BufferError:                 # a memoryview still refers to it; unmapped at exit
            pass
        self._file.close()

    # --- slot addresses --------------------------------------------------------------------------

    cdef uint64_t* _section(self, int header_offset, int header_count, int slot, int words) except NULL:
        if self.base == NULL:
            raise ValueError("the segment is closed")
        if not 0 <= slot < <int>self.base[header_count]:
            raise IndexError(f"slot {slot} out of range")
        return self.base + self.base[header_offset] + <Py_ssize_t>slot * words

    cdef uint64_t* _worker(self, int index) except NULL:
        return self._section(H_OFF_WORKERS, H_WORKERS, index, WORKER_WORDS)

    cdef uint64_t* _route(self, int slot) except NULL:
        return self._section(H_OFF_ROUTES, H_ROUTES, slot, ROUTE_WORDS)

    cdef uint64_t* _target(self, int slot) except NULL:
        return self._section(H_OFF_TARGETS, H_TARGETS, slot, TARGET_WORDS)

    cdef uint64_t* _listener(self, int slot) except NULL:
        return self._section(H_OFF_LISTENERS, H_LISTENERS, slot, LISTENER_WORDS)

    # --- header and workers ----------------------------------------------------------------------

    @property
    def config_version(self):
        return fg_load(self.base + H_CONFIG_VERSION)

    @config_version.setter
    def config_version(self, uint64_t value):
        fg_store(self.base + H_CONFIG_VERSION, value)

    @property
    def cluster_nodes(self):
        return fg_load(self.base + H_CLUSTER_NODES)

    @cluster_nodes.setter
    def cluster_nodes(self, uint64_t value):
        fg_store(self.base + H_CLUSTER_NODES, value)

    @property
    def cluster_down(self):
        return fg_load(self.base + H_CLUSTER_DOWN) != 0

    @cluster_down.setter
    def cluster_down(self, bint value):
        fg_store(self.base + H_CLUSTER_DOWN, value)

    def worker_set(self, int index, *, uint64_t pid, uint64_t config_version, uint64_t state,
                   generation=None):
        cdef uint64_t* w = self._worker(index)
        if fg_load(w + W_PID) != pid:
            fg_store(w + W_STARTED, time.time_ns())
            fg_store(w + W_HEARTBEAT, _monotonic_ns())
        fg_store(w + W_PID, pid)
        fg_store(w + W_CONFIG_VERSION, config_version)
        fg_store(w + W_STATE, state)
        if generation is not None:
            fg_store(w + W_GENERATION, generation)

    def worker_heartbeat(self, int index):
        fg_store(self._worker(index) + W_HEARTBEAT, _monotonic_ns())

    def worker_applied(self, int index, uint64_t config_version):
        fg_store(self._worker(index) + W_CONFIG_VERSION, config_version)

    def workers(self):
        cdef uint64_t now = _monotonic_ns()
        cdef uint64_t* w
        out = []
        for index in range(self.capacity["workers"]):
            w = self._worker(index)
            if fg_load(w + W_STATE) == 0:
                continue
            beat = fg_load(w + W_HEARTBEAT)
            out.append({"index": index, "pid": fg_load(w + W_PID), "state": fg_load(w + W_STATE),
                        "started_unix": fg_load(w + W_STARTED) / 1e9,
                        "heartbeat_age_s": (now - beat) / 1e9 if now > beat else 0.0,
                        "config_version": fg_load(w + W_CONFIG_VERSION),
                        "generation": fg_load(w + W_GENERATION),
                        "requests": fg_load(w + W_REQUESTS)})
        return out

    # --- readers for metrics and the admin API ---------------------------------------------------

    def route_requests(self, int slot):
        """[(method, code label, count)] for the cells that are not zero."""
        cdef uint64_t* r = self._route(slot)
        cdef uint64_t n
        cdef int m, c
        out = []
        for m in range(N_METHODS):
            for c in range(N_CODES):
                n = fg_load(r + m * N_CODES + c)
                if n:
                    out.append((METHOD_NAMES[m], CODE_LABELS[c], n))
        return out

    def analytics(self, keys, int minutes):
        """{label: (requests, errors, histogram)} over the last `minutes` (the current one
        included) for `keys` [(analytics_key, label)] that have counted something."""
        cdef uint64_t* h = self.base
        cdef uint64_t* table = h + h[H_OFF_ANALYTICS]
        cdef Py_ssize_t n = h[H_ANALYTICS], i, start
        cdef uint64_t* e
        cdef uint64_t* b
        cdef uint64_t now = _monotonic_ns() // 60000000000ULL, minute
        cdef int m, k
        out = {}
        for key, label in keys:
            start = <Py_ssize_t>(<uint64_t>key % <uint64_t>n)
            e = NULL
            for i in range(A_PROBES):
                if fg_load(table + ((start + i) % n) * ANALYTICS_WORDS) == <uint64_t>key:
                    e = table + ((start + i) % n) * ANALYTICS_WORDS
                    break
            if e == NULL:
                continue
            requests = errors = 0
            hist = [0] * N_BUCKETS
            for m in range(A_MINUTES):
                b = e + 1 + m * A_BUCKET_WORDS
                minute = fg_load(b)
                if minute + <uint64_t>minutes <= now or minute > now:
                    continue
                requests += fg_load(b + 1)
                errors += fg_load(b + 2)
                for k in range(N_BUCKETS):
                    hist[k] += fg_load(b + 3 + k)
            if requests:
                out[label] = (requests, errors, hist)
        return out

    def analytics_minutes(self, keys, int minutes):
        """[(requests, errors, histogram)] per minute of the last `minutes`, oldest first (the
        current minute last), summed over the analytics keys `keys`."""
        cdef uint64_t* h = self.base
        cdef uint64_t* table = h + h[H_OFF_ANALYTICS]
        cdef Py_ssize_t n = h[H_ANALYTICS], i, start
        cdef uint64_t* e
        cdef uint64_t* b
        cdef uint64_t now = _monotonic_ns() // 60000000000ULL, minute
        cdef int m, k
        out = [[0, 0, [0] * N_BUCKETS] for _ in range(minutes)]
        for key in keys:
            start = <Py_ssize_t>(<uint64_t>key % <uint64_t>n)
            e = NULL
            for i in range(A_PROBES):
                if fg_load(table + ((start + i) % n) * ANALYTICS_WORDS) == <uint64_t>key:
                    e = table + ((start + i) % n) * ANALYTICS_WORDS
                    break
            if e == NULL:
                continue
            for m in range(A_MINUTES):
                b = e + 1 + m * A_BUCKET_WORDS
                minute = fg_load(b)
                if minute + <uint64_t>minutes <= now or minute > now:
                    continue
                row = out[minutes - 1 - <int>(now - minute)]
                row[0] += fg_load(b + 1)
                row[1] += fg_load(b + 2)
                for k in range(N_BUCKETS):
                    row[2][k] += fg_load(b + 3 + k)
        return [tuple(row) for row in out]

    def route_events(self, int slot):
        """Cache results and rate-limit decisions of a route."""
        cdef uint64_t* r = self._route(slot)
        return {"cache": {"hit": fg_load(r + EV_CACHE_HIT), "miss": fg_load(r + EV_CACHE_MISS),
                          "stale": fg_load(r + EV_CACHE_STALE)},
                "ratelimit": {"allowed": fg_load(r + EV_RATELIMIT_ALLOWED),
                              "rejected": fg_load(r + EV_RATELIMIT_REJECTED)}}

    def route_duration(self, int slot):
        return _histogram(self._route(slot) + R_DURATION)

    def target_stats(self, int slot):
        cdef uint64_t* t = self._target(slot)
        ejected_until = fg_load(t + T_EJECTED_UNTIL)
        circuit = fg_load(t + T_CIRCUIT)
        return {
            "healthy": fg_load(t + T_HEALTHY) != 0,
            "draining": fg_load(t + T_DRAINING) != 0,
            "ejected": ejected_until > _monotonic_ns(),
            "circuit": CIRCUIT_STATES[circuit] if circuit < 3 else "closed",
            "active": <int64_t>fg_load(t + T_ACTIVE),
            "ewma_ms": fg_load(t + T_EWMA) / 1e6,
            "requests": fg_load(t + T_REQUESTS),
            "failures": fg_load(t + T_FAILURES),
            "duration": _histogram(t + T_DURATION),
        }

    def target_set_draining(self, int slot, bint draining):
        fg_store(self._target(slot) + T_DRAINING, draining)

    def target_set_healthy(self, int slot, bint healthy):
        cdef uint64_t* t = self._target(slot)
        if healthy and fg_load(t + T_HEALTHY) == 0:
            fg_store(t + T_UP_SINCE, _monotonic_ns())      # back: slow start counts from now
        fg_store(t + T_HEALTHY, healthy)

    def target_added(self, int slot):
        """A target added to a running gateway starts its slow start now."""
        fg_store(self._target(slot) + T_UP_SINCE, _monotonic_ns())

    def target_reset(self, int slot):
        """Zero the slot's state and counters and mark it healthy, for a slot given to a new
        target. `active` is left alone: requests still in flight on the slot end with
        target_end and bring it back to the true value, where zeroing it would leave it negative."""
        cdef uint64_t* t = self._target(slot)
        cdef int i
        for i in range(TARGET_WORDS):
            if i != T_ACTIVE:
                fg_store(t + i, 0)
        fg_store(t + T_HEALTHY, 1)

    def listener_stats(self, int slot):
        cdef uint64_t* l = self._listener(slot)
        return {"open": <int64_t>fg_load(l + L_OPEN), "accepted": fg_load(l + L_ACCEPTED),
                "rejected": fg_load(l + L_REJECTED)}


cdef tuple _histogram(uint64_t* h):
    """(non-cumulative bucket counts, sum in seconds, count)."""
    cdef int i
    return ([fg_load(h + i) for i in range(N_BUCKETS)], fg_load(h + N_BUCKETS) / 1e9,
            fg_load(h + N_BUCKETS + 1))


# --- the data plane's recorders, callable from Python for tests --------------------------------

def _record_request(int route_slot, bytes method, int status, double seconds):
    record_request(route_slot, method_index(method, len(method)), status, seconds)

def _record_analytics(uint64_t key, double seconds, bint error):
    record_analytics(key, seconds, error)

def _record_route_event(int route_slot, str event):
    record_route_event(route_slot, {"cache_hit": EV_CACHE_HIT, "cache_miss": EV_CACHE_MISS,
                                    "cache_stale": EV_CACHE_STALE, "ratelimit_allowed": EV_RATELIMIT_ALLOWED,
                                    "ratelimit_rejected": EV_RATELIMIT_REJECTED}[event])

def _listener_admit(int slot, long long limit):
    return listener_admit(slot, limit)

def _listener_opened(int slot):
    listener_opened(slot)

def _listener_closed(int slot):
    listener_closed(slot)

def _listener_rejected(int slot):
    listener_rejected(slot)

def _target_begin(int slot):
    target_begin(slot)

def _target_draining(int slot):
    return target_draining(slot)

