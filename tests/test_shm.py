"""The shared-memory segment: real processes hammering the same words through the data plane's
own recorders (fastgw/_core/shm.pyx), and the totals must be exact."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from fastgw._core.shm import BUCKETS, CODE_LABELS, Segment

WORKER = """
import sys
from fastgw._core import shm
seg = shm.Segment.attach(int(sys.argv[1]))
seg.activate(int(sys.argv[2]))
n = int(sys.argv[3])
for i in range(n):
    shm._listener_admit(0, 1 << 40)
    shm._record_request(1 + i % 3, (b"GET", b"POST", b"BREW")[i % 3], (200, 404, 299, 777)[i % 4], 0.002)
    shm._target_begin(5)
    shm._target_end(5, 0.004, i % 10 == 0)
    shm._listener_closed(0)
shm._listener_admit(0, 1 << 40)           # one connection per process stays open
"""


def test_four_processes_add_up_exactly():
    seg = Segment.create(workers=4, routes=8, targets=8, listeners=2, ratelimit_entries=16)
    n = 24000                           # a multiple of 12 and 10: every combination equally often
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(seg.fd), str(i), str(n)],
                              pass_fds=[seg.fd]) for i in range(4)]
    assert [p.wait(120) for p in procs] == [0] * 4
    total = 4 * n
    counted = {}
    for slot in (1, 2, 3):
        for method, code, count in seg.route_requests(slot):
            counted[(slot, method, code)] = counted.get((slot, method, code), 0) + count
    assert sum(counted.values()) == total
    # i % 3 picks route and method together, i % 4 the status: 12 combinations, equally often.
    assert counted[(1, "GET", "200")] == total // 12
    assert counted[(3, "OTHER", "2xx")] == total // 12          # BREW, 299 -> class bucket
    assert counted[(2, "POST", "5xx")] == total // 12           # 777 is not a status: 5xx
    buckets, seconds, count = seg.route_duration(1)
    assert count == sum(buckets) == total // 3
    assert buckets[BUCKETS.index(0.0025)] == count               # 2 ms lands in le=0.0025
    assert seconds == pytest.approx(0.002 * count)
    t = seg.target_stats(5)
    assert t["requests"] == total and t["failures"] == total // 10 and t["active"] == 0
    assert t["duration"][2] == total - total // 10
    assert t["ewma_ms"] == pytest.approx(4.0, rel=0.01)
    assert seg.listener_stats(0) == {"open": 4, "accepted": total + 4, "rejected": 0}
    # The limit holds across processes: 4 open, a limit of 5 admits exactly one more.
    seg.activate()
    from fastgw._core import shm
    assert [shm._listener_admit(0, 5) for _ in range(3)] == [1, 0, 0]
    assert seg.listener_stats(0) == {"open": 5, "accepted": total + 5, "rejected": 2}
    assert sorted(w["requests"] for w in seg.workers()) == []    # no worker_set: slots empty
    seg.close()


def test_out_of_range_slots_are_ignored_and_python_access_checks():
    seg = Segment.create(workers=1, routes=2, targets=1, listeners=1, ratelimit_entries=1)
    seg.activate()
    from fastgw._core import shm
    shm._record_request(-1, b"GET", 200, 0.1)
    shm._record_request(2, b"GET", 200, 0.1)
    shm._target_begin(7)
    assert shm._listener_admit(3, 10) == -1
    assert seg.route_requests(0) == [] and seg.route_requests(1) == []
    with pytest.raises(IndexError):
        seg.route_requests(2)
    with pytest.raises(IndexError):
        seg.target_stats(1)
    assert seg.target_stats(0)["healthy"] is True and seg.target_stats(0)["circuit"] == "closed"
    seg.close()
    shm._record_request(1, b"GET", 200, 0.1)            # closed and inactive: nothing to write


def test_worker_slots_and_header():
    seg = Segment.create(workers=2, routes=1, targets=1, listeners=1)
    assert seg.workers() == []
    seg.worker_set(1, pid=1234, config_version=3, state=2, generation=1)
    seg.worker_heartbeat(1)
    seg.config_version = 7
    other = Segment.attach(seg.fd)
    [w] = other.workers()
    assert (w["index"], w["pid"], w["config_version"], w["generation"], w["state"]) == (1, 1234, 3, 1, 2)
    assert 0 <= w["heartbeat_age_s"] < 1
    assert other.config_version == 7 and other.capacity["workers"] == 2
    other.close()
    seg.close()


def test_attach_rejects_what_is_not_a_segment():
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 4096)
        f.flush()
        with pytest.raises(ValueError, match="not a fastgw shared-memory segment"):
            Segment.attach(f.fileno())
    r, w = os.pipe()
    try:
        with pytest.raises((ValueError, OSError)):
            Segment.attach(r)
    finally:
        os.close(r)
        os.close(w)


def test_code_labels_cover_every_status():
    assert len(CODE_LABELS) == len(set(CODE_LABELS))
    assert CODE_LABELS[-5:] == ("1xx", "2xx", "3xx", "4xx", "5xx")
