"""Target selection: one Balancer per service, built at config load, asked once per request.

Every algorithm reads in-flight requests and latency from the shared-memory target slots
(fastgw/_core/shm.pyx; whether a target is up: fastgw/_core/health.pyx), so all workers balance
on the same numbers; a target without a slot falls back to this worker's own count. Hashing uses a fixed 64-bit function (FNV-1a folded
through the splitmix64 finaliser), never Python's per-process randomised `hash`, so every
worker and every host maps a key to the same target.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint64_t

from fastgw._core.buffer cimport hash64, monotonic, random64
from fastgw._core.health cimport target_available, target_ewma_ns, target_up_since
from fastgw._core.shm cimport monotonic_ns, target_active
from fastgw._core.upstream cimport Target

ALGORITHMS = ("round_robin", "weighted_round_robin", "least_conn", "p2c_ewma", "consistent_hash",
              "random", "nearest")
VNODES_PER_WEIGHT = 160        # ring points per unit of weight (Ketama uses 160 per server)
DEFAULT_EWMA_NS = 1000000      # when neither of two targets has a latency sample yet
SLOW_START_FLOOR = 0.1         # a target just back gets at least this share of its weight
NEAREST_PROBE_EVERY = 32       # nearest: one pick in this many measures another target
cdef double REFUSED_MEMORY = 1.0   # seconds a failed connect steers retries away from a target


def hash_key(bytes key):
    """The ring position of a key (for tests and the reference model)."""
    return hash64(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))


cdef inline int64_t _active(Target t) noexcept:
    cdef int64_t n = target_active(t.metric_slot)
    return n if n >= 0 else t.active


cdef inline bint _up(Balancer b, Target t, uint64_t now) noexcept:
    """Healthy by the active checks, not ejected by the passive ones, circuit not open; and while
    it ramps up after coming back (slow start), drawn with the probability of its ramp (Envoy's
    slow start, aggression 1: linear from SLOW_START_FLOOR to full weight)."""
    cdef uint64_t since
    cdef double ramp
    if not target_available(t.metric_slot, now):
        return False
    if not b.ramping:
        return True
    since = target_up_since(t.metric_slot, now)
    if since == 0 or now - since >= b.slow_start_ns:
        return True
    ramp = (now - since) / <double>b.slow_start_ns
    if ramp < SLOW_START_FLOOR:
        ramp = SLOW_START_FLOOR
    return (random64() >> 11) * (1.0 / 9007199254740992.0) < ramp


cdef inline double _cost(Target t, uint64_t ewma) noexcept:
    return ewma * <double>(_active(t) + 1)


cdef inline bint _refused_lately(Target t) noexcept:
    """This worker's last connect to `t` failed less than REFUSED_MEMORY seconds ago."""
    return t.connect_failed_at > 0 and monotonic() - t.connect_failed_at < REFUSED_MEMORY


cdef inline bint _excluded(Target t, object exclude):
    """`exclude` is a Target or a tuple of them (Balancer.pick)."""
    if isinstance(exclude, Target):
        return t is exclude
    return t in exclude


cdef class Balancer:
    def __init__(self, list targets, double slow_start=0.0):
        self.targets = targets
        self.count = len(targets)
        self.slow_start_ns = <uint64_t>(slow_start * 1e9)
        self.ramping = self.slow_start_ns > 0

    cdef Target pick(self, bytes key, object exclude=None):
        """The target for a request, None when no target is up. `exclude` (a retry: the target
        that just failed, or a tuple of targets) is never picked; the pick then also passes over
        a target this worker could not connect to a moment ago while another one is up."""
        cdef Target t = self.select(key)
        if t is None and self.ramping:
            # Every target that is up is still ramping and the draws all said no: a target in
            # slow start is better than a 503.
            self.ramping = False
            t = self.select(key)
            self.ramping = True
        if exclude is not None and t is not None and (_excluded(t, exclude) or _refused_lately(t)):
            t = self._other_than(exclude)
        return t

    cdef Target select(self, bytes key):
        raise NotImplementedError

    cdef Target _other_than(self, object exclude):
        """A retry's target when the algorithm drew an excluded one or one that refused a
        connect lately. A target that fails fast looks idle to the load-aware algorithms and
        would be drawn again and again, and one this worker could not connect to a moment ago
        is most likely down (killed, restarting) even before passive health ejects it: so the
        next target that is up from a random place, one that did not refuse us if there is one."""
        cdef Py_ssize_t i, start
        cdef Target t, refused = None
        cdef uint64_t now = monotonic_ns()
        if self.count == 0:
            return None
        start = random64() % <uint64_t>self.count
        for i in range(self.count):
            t = self.targets[(start + i) % self.count]
            if not _excluded(t, exclude) and target_available(t.metric_slot, now):
                if not _refused_lately(t):
                    return t
                if refused is None:
                    refused = t
        return refused

    def choose(self, key=None, exclude=None):
        """Python entry point (tests, the reference comparison)."""
        return self.pick(key, exclude)


@cython.final
cdef class Single(Balancer):
    """A service with one target: nothing to choose, so no draw, no hash, no scan — that target
    while it is up. Every algorithm would answer the same (slow start included: with no other
    target up, Balancer.pick takes one that is still ramping)."""

    cdef Target pick(self, bytes key, object exclude=None):
        cdef Target t = <Target>self.targets[0]
        if exclude is not None and _excluded(t, exclude):
            return None
        return t if target_available(t.metric_slot, monotonic_ns()) else None

    cdef Target select(self, bytes key):
        return self.pick(key)


@cython.final
cdef class RoundRobin(Balancer):
    cdef Target select(self, bytes key):
        cdef uint64_t now = monotonic_ns()
        cdef Py_ssize_t tries
        cdef Target t
        for tries in range(self.count):
            self.next_index += 1
            if self.next_index >= self.count:
                self.next_index = 0
            t = self.targets[self.next_index]
            if _up(self, t, now):
                return t
        return None


@cython.final
cdef class SmoothWeighted(Balancer):
    """nginx's smooth weighted round robin: each pick adds every weight to its target's credit,
    takes the target with the most credit and charges it the total. Weights 5:1:1 give
    a a b a c a a, not a a a a a b c."""

    def __init__(self, list targets, double slow_start=0.0):
        super().__init__(targets, slow_start)
        self.credit = [0] * self.count
        self.total = sum(t.weight for t in targets)

    cdef Target select(self, bytes key):
        cdef Py_ssize_t i, best = -1
        cdef long long c, best_credit = 0, total = 0
        cdef list credit = self.credit
        cdef uint64_t now = monotonic_ns()
        cdef Target t
        for i in range(self.count):
            t = self.targets[i]
            if not _up(self, t, now):                # a target that is down takes no credit
                continue
            c = <long long>credit[i] + t.weight
            credit[i] = c
            total += t.weight
            if best < 0 or c > best_credit:
                best, best_credit = i, c
        if best < 0:
            return None
        credit[best] = best_credit - total
        return self.targets[best]


@cython.final
cdef class LeastConn(Balancer):
    """Fewest requests in flight (over all workers), weighted: active/weight; ties go round robin
    so equal targets share the load."""

    cdef Target select(self, bytes key):
        cdef Py_ssize_t i, j, best = -1
        cdef double score, best_score = 0
        cdef Target t
        cdef uint64_t now = monotonic_ns()
        self.next_index += 1
        for j in range(self.count):
            i = (self.next_index + j) % self.count
            t = self.targets[i]
            if not _up(self, t, now):
                continue
            score = (_active(t) + 1) / <double>(t.weight if t.weight > 0 else 1)
            if best < 0 or score < best_score:
                best, best_score = i, score
        return self.targets[best] if best >= 0 else None


@cython.final
cdef class P2CEwma(Balancer):
    """Power of two choices: two distinct targets at random (by weight), keep the one with the
    lower latency EWMA x (requests in flight + 1) — Finagle's and Linkerd's peak-EWMA balancer:
    a slow or overloaded target loses most draws without being starved of samples."""

    def __init__(self, list targets, double slow_start=0.0):
        super().__init__(targets, slow_start)
        self.picker = WeightedRandom(targets, slow_start)

    cdef Target select(self, bytes key):
        cdef Target a = self.picker.pick(None)
        cdef Target b = self.picker.pick(None)
        cdef Target t
        cdef int tries = 0
        cdef Py_ssize_t i, start
        cdef uint64_t now
        if a is None:
            return None                        # nothing is up
        while (b is a or b is None) and tries < 4:   # distinct when possible (weights may be skewed)
            b = self.picker.pick(None)
            tries += 1
        if b is a or b is None:                # the next one up after a, if any
            b = None
            now = monotonic_ns()
            start = self.targets.index(a)
            for i in range(1, self.count):
                t = self.targets[(start + i) % self.count]
                if _up(self, t, now):
                    b = t
                    break
            if b is None:
                return a
        cdef uint64_t ea = target_ewma_ns(a.metric_slot), eb = target_ewma_ns(b.metric_slot)
        # A target without a latency sample yet (new, or just back) is taken to be as fast as
        # its rival: a pessimistic guess would starve it of the very requests that measure it.
        if ea == 0:
            ea = eb if eb else DEFAULT_EWMA_NS
        if eb == 0:
            eb = ea
        return b if _cost(b, eb) < _cost(a, ea) else a


@cython.final
cdef class WeightedRandom(Balancer):
    def __init__(self, list targets, double slow_start=0.0):
        super().__init__(targets, slow_start)
        self.cumulative = []
        total = 0
        for t in targets:
            total += max(t.weight, 0)
            self.cumulative.append(total)
        self.total = total

    cdef Target select(self, bytes key):
        cdef long long r, lo = 0, hi = self.count - 1, mid, i
        cdef uint64_t now = monotonic_ns()
        cdef Target t
        if self.total <= 0:
            lo = random64() % <uint64_t>self.count
        else:
            r = <long long>(random64() % <uint64_t>self.total)
            while lo < hi:                     # first cumulative weight above r
                mid = (lo + hi) // 2
                if <long long>self.cumulative[mid] > r:
                    hi = mid
                else:
                    lo = mid + 1
        for i in range(self.count):            # drawn one down: the next one up
            t = self.targets[(lo + i) % self.count]
            if _up(self, t, now):
                return t
        return None


@cython.final
cdef class ConsistentHash(Balancer):
    """A ring of VNODES_PER_WEIGHT x weight points per target (Ketama); a key goes to the first
    point at or after its hash. Adding a target moves about 1/N of the keys. With `bounded_load`
    (Mirrokni et al., "Consistent Hashing with Bounded Loads"), a target already holding more than
    bounded_load x the mean of requests in flight is passed over for the next one on the ring."""

    def __init__(self, list targets, double bounded_load=0.0):
        super().__init__(targets)
        self.bounded_load = bounded_load
        points = []
        for index, t in enumerate(targets):
            for v in range(VNODES_PER_WEIGHT * max(t.weight, 1)):
                label = f"{t.address}#{v}".encode()
                points.append((hash64(PyBytes_AS_STRING(label), len(label)), index))
        points.sort()
        self.size = len(points)
        self.ring_hash = <uint64_t*>PyMem_Malloc(sizeof(uint64_t) * max(self.size, 1))
        self.ring_target = <int*>PyMem_Malloc(sizeof(int) * max(self.size, 1))
        if self.ring_hash == NULL or self.ring_target == NULL:
            raise MemoryError()
        for i, (h, index) in enumerate(points):
            self.ring_hash[i] = h
            self.ring_target[i] = index

    def __dealloc__(self):
        PyMem_Free(self.ring_hash)
        PyMem_Free(self.ring_target)

    cdef Target select(self, bytes key):
        cdef uint64_t h
        cdef Py_ssize_t lo = 0, hi = self.size, mid, i, steps
        cdef int64_t total = 0, cap
        cdef Target t
        cdef uint64_t now = monotonic_ns()
        if key is None:                        # nothing to hash on: spread at random
            key = random64().to_bytes(8, "little")
        h = hash64(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        while lo < hi:
            mid = (lo + hi) // 2
            if self.ring_hash[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        if lo == self.size:
            lo = 0
        if self.bounded_load <= 0 or self.count == 1:
            for steps in range(self.size):     # the first point whose target is up
                t = self.targets[self.ring_target[(lo + steps) % self.size]]
                if _up(self, t, now):
                    return t
            return None
        for t in self.targets:
            total += _active(t)
        # Capacity counts the request being placed: ceil(c x (in flight + 1) / targets).
        cap = <int64_t>(self.bounded_load * (total + 1) / self.count)
        if cap * self.count < self.bounded_load * (total + 1):
            cap += 1
        for steps in range(self.size):
            i = (lo + steps) % self.size
            t = self.targets[self.ring_target[i]]
            if _up(self, t, now) and _active(t) + 1 <= cap:
                return t
        return None


@cython.final
cdef class Nearest(Balancer):
    """The target with the lowest latency EWMA (all workers' measurements). One pick in
    NEAREST_PROBE_EVERY goes to another target that is up, so the others' latencies stay
    current and a target that got faster is found again."""

    cdef Target select(self, bytes key):
        cdef uint64_t now = monotonic_ns(), ewma, best_ewma = 0
        cdef Target t, best = None
        cdef Py_ssize_t i, start
        self.next_index += 1
        if self.next_index % NEAREST_PROBE_EVERY == 0:
            start = random64() % <uint64_t>self.count
            for i in range(self.count):
                t = self.targets[(start + i) % self.count]
                if _up(self, t, now):
                    return t
            return None
        for t in self.targets:
            if not _up(self, t, now):
                continue
            ewma = target_ewma_ns(t.metric_slot)   # 0: not measured yet, so measure it now
            if best is None or ewma < best_ewma:
                best, best_ewma = t, ewma
        return best


@cython.final
cdef class ZonePreferring(Balancer):
    """Locality: balance over our own zone's targets while at least `spill_over_below` of them
    are up, over every zone's below that (and whenever our zone has nothing to give)."""

    def __init__(self, Balancer local, Balancer everyone, double spill_over_below):
        super().__init__(everyone.targets)
        self.local = local
        self.everyone = everyone
        self.spill_over_below = spill_over_below

    cdef Target select(self, bytes key):
        cdef uint64_t now = monotonic_ns()
        cdef Py_ssize_t up = 0
        cdef Target t = None
        for candidate in self.local.targets:
            if target_available((<Target>candidate).metric_slot, now):
                up += 1
        if up >= self.spill_over_below * self.local.count:
            t = self.local.pick(key)
        return t if t is not None else self.everyone.pick(key)


def make_balancer(str algorithm, list targets, double bounded_load=0.0, double slow_start=0.0):
    if len(targets) == 1 and algorithm in ALGORITHMS:
        return Single(targets, slow_start)
    if algorithm == "round_robin":
        return RoundRobin(targets, slow_start)
    if algorithm == "weighted_round_robin":
        return SmoothWeighted(targets, slow_start)
    if algorithm == "least_conn":
        return LeastConn(targets, slow_start)
    if algorithm == "p2c_ewma":
        return P2CEwma(targets, slow_start)
    if algorithm == "consistent_hash":
        return ConsistentHash(targets, bounded_load)   # no slow start: it would move keys about
    if algorithm == "random":
        return WeightedRandom(targets, slow_start)
    if algorithm == "nearest":
        return Nearest(targets, slow_start)
    raise ValueError(f"unknown balancing algorithm {algorithm!r}")
