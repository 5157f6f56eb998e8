"""The circuit breaker, outlier ejection and latency EWMA of health.pyx against Python models of the
rules README "Health" and "Circuit breaker" state, on generated sequences of results, with the
clock given to the compiled code (its test entry points take `now`); and the service-level rules
(consecutive failures, max_ejected_percent) through Target.call_finished, the data plane's own
entry point for a result."""
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastgw._core import health, shm
from fastgw._core.shm import Segment
from fastgw._core.upstream import Service

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
NO_CHANGE = -1
TARGETS = 4
START = 10**15                      # a monotonic clock some days after boot, in ns
MS = 1_000_000


@pytest.fixture(scope="module")
def segment():
    seg = Segment.create(workers=1, routes=1, targets=TARGETS, listeners=1, ratelimit_entries=1)
    seg.activate()
    yield seg
    seg.close()


def fresh(segment, slot):
    segment.target_reset(slot)
    return slot


# --- circuit breaker ---------------------------------------------------------------------------

class Circuit:
    """Closed: results count in a window that starts anew at the first result more than `window`
    after the last start; once it holds at least `min_requests` results of which at least
    `failure_ratio` failed, the circuit opens. Open: no request until `open_for` is over (late
    results of requests sent before are ignored); the first request after that makes it
    half-open. Half-open: `trials` requests go through; that many successes close it (with a new
    window), one failure opens it again. Trials whose results never come free a new round once
    another `open_for` has passed."""

    def __init__(self, window, min_requests, ratio, open_for, trials):
        self.window, self.min_requests, self.ratio = window, min_requests, ratio
        self.open_for, self.trials = open_for, trials
        self.state = CLOSED
        self.window_start = self.requests = self.failures = 0
        self.open_until = self.trials_sent = self.trials_ok = 0
        self.trial_limit = self.open_length = 0

    def _open(self, now):
        self.state = OPEN
        self.open_until, self.open_length = now + self.open_for, self.open_for
        self.trials_sent = self.trials_ok = 0
        self.trial_limit = self.trials
        return OPEN

    def _trials_stale(self, now):
        return now >= self.open_until + self.open_length

    def admit(self, now):
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.open_until > now:
                return False
            self.state = HALF_OPEN
        self.trials_sent += 1
        if self.trials_sent <= self.trial_limit:
            return True
        if self._trials_stale(now):
            self.open_until, self.trials_sent, self.trials_ok = now, 1, 0
            return True
        return False

    def record(self, now, failed):
        if self.state == CLOSED:
            if now - self.window_start > self.window:
                self.window_start, self.requests, self.failures = now, 0, 0
            self.requests += 1
            self.failures += failed
            if self.requests >= self.min_requests and self.failures >= self.ratio * self.requests:
                return self._open(now)
        elif self.state == HALF_OPEN:
            if failed:
                return self._open(now)
            self.trials_ok += 1
            if self.trials_ok >= self.trials:
                self.state = CLOSED
                self.window_start, self.requests, self.failures = now, 0, 0
                return CLOSED
        return NO_CHANGE

    def available(self, now):
        if self.state == OPEN:
            return self.open_until <= now
        if self.state == HALF_OPEN:
            return self.trials_sent < self.trial_limit or self._trials_stale(now)
        return True


CIRCUITS = st.tuples(st.sampled_from([10 * MS, 1000 * MS]), st.integers(1, 6),
                     st.sampled_from([0.0, 0.25, 0.5, 0.6, 1.0]),
                     st.sampled_from([5 * MS, 50 * MS]), st.integers(1, 3))
CIRCUIT_STEPS = st.lists(st.tuples(
    st.sampled_from(["admit", "success", "failure"]),
    st.one_of(st.integers(0, 3 * MS), st.sampled_from([5 * MS, 10 * MS, 10 * MS + 1, 50 * MS, 2000 * MS]))),
    max_size=60)


@settings(max_examples=400, deadline=None)
@given(params=CIRCUITS, steps=CIRCUIT_STEPS)
@example(params=(10 * MS, 2, 0.5, 5 * MS, 2),
         steps=[("failure", 0), ("failure", 1), ("admit", 5 * MS), ("admit", 0), ("admit", 0),
                ("success", 0), ("success", 0), ("admit", 0)])
@example(params=(10 * MS, 2, 0.5, 5 * MS, 1), steps=[("failure", 0), ("failure", 10 * MS)])
def test_circuit_breaker_matches_the_model(segment, params, steps):
    window, min_requests, ratio, open_for, trials = params
    slot = fresh(segment, 0)
    model = Circuit(window, min_requests, ratio, open_for, trials)
    now = START
    for action, advance in steps:
        now += advance
        if action == "admit":
            assert health._circuit_admit(slot, now) == model.admit(now), (action, now)
        else:
            failed = action == "failure"
            change = health._circuit_record(slot, now, failed, window, min_requests, ratio, open_for, trials)
            assert change == model.record(now, failed), (action, now)
        assert health._target_words(slot)[0] == model.state
        assert health._target_available(slot, now) == model.available(now)


# --- outlier ejection: the shared-memory words -------------------------------------------------

class Ejection:
    """A failure adds to the streak, a success ends it; an ejection (refused while one is still
    running) lasts base x (earlier ejections + 1), at most max, and ends the streak."""

    def __init__(self):
        self.streak = self.ejections = self.until = 0

    def failure(self):
        self.streak += 1
        return self.streak

    def success(self):
        self.streak = 0

    def eject(self, now, base, longest):
        if self.until > now:
            return False
        self.until = now + min(base * (self.ejections + 1), longest)
        self.ejections += 1
        self.streak = 0
        return True


@settings(max_examples=300, deadline=None)
@given(threshold=st.integers(1, 4), base=st.sampled_from([1 * MS, 30 * MS]),
       steps=st.lists(st.tuples(st.booleans(), st.sampled_from([0, 1, MS, 30 * MS, 300 * MS, 10**12])),
                      max_size=80))
@example(threshold=1, base=MS, steps=[(True, 10**12)] * 12)          # up to the 10 x cap
def test_ejection_words_match_the_model(segment, threshold, base, steps):
    """Results fed as Service.record_result feeds them (a streak of `threshold` failures asks
    for an ejection of at most 10 x base)."""
    slot = fresh(segment, 1)
    model = Ejection()
    now = START
    for failed, advance in steps:
        now += advance
        if failed:
            streak = health._target_failure(slot)
            assert streak == model.failure()
            if streak >= threshold:
                assert health._target_eject(slot, now, base, 10 * base) == model.eject(now, base, 10 * base)
        else:
            health._target_success(slot)
            model.success()
        _, until, ejections, streak, _ = health._target_words(slot)
        assert (until, ejections, streak) == (model.until, model.ejections, model.streak)
        assert health._target_available(slot, now) == (model.until <= now)


# --- outlier ejection: the service's rules, through the data plane's entry point ---------------

@settings(max_examples=150, deadline=None)
@given(threshold=st.integers(1, 3), max_percent=st.sampled_from([0, 25, 50, 75, 100]),
       results=st.lists(st.tuples(st.integers(0, TARGETS - 1), st.booleans()), max_size=40))
def test_service_ejects_after_a_streak_within_max_ejected_percent(segment, threshold, max_percent,
                                                                  results):
    """No ejection ends during the test (ejection_time 1000 s), so the model needs no clock: a
    streak of `threshold` failures ejects the target unless that would put more than
    max_ejected_percent of the service's targets out at once (then the streak goes on, and the
    next failure asks again)."""
    service = Service("s")
    service.passive_failures, service.ejection_time = threshold, 1000.0
    service.max_ejected_percent = max_percent
    targets = [service.add_target(f"127.0.0.1:{9000 + i}", metric_slot=fresh(segment, i))
               for i in range(TARGETS)]
    streak, ejected = [0] * TARGETS, [False] * TARGETS
    length = 1000 * 10**9
    for index, failed in results:
        before = time.monotonic_ns()
        targets[index].call_finished(0.001, failed)
        after = time.monotonic_ns()
        ejects = False
        if not failed:
            streak[index] = 0
        else:
            streak[index] += 1          # late results of an ejected target count too
            ejects = streak[index] >= threshold and not ejected[index] and \
                (sum(ejected) + 1) * 100 <= max_percent * TARGETS
        if ejects:
            ejected[index], streak[index] = True, 0
        for i in range(TARGETS):
            _, until, ejections, words_streak, _ = health._target_words(i)
            assert (ejections, words_streak) == (int(ejected[i]), streak[i]), (i, index, failed)
        if ejects:
            assert before + length <= health._target_words(index)[1] <= after + length


# --- latency EWMA -----------------------------------------------------------------------------

PENALTY, PENALTY_MAX = 250 * MS, 60 * 10**9


def ewma_step(old, seconds, failed):
    """Weight 1/8; a failure counts as at least 250 ms and 4 x the average (at most 60 s)."""
    sample = int(seconds * 1e9) if seconds > 0 else 0
    if failed:
        sample = max(sample, PENALTY)
        if sample < 4 * old:
            sample = 4 * old if old < PENALTY_MAX // 4 else PENALTY_MAX
    if old == 0:
        new = sample
    else:
        delta = sample - old
        new = old + (abs(delta) // 8) * (1 if delta >= 0 else -1)     # C division truncates
    return new or 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.floats(0, 100), st.sampled_from([0.0, -1.0, 1e-9, 20.0])),
                          st.booleans()), max_size=40))
def test_latency_ewma_matches_the_model(segment, results):
    slot = fresh(segment, 2)
    expected = 0
    for seconds, failed in results:
        shm._target_begin(slot)
        health._target_end(slot, seconds, failed)
        expected = ewma_step(expected, seconds, failed)
        assert health._target_words(slot)[4] == expected


def test_ewma_first_sample_then_converges():
    seg = Segment.create(workers=1, routes=1, targets=2, listeners=1, ratelimit_entries=1)
    seg.activate()
    assert seg.target_stats(0)["ewma_ms"] == 0
    shm._target_begin(0)
    health._target_end(0, 0.100, False)
    assert seg.target_stats(0)["ewma_ms"] == pytest.approx(100.0)        # the first sample sets it
    shm._target_begin(0)
    health._target_end(0, 0.001, True)      # a fast failure counts as max(250 ms, 4 x EWMA) = 400 ms
    assert seg.target_stats(0)["ewma_ms"] == pytest.approx(100 + (400 - 100) / 8, rel=1e-6)
    shm._target_begin(0)
    health._target_end(0, 0.004, False)
    assert seg.target_stats(0)["ewma_ms"] == pytest.approx(137.5 + (4 - 137.5) / 8, rel=1e-6)
    for _ in range(100):
        shm._target_begin(0)
        health._target_end(0, 0.004, False)
    assert seg.target_stats(0)["ewma_ms"] == pytest.approx(4.0, rel=1e-3)
    assert seg.target_stats(1)["ewma_ms"] == 0
    seg.close()
