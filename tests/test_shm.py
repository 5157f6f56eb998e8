"""The shared-memory segment: real processes hammering the same words through the data plane's
own recorders (fastgw/_core/shm.pyx), and the totals must be exact. The expected values come from
replaying the workers' sequence in a small Python model of the layout."""
from __future__ import annotations

import bisect
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest

from fastgw._core import health, shm
from fastgw._core.shm import BUCKETS, CODE_LABELS, METHOD_NAMES, Segment

N = 20_000
PROCESSES = 4
# Sequences the workers cycle through; lengths are coprime so every combination occurs.
METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"BREW")
STATUSES = (200, 404, 299, 777, 503, 101, 0)
SECONDS = (0.0003, 0.002, 0.007, 0.3, 1.7, 12.0, 45.0, 0.04, 0.0009, -1.0, 0.00055)

WORKER = f"""
import sys
from fastgw._core import health, shm
METHODS, STATUSES, SECONDS = {METHODS!r}, {STATUSES!r}, {SECONDS!r}
seg = shm.Segment.attach(int(sys.argv[1]))
seg.activate(int(sys.argv[2]))
n = int(sys.argv[3])
for i in range(n):
    shm._listener_admit(0, 1 << 40)
    shm._record_request(1 + i % 3, METHODS[i % 8], STATUSES[i % 7], SECONDS[i % 11])
    shm._target_begin(5 + i % 2)
    health._target_end(5 + i % 2, SECONDS[i % 11], i % 10 == 0)
    shm._listener_closed(0)
    shm._listener_opened(1)
    if i % 7 == 0:
        shm._listener_rejected(1)
    if i != n - 1:                     # one connection per process stays open on listener 1
        shm._listener_closed(1)
shm._listener_admit(0, 1 << 40)       # and one on listener 0
"""


def code_label(status: int) -> str:
    if str(status) in CODE_LABELS:
        return str(status)
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"


def method_name(method: bytes) -> str:
    name = method.decode()
    return name if name in METHOD_NAMES else "OTHER"


def ns(seconds: float) -> int:
    return int(seconds * 1e9) if seconds > 0 else 0


def bucket(seconds_ns: int) -> int:
    """Prometheus `le` is inclusive: the first bound >= the value, in whole nanoseconds."""
    return bisect.bisect_left([round(b * 1e9) for b in BUCKETS], seconds_ns)


class Histogram:
    def __init__(self):
        self.buckets, self.sum_ns, self.count = [0] * 16, 0, 0

    def observe(self, seconds: float):
        self.buckets[bucket(ns(seconds))] += 1
        self.sum_ns += ns(seconds)
        self.count += 1

    def as_read(self):
        return self.buckets, self.sum_ns / 1e9, self.count


def model(n: int):
    """What one worker's loop records: requests per (route, method, code), histograms per route
    and target, target requests/failures."""
    requests, routes, targets = Counter(), {}, {}
    failures, totals = Counter(), Counter()
    for i in range(n):
        route, method, status, s = 1 + i % 3, METHODS[i % 8], STATUSES[i % 7], SECONDS[i % 11]
        requests[(route, method_name(method), code_label(status))] += 1
        routes.setdefault(route, Histogram()).observe(s)
        target = 5 + i % 2
        totals[target] += 1
        if i % 10 == 0:
            failures[target] += 1
        else:
            targets.setdefault(target, Histogram()).observe(s)
    return requests, routes, targets, totals, failures


@pytest.fixture
def segment():
    seg = Segment.create(workers=4, routes=8, targets=8, listeners=2, ratelimit_entries=16)
    yield seg
    seg.close()


def test_four_processes_add_up_exactly(segment):
    seg = segment
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(seg.fd), str(i), str(N)],
                              pass_fds=[seg.fd]) for i in range(PROCESSES)]
    assert [p.wait(120) for p in procs] == [0] * PROCESSES
    requests, routes, targets, totals, failures = model(N)

    counted = {(slot, m, c): n for slot in range(8) for m, c, n in seg.route_requests(slot)}
    assert counted == {key: PROCESSES * n for key, n in requests.items()}
    assert sum(counted.values()) == PROCESSES * N
    assert counted[(3, "OTHER", "2xx")] > 0 and counted[(2, "POST", "5xx")] > 0   # BREW/299, 777
    for slot, h in routes.items():
        buckets, seconds, count = seg.route_duration(slot)
        assert buckets == [PROCESSES * b for b in h.buckets]
        assert count == sum(buckets) == PROCESSES * h.count
        assert seconds == PROCESSES * h.sum_ns / 1e9
        assert buckets[-1] > 0 and buckets[0] > 0       # 45 s lands in +Inf; -1 s and 0.3 ms in 0.5 ms

    for slot in (5, 6):
        t = seg.target_stats(slot)
        assert t["requests"] == PROCESSES * totals[slot]
        assert t["failures"] == PROCESSES * failures[slot]
        assert t["active"] == 0
        buckets, seconds, count = t["duration"]
        h = targets[slot]
        assert buckets == [PROCESSES * b for b in h.buckets]
        assert count == PROCESSES * h.count == t["requests"] - t["failures"]
        assert seconds == PROCESSES * h.sum_ns / 1e9
        assert t["ewma_ms"] > 0
    assert seg.target_stats(4)["requests"] == 0

    assert seg.listener_stats(0) == {"open": PROCESSES, "accepted": PROCESSES * (N + 1), "rejected": 0}
    rejected = PROCESSES * len(range(0, N, 7))
    assert seg.listener_stats(1) == {"open": PROCESSES, "accepted": PROCESSES * N, "rejected": rejected}
    # listener_admit's limit holds across processes: 4 open, a limit of 5 admits exactly one more.
    seg.activate()
    assert [shm._listener_admit(0, 5) for _ in range(3)] == [1, 0, 0]
    assert seg.listener_stats(0) == {"open": 5, "accepted": PROCESSES * (N + 1) + 1, "rejected": 2}


def test_out_of_range_slots_are_ignored():
    seg = Segment.create(workers=1, routes=2, targets=1, listeners=1, ratelimit_entries=1)
    shm._record_request(0, b"GET", 200, 0.1)            # no active segment: nothing is written
    shm._target_begin(0)
    shm._listener_opened(0)
    seg.activate()
    for slot in (-1, 2, 1 << 30):
        shm._record_request(slot, b"GET", 200, 0.1)
        shm._listener_opened(slot)
        shm._listener_rejected(slot)
        shm._listener_closed(slot)
    for slot in (-1, 1, 7):
        shm._target_begin(slot)
        health._target_end(slot, 0.1, False)
        assert shm._target_draining(slot) is False
    assert shm._listener_admit(3, 10) == -1
    assert seg.route_requests(0) == [] and seg.route_requests(1) == []
    assert seg.route_duration(0) == ([0] * 16, 0.0, 0)
    assert seg.listener_stats(0) == {"open": 0, "accepted": 0, "rejected": 0}
    t = seg.target_stats(0)
    assert (t["requests"], t["active"], t["healthy"], t["circuit"]) == (0, 0, True, "closed")
    # Python-side readers check their slots instead.
    with pytest.raises(IndexError):
        seg.route_requests(2)
    with pytest.raises(IndexError):
        seg.target_stats(1)
    with pytest.raises(IndexError):
        seg.worker_heartbeat(1)
    seg.close()
    shm._record_request(1, b"GET", 200, 0.1)            # closed and no longer active
    with pytest.raises(ValueError, match="closed"):
        seg.route_requests(0)


def test_odd_durations_and_statuses():
    seg = Segment.create(workers=1, routes=1, targets=1, listeners=1, ratelimit_entries=1)
    seg.activate()
    for seconds in (float("nan"), float("-inf"), -5.0, 0.0):
        shm._record_request(0, b"GET", 200, seconds)
    shm._record_request(0, b"GET", 200, float("inf"))
    shm._record_request(0, b"GET", 200, 0.0005)                   # exactly on a bound: le is inclusive
    for status in (-1, 99, 600, 1000, 599, 150, 418):
        shm._record_request(0, b"get", status, 0.0)             # methods are case-sensitive: OTHER
    buckets, seconds, count = seg.route_duration(0)
    assert count == 13 and buckets[0] == 12 and buckets[-1] == 1
    assert seconds == pytest.approx(1e9 + 0.0005)                  # +inf is clamped, not UB
    assert sorted(seg.route_requests(0)) == [("GET", "200", 6), ("OTHER", "1xx", 1),
                                             ("OTHER", "4xx", 1), ("OTHER", "5xx", 5)]
    seg.close()


def test_target_flags_and_reset():
    seg = Segment.create(workers=1, routes=1, targets=2, listeners=1, ratelimit_entries=1)
    seg.activate()
    seg.target_set_draining(1, True)
    assert shm._target_draining(1) is True and shm._target_draining(0) is False
    seg.target_set_healthy(1, False)
    t = seg.target_stats(1)
    assert (t["healthy"], t["draining"], t["ejected"]) == (False, True, False)
    for _ in range(3):
        shm._target_begin(1)
    health._target_end(1, 0.01, False)
    health._target_end(1, 0.01, True)
    seg.target_reset(1)
    t = seg.target_stats(1)
    assert (t["healthy"], t["draining"], t["requests"], t["failures"], t["ewma_ms"]) == (True, False, 0, 0, 0)
    assert t["duration"] == ([0] * 16, 0.0, 0)
    assert t["active"] == 1                     # still in flight; its target_end brings it to 0
    health._target_end(1, 0.01, False)
    assert seg.target_stats(1)["active"] == 0
    seg.close()


def test_worker_slots_and_header():
    before = time.time()
    seg = Segment.create(workers=3, routes=1, targets=1, listeners=1)
    assert seg.workers() == []
    assert seg.capacity == {"workers": 3, "routes": 1, "targets": 1, "listeners": 1, "ratelimit": 65536,
                            "analytics": 1024}
    assert seg.size % 64 == 0 and seg.size == os.fstat(seg.fd).st_size
    seg.worker_set(1, pid=1234, config_version=3, state=1, generation=0)
    [w] = seg.workers()
    started = w["started_unix"]
    assert before <= started <= time.time() + 1

    time.sleep(0.02)
    seg.worker_set(1, pid=1234, config_version=3, state=2)          # same pid: same start, same generation
    seg.worker_applied(1, 4)
    seg.config_version = 7
    other = Segment.attach(seg.fd)                                   # what a worker sees
    [w] = other.workers()
    assert (w["index"], w["pid"], w["config_version"], w["generation"], w["state"]) == (1, 1234, 4, 0, 2)
    assert w["started_unix"] == started
    assert 0.015 <= w["heartbeat_age_s"] < 5
    other.worker_heartbeat(1)
    assert seg.workers()[0]["heartbeat_age_s"] < 0.015
    assert other.config_version == 7 and other.capacity == seg.capacity and other.size == seg.size

    seg.worker_set(1, pid=5678, config_version=7, state=1, generation=1)     # restarted
    [w] = seg.workers()
    assert (w["pid"], w["generation"]) == (5678, 1) and w["started_unix"] > started
    seg.worker_set(0, pid=99, config_version=7, state=3)
    assert [w["index"] for w in seg.workers()] == [0, 1]
    seg.worker_set(1, pid=0, config_version=0, state=0)                       # slot emptied
    assert [w["index"] for w in seg.workers()] == [0]
    other.close()
    seg.close()


def _copy(seg: Segment, patch=None, extra: bytes = b"") -> tempfile.TemporaryFile:
    data = bytearray(os.pread(seg.fd, seg.size, 0))
    if patch:
        word, value = patch
        data[word * 8:word * 8 + 8] = value.to_bytes(8, "little")
    f = tempfile.TemporaryFile()
    f.write(bytes(data) + extra)
    f.flush()
    return f


def test_attach_rejects_what_is_not_a_segment():
    seg = Segment.create(workers=1, routes=1, targets=1, listeners=1, ratelimit_entries=1)
    with _copy(seg) as f:                                      # an exact copy is a valid segment
        Segment.attach(f.fileno()).close()
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 4096)
        f.flush()
        with pytest.raises(ValueError, match="not a fastgw shared-memory segment"):
            Segment.attach(f.fileno())
    with _copy(seg, extra=b"\0" * 4096) as f:
        with pytest.raises(ValueError, match="header says"):
            Segment.attach(f.fileno())
    with _copy(seg, patch=(1, 3)) as f:                        # layout version
        with pytest.raises(ValueError, match="layout version 3"):
            Segment.attach(f.fileno())
    with _copy(seg, patch=(4, 1 << 20)) as f:                  # routes capacity beyond the size
        with pytest.raises(ValueError, match="inconsistent layout"):
            Segment.attach(f.fileno())
    r, w = os.pipe()
    try:
        with pytest.raises((ValueError, OSError)):
            Segment.attach(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(ValueError, match="at least 1"):
        Segment.create(workers=0, routes=1, targets=1, listeners=1)
    seg.close()


def test_constants():
    assert len(CODE_LABELS) == len(set(CODE_LABELS)) == 42
    assert CODE_LABELS[-5:] == ("1xx", "2xx", "3xx", "4xx", "5xx")
    assert METHOD_NAMES == ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER")
    assert BUCKETS == (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                       5.0, 10.0, 30.0)
