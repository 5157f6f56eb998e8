"""The balancing algorithms (fastgw/_core/balancer.pyx) against small pure-Python reference models,
statistically where they are random, and end to end through the gateway."""
from __future__ import annotations

import bisect
import collections
import http.client

import pytest

from fastgw._core import health, shm
from fastgw._core.balancer import (ALGORITHMS, NEAREST_PROBE_EVERY, VNODES_PER_WEIGHT, ConsistentHash,
                                   LeastConn, Nearest, P2CEwma, RoundRobin, Single, SmoothWeighted,
                                   WeightedRandom, ZonePreferring, hash_key, make_balancer)
from fastgw._core.upstream import Service
from upstreams import HOST, RecordingUpstream, describe_request, gateway_config, route


@pytest.fixture
def segment():
    seg = shm.Segment.create(workers=1, routes=2, targets=16, listeners=1, ratelimit_entries=1)
    seg.activate()
    yield seg
    seg.close()


def targets(*weights, slots=True):
    service = Service("s")
    return [service.add_target(f"10.0.0.{i}:80", w, i if slots else -1) for i, w in enumerate(weights)]


def names(picks):
    return [t.address.split(".")[-1].split(":")[0] for t in picks]


# --- reference models ------------------------------------------------------------------------------

def reference_smooth_weighted(weights, n):
    credit, out = [0] * len(weights), []
    for _ in range(n):
        credit = [c + w for c, w in zip(credit, weights)]
        best = max(range(len(weights)), key=lambda i: (credit[i], -i))
        credit[best] -= sum(weights)
        out.append(str(best))
    return out


def reference_ring(ts):
    points = sorted((hash_key(f"{t.address}#{v}".encode()), i)
                    for i, t in enumerate(ts) for v in range(VNODES_PER_WEIGHT * max(t.weight, 1)))
    hashes = [h for h, _ in points]

    def pick(key: bytes):
        i = bisect.bisect_left(hashes, hash_key(key))
        return ts[points[i % len(points)][1]]
    return pick


# --- deterministic algorithms --------------------------------------------------------------------

def test_round_robin_cycles():
    b = RoundRobin(targets(1, 1, 1))
    assert names(b.choose() for _ in range(7)) == ["1", "2", "0", "1", "2", "0", "1"]


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 1), (1, 1), (2, 3, 5, 7)])
def test_smooth_weighted_matches_reference_and_does_not_burst(weights):
    b = SmoothWeighted(targets(*weights))
    picks = names(b.choose() for _ in range(sum(weights) * 4))
    assert picks == reference_smooth_weighted(list(weights), sum(weights) * 4)
    if weights == (5, 1, 1):
        assert picks[:7] == ["0", "0", "1", "0", "2", "0", "0"]          # nginx's a a b a c a a


def test_least_conn_uses_the_shared_in_flight_counts(segment):
    ts = targets(1, 1, 1)
    b = LeastConn(ts)
    for _ in range(3):
        shm._target_begin(0)
    shm._target_begin(1)
    assert all(b.choose() is ts[2] for _ in range(5))
    shm._target_begin(2)
    shm._target_begin(2)
    assert all(b.choose() is ts[1] for _ in range(5))
    # Weighted: (active + 1) / weight.
    heavy = targets(1, 4)
    shm._target_begin(1)                   # the weight-4 target: (1+1)/4 < (3+1)/1 for slot 0
    assert LeastConn(heavy).choose() is heavy[1]


def test_consistent_hash_matches_reference_and_moves_few_keys():
    ts = targets(1, 1, 1, 1)
    b = ConsistentHash(ts)
    ref = reference_ring(ts)
    keys = [f"user-{i}".encode() for i in range(5000)]
    assert all(b.choose(k) is ref(k) for k in keys)
    # Adding a fifth target moves about 1/5 of the keys, and only onto the new target.
    grown = ts + [Service("s").add_target("10.0.0.4:80", 1, 4)]
    after = ConsistentHash(grown)
    moved = [k for k in keys if after.choose(k).address != b.choose(k).address]
    assert 0.12 < len(moved) / len(keys) < 0.28
    assert {after.choose(k).address for k in moved} == {"10.0.0.4:80"}
    # Spread: each of four targets within 25% of a quarter.
    counts = collections.Counter(b.choose(k).address for k in keys)
    assert all(abs(c - 1250) < 0.25 * 1250 for c in counts.values()), counts


def test_bounded_load_caps_a_hot_key(segment):
    ts = targets(1, 1, 1, 1)
    b = ConsistentHash(ts, bounded_load=1.25)
    # A skewed load: most requests carry the same key and stay in flight.
    held = collections.Counter()
    for i in range(200):
        key = b"hot" if i % 10 else f"k{i}".encode()
        t = b.choose(key)
        shm._target_begin(ts.index(t))
        held[t.address] += 1
        total = sum(held.values())
        cap = -(-1.25 * total // 4)                        # ceil(c x in flight / n)
        assert max(held.values()) <= cap + 1, held
    assert len(held) == 4                                  # the hot key spilled over the ring
    unbounded = ConsistentHash(ts)
    assert len({unbounded.choose(b"hot").address for _ in range(10)}) == 1


# --- random algorithms: statistics ---------------------------------------------------------------

def test_weighted_random_follows_weights():
    ts = targets(3, 1)
    b = WeightedRandom(ts)
    counts = collections.Counter(b.choose().address for _ in range(20000))
    assert abs(counts["10.0.0.0:80"] / 20000 - 0.75) < 0.02


def test_p2c_prefers_the_faster_and_less_busy_target(segment):
    ts = targets(1, 1, 1)
    for _ in range(50):
        shm._target_begin(0)
        health._target_end(0, 0.050, False)   # slow: 50 ms
        shm._target_begin(1)
        health._target_end(1, 0.002, False)   # fast: 2 ms
        shm._target_begin(2)
        health._target_end(2, 0.002, False)
    b = P2CEwma(ts)
    counts = collections.Counter(b.choose().address for _ in range(9000))
    # The slow target wins only the draws it is not in: never (two distinct targets per draw).
    assert counts["10.0.0.0:80"] == 0
    assert abs(counts["10.0.0.1:80"] - counts["10.0.0.2:80"]) < 900
    # Busy fast target: 30 in flight make it costlier than the slow idle one.
    for _ in range(30):
        shm._target_begin(1)
    counts = collections.Counter(b.choose().address for _ in range(9000))
    assert counts["10.0.0.1:80"] < counts["10.0.0.0:80"]


def test_p2c_gives_a_target_without_samples_its_share(segment):
    ts = targets(1, 1)
    shm._target_begin(0)
    health._target_end(0, 0.0003, False)      # measured, fast; target 1 never measured
    b = P2CEwma(ts)
    counts = collections.Counter(b.choose().address for _ in range(2000))
    assert counts["10.0.0.1:80"] > 500


def _measure(slot, seconds, times=20):
    for _ in range(times):
        shm._target_begin(slot)
        health._target_end(slot, seconds, False)


def test_nearest_takes_the_lowest_ewma_and_probes_the_others(segment):
    ts = targets(1, 1, 1)
    for slot, seconds in enumerate((0.040, 0.002, 0.015)):
        _measure(slot, seconds)
    b = Nearest(ts)
    counts = collections.Counter(b.choose().address for _ in range(3200))
    probes = 3200 // NEAREST_PROBE_EVERY                   # 100 probes spread over all three
    assert counts["10.0.0.1:80"] >= 3200 - probes
    assert counts["10.0.0.0:80"] + counts["10.0.0.2:80"] > probes / 3
    segment.target_set_healthy(1, False)                   # nearest down: the next nearest
    counts = collections.Counter(b.choose().address for _ in range(3200))
    assert counts["10.0.0.2:80"] >= 3200 - probes and counts["10.0.0.1:80"] == 0


def test_zone_preferring_spills_over_below_the_threshold(segment):
    ts = targets(1, 1, 1, 1)                              # 0, 1 in our zone; 2, 3 elsewhere
    b = ZonePreferring(RoundRobin(ts[:2]), RoundRobin(ts), 0.7)
    assert set(names(b.choose() for _ in range(100))) == {"0", "1"}
    segment.target_set_healthy(0, False)                   # 1 of 2 up: 50% < 70%
    assert set(names(b.choose() for _ in range(100))) == {"1", "2", "3"}
    segment.target_set_healthy(0, True)
    assert set(names(b.choose() for _ in range(100))) == {"0", "1"}
    everything_down = ZonePreferring(RoundRobin(ts[:2]), RoundRobin(ts), 0.0)
    segment.target_set_healthy(0, False)
    segment.target_set_healthy(1, False)                   # our zone empty: elsewhere, not None
    assert set(names(everything_down.choose() for _ in range(20))) == {"2", "3"}


def test_slow_start_gives_a_new_target_a_small_share_first(segment):
    ts = targets(1, 1)
    segment.target_added(1)                                # just added: ramp starts at 10%
    for algorithm in (RoundRobin(ts, 30.0), WeightedRandom(ts, 30.0), SmoothWeighted(ts, 30.0),
                      LeastConn(ts, 30.0)):
        counts = collections.Counter(algorithm.choose().address for _ in range(4000))
        assert 0.04 < counts["10.0.0.1:80"] / 4000 < 0.16, (type(algorithm).__name__, counts)
    plain = RoundRobin(ts)                                 # without slow start: its half at once
    assert collections.Counter(plain.choose().address for _ in range(100)) == {
        "10.0.0.0:80": 50, "10.0.0.1:80": 50}
    segment.target_set_healthy(0, False)                   # the only one up is ramping: still used
    ramping = RoundRobin(ts, 30.0)
    assert {ramping.choose().address for _ in range(50)} == {"10.0.0.1:80"}


# --- one target; a retry's pick (exclude) ---------------------------------------------------------

ALGORITHM_CLASSES = {"round_robin": RoundRobin, "weighted_round_robin": SmoothWeighted,
                     "least_conn": LeastConn, "p2c_ewma": P2CEwma, "random": WeightedRandom,
                     "nearest": Nearest}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_target_gets_the_balancer_that_answers_what_every_algorithm_would(segment, algorithm):
    [t] = targets(1)
    b = make_balancer(algorithm, [t], 0.0, 30.0)
    full = ConsistentHash([t]) if algorithm == "consistent_hash" else ALGORITHM_CLASSES[algorithm]([t], 30.0)
    assert type(b) is Single
    segment.target_added(0)                                # in slow start: still the one to use
    assert b.choose() is t and b.choose(b"key") is t and full.choose(b"key") is t
    segment.target_set_healthy(0, False)
    assert b.choose() is None and full.choose(b"key") is None
    segment.target_set_healthy(0, True)
    assert b.choose(None, t) is None and b.choose(None, (t,)) is None   # a retry: no other one


def test_a_retry_never_gets_the_target_it_excludes(segment):
    ts = targets(1, 1, 1)
    for b in (RoundRobin(ts), SmoothWeighted(ts), LeastConn(ts), P2CEwma(ts), WeightedRandom(ts),
              Nearest(ts), ConsistentHash(ts), ZonePreferring(RoundRobin(ts[:1]), RoundRobin(ts), 0.5)):
        picks = [b.choose(b"k", ts[0]) for _ in range(60)]
        assert ts[0] not in picks and None not in picks, type(b).__name__
        assert {b.choose(b"k", (ts[0], ts[1])) for _ in range(20)} == {ts[2]}, type(b).__name__
    segment.target_set_healthy(2, False)                   # the only one not excluded is down
    assert RoundRobin(ts).choose(None, (ts[0], ts[1])) is None
    assert {RoundRobin(ts).choose(None, ts[0]) for _ in range(10)} == {ts[1]}


# --- through the gateway ---------------------------------------------------------------------------

def _run(gw, n, headers=None, conns=4):
    pool = [http.client.HTTPConnection(HOST, gw.port, timeout=10) for _ in range(conns)]
    servers = collections.Counter()
    for i in range(n):
        c = pool[i % conns]
        c.request("GET", f"/x/{i}", headers=(headers(i) if headers else {}))
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, body[:200]
        servers[__import__("json").loads(body)["server"]] += 1
    for c in pool:
        c.close()
    return servers


def _named(start_upstream, *names_):
    return [start_upstream(RecordingUpstream(name=n, handler=lambda req, n=n: describe_request(req, n)))
            for n in names_]


@pytest.mark.slow
def test_weights_three_to_one_through_the_gateway(gateway, start_upstream):
    a, b = _named(start_upstream, "a", "b")
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{a.port}", "weight": 3},
                                                {"address": f"{HOST}:{b.port}", "weight": 1}],
                                    "balance": {"algorithm": "weighted_round_robin"}}},
                            [route("all", ["/**"], "up")])
    gw = gateway(config)
    servers = _run(gw, 20000)
    assert abs(servers["a"] / 20000 - 0.75) <= 0.03, servers


def test_consistent_hash_on_a_header_through_the_gateway(gateway, start_upstream):
    ups = _named(start_upstream, "a", "b", "c")
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{u.port}"} for u in ups],
                                    "balance": {"algorithm": "consistent_hash",
                                                "hash_on": "header:X-User-Id"}}},
                            [route("all", ["/**"], "up")])
    config["workers"] = 2
    gw = gateway(config)
    first = {}
    for i in range(300):
        user = f"user-{i % 30}"
        server = _run(gw, 1, headers=lambda _: {"X-User-Id": user}, conns=1)
        (name,) = server
        assert first.setdefault(user, name) == name      # the same user, the same target, any worker
    assert len(set(first.values())) == 3
