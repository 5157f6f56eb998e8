"""Target health, decided in the data plane over the shared target words (fastgw/_core/shm.pyx).

Every worker reads and changes the same words, so all of them see one state per target:

- availability: healthy by the supervisor's active checks, not ejected, circuit not refusing;
- the circuit breaker: closed -> open -> half-open -> closed (or open again);
- outlier ejection (Envoy's passive health): consecutive failures, then ejections that grow;
- the latency EWMA the load-aware balancers read (fastgw/_core/balancer.pyx);
- slow start: when a target last came back, for the balancer's ramp.

The words are reached only through shm's `target_words(slot)`; a slot that is not tracked (no
active segment, slot -1, out of range) answers as a healthy target with nothing recorded.
Timestamps are CLOCK_MONOTONIC nanoseconds (shm's monotonic_ns), passed in by the caller so that
one decision reads one clock.
"""
from libc.stdint cimport int64_t, uint64_t

from fastgw._core.shm cimport (CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, T_CB_FAILURES,
                               T_CB_OPEN_NS, T_CB_OPEN_UNTIL, T_CB_REQUESTS, T_CB_TRIAL_LIMIT,
                               T_CB_TRIAL_OK, T_CB_TRIALS, T_CB_WINDOW, T_CIRCUIT,
                               T_CONSECUTIVE_FAILURES, T_EJECTED_UNTIL, T_EJECTIONS, T_EWMA,
                               T_HEALTHY, T_UP_SINCE, fg_add, fg_cas, fg_load, fg_store,
                               target_count_end, target_words)

# The latency sample a failed request counts as: at least this, and 4x the EWMA up to the max.
cdef uint64_t FAILURE_PENALTY_NS = 250000000ULL
cdef uint64_t FAILURE_PENALTY_MAX_NS = 60000000000ULL


# --- availability and slow start --------------------------------------------------------------

cdef bint target_available(int slot, unsigned long long now) noexcept:
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return True
    if fg_load(t + T_HEALTHY) == 0 or fg_load(t + T_EJECTED_UNTIL) > now:
        return False
    cdef uint64_t circuit = fg_load(t + T_CIRCUIT)
    if circuit == CIRCUIT_OPEN:
        return fg_load(t + T_CB_OPEN_UNTIL) <= now      # time for trials: circuit_admit decides
    if circuit == CIRCUIT_HALF_OPEN:
        return fg_load(t + T_CB_TRIALS) < fg_load(t + T_CB_TRIAL_LIMIT) or _trials_stale(t, now)
    return True


cdef unsigned long long target_up_since(int slot, unsigned long long now) noexcept:
    """When the target last came back: turned healthy (active checks), ended an ejection, or
    was added. 0 when that was never (a target marked up at start is not "coming back")."""
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return 0
    cdef uint64_t since = fg_load(t + T_UP_SINCE), ejected_until = fg_load(t + T_EJECTED_UNTIL)
    if ejected_until <= now and ejected_until > since:
        return ejected_until
    return since


# --- latency EWMA -------------------------------------------------------------------------------

cdef void target_end(int slot, double seconds, bint failed) noexcept:
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return
    cdef uint64_t ns = target_count_end(t, seconds, failed)
    cdef uint64_t old, new
    cdef uint64_t sample = ns
    # EWMA with weight 1/8 (Finagle's and Envoy's peak-EWMA idea, without the decay clock yet):
    # a CAS loop because every worker updates the same word. A failure counts as a very slow
    # answer, so a target that fails fast does not look like the fastest one to p2c and nearest.
    old = fg_load(t + T_EWMA)
    while True:
        if failed:
            sample = ns if ns > FAILURE_PENALTY_NS else FAILURE_PENALTY_NS
            if sample < 4 * old:
                sample = 4 * old if old < FAILURE_PENALTY_MAX_NS / 4 else FAILURE_PENALTY_MAX_NS
        new = sample if old == 0 else <uint64_t>(<int64_t>old + (<int64_t>sample - <int64_t>old) / 8)
        if new == 0:
            new = 1
        if fg_cas(t + T_EWMA, &old, new):
            break


cdef unsigned long long target_ewma_ns(int slot) noexcept:
    cdef uint64_t* t = target_words(slot)
    return fg_load(t + T_EWMA) if t != NULL else 0


# --- circuit breaker: closed -> open -> half-open -> closed (or open again) ------------------
# Every worker counts into the same window and sees the same state. The small races between
# workers (a window reset losing a few counts, one trial too many) only blur the numbers a bit;
# the state word itself only ever changes by CAS.

cdef inline bint _trials_stale(uint64_t* t, uint64_t now) noexcept:
    """Half-open trials whose results never came (their clients went away): after another
    open_for, a new round of trials may start."""
    return now >= fg_load(t + T_CB_OPEN_UNTIL) + fg_load(t + T_CB_OPEN_NS)


cdef bint circuit_admit(int slot, unsigned long long now) noexcept:
    """May a request go to this target now? Closed: yes. Open: no until open_until, then the
    first caller turns it half-open. Half-open: the first `trial limit` requests."""
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return True
    cdef uint64_t state = fg_load(t + T_CIRCUIT)
    if state == CIRCUIT_CLOSED:
        return True
    if state == CIRCUIT_OPEN:
        if fg_load(t + T_CB_OPEN_UNTIL) > now:
            return False
        fg_cas(t + T_CIRCUIT, &state, CIRCUIT_HALF_OPEN)    # whoever wins, it is half-open now
    if fg_add(t + T_CB_TRIALS, 1) < fg_load(t + T_CB_TRIAL_LIMIT):
        return True
    if _trials_stale(t, now):
        fg_store(t + T_CB_OPEN_UNTIL, now)                  # a new round of trials from now
        fg_store(t + T_CB_TRIALS, 1)
        fg_store(t + T_CB_TRIAL_OK, 0)
        return True
    return False


cdef int circuit_record(int slot, unsigned long long now, bint failed, unsigned long long window_ns,
                        unsigned long long min_requests, double failure_ratio,
                        unsigned long long open_ns, unsigned long long trials) noexcept:
    """Count one result. Returns CIRCUIT_OPEN when this result opened the circuit,
    CIRCUIT_CLOSED when it closed it, -1 otherwise."""
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return -1
    cdef uint64_t state = fg_load(t + T_CIRCUIT), start, requests, failures
    if state == CIRCUIT_CLOSED:
        start = fg_load(t + T_CB_WINDOW)
        if now - start > window_ns and fg_cas(t + T_CB_WINDOW, &start, now):
            fg_store(t + T_CB_REQUESTS, 0)
            fg_store(t + T_CB_FAILURES, 0)
        requests = fg_add(t + T_CB_REQUESTS, 1) + 1
        failures = fg_add(t + T_CB_FAILURES, 1) + 1 if failed else fg_load(t + T_CB_FAILURES)
        if requests >= min_requests and failures >= failure_ratio * requests:
            _circuit_prepare_open(t, now, open_ns, trials)
            if fg_cas(t + T_CIRCUIT, &state, CIRCUIT_OPEN):
                return CIRCUIT_OPEN
    elif state == CIRCUIT_HALF_OPEN:
        if failed:
            _circuit_prepare_open(t, now, open_ns, trials)
            if fg_cas(t + T_CIRCUIT, &state, CIRCUIT_OPEN):
                return CIRCUIT_OPEN
        elif fg_add(t + T_CB_TRIAL_OK, 1) + 1 >= trials:
            fg_store(t + T_CB_WINDOW, now)
            fg_store(t + T_CB_REQUESTS, 0)
            fg_store(t + T_CB_FAILURES, 0)
            if fg_cas(t + T_CIRCUIT, &state, CIRCUIT_CLOSED):
                return CIRCUIT_CLOSED
    return -1                             # open: late answers of requests sent before it opened


cdef inline void _circuit_prepare_open(uint64_t* t, uint64_t now, uint64_t open_ns,
                                       uint64_t trials) noexcept:
    fg_store(t + T_CB_OPEN_UNTIL, now + open_ns)
    fg_store(t + T_CB_OPEN_NS, open_ns)
    fg_store(t + T_CB_TRIALS, 0)
    fg_store(t + T_CB_TRIAL_OK, 0)
    fg_store(t + T_CB_TRIAL_LIMIT, trials)


cdef bint circuit_is_open(int slot) noexcept:
    cdef uint64_t* t = target_words(slot)
    return t != NULL and fg_load(t + T_CIRCUIT) != CIRCUIT_CLOSED


# --- outlier ejection (passive health) ----------------------------------------------------------

cdef long long target_failure(int slot) noexcept:
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return -1
    return <long long>fg_add(t + T_CONSECUTIVE_FAILURES, 1) + 1


cdef void target_success(int slot) noexcept:
    cdef uint64_t* t = target_words(slot)
    if t != NULL and fg_load(t + T_CONSECUTIVE_FAILURES) != 0:
        fg_store(t + T_CONSECUTIVE_FAILURES, 0)     # read first: no shared-cache-line write per success


cdef bint target_eject(int slot, unsigned long long now, unsigned long long base_ns,
                       unsigned long long max_ns) noexcept:
    """Eject for base x (ejections so far + 1), at most max_ns (Envoy's outlier detection).
    Only one worker wins the CAS for one ejection; the others see it already ejected."""
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return False
    cdef uint64_t until = fg_load(t + T_EJECTED_UNTIL)
    cdef uint64_t length = base_ns * (fg_load(t + T_EJECTIONS) + 1)
    if until > now:
        return False
    if length > max_ns:
        length = max_ns
    if not fg_cas(t + T_EJECTED_UNTIL, &until, now + length):
        return False
    fg_add(t + T_EJECTIONS, 1)
    fg_store(t + T_CONSECUTIVE_FAILURES, 0)
    return True


# --- the decisions, callable from Python for tests (tests/test_model_health.py) -----------------

def _target_end(int slot, double seconds, bint failed):
    target_end(slot, seconds, failed)

def _circuit_admit(int slot, unsigned long long now):
    return circuit_admit(slot, now)

def _circuit_record(int slot, unsigned long long now, bint failed, unsigned long long window_ns,
                    unsigned long long min_requests, double failure_ratio,
                    unsigned long long open_ns, unsigned long long trials):
    return circuit_record(slot, now, failed, window_ns, min_requests, failure_ratio, open_ns,
                          trials)

def _target_available(int slot, unsigned long long now):
    return target_available(slot, now)

def _target_failure(int slot):
    return target_failure(slot)

def _target_success(int slot):
    target_success(slot)

def _target_eject(int slot, unsigned long long now, unsigned long long base_ns,
                  unsigned long long max_ns):
    return target_eject(slot, now, base_ns, max_ns)

def _target_words(int slot):
    """A target's health words as stored: (circuit, ejected_until, ejections,
    consecutive_failures, ewma_ns)."""
    cdef uint64_t* t = target_words(slot)
    if t == NULL:
        return None
    return (fg_load(t + T_CIRCUIT), fg_load(t + T_EJECTED_UNTIL), fg_load(t + T_EJECTIONS),
            fg_load(t + T_CONSECUTIVE_FAILURES), fg_load(t + T_EWMA))
