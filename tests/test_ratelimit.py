"""Rate limiting: the algorithms over the shared-memory table (in process), and through the gateway
with several workers — a limit holds for the host, not per worker."""
from __future__ import annotations

import collections
import concurrent.futures
import http.client
import threading
import time

import pytest

from fastgw._core import shm
from fastgw._core.ratelimit import Policy
from fastgw.plugins.credentials import hash_key
from upstreams import HOST, RecordingUpstream, describe_request, free_port, gateway_config, route, wait_for


# --- the algorithms, in process ------------------------------------------------------------------

@pytest.fixture
def small_table():
    seg = shm.Segment.create(workers=1, routes=1, targets=1, listeners=1, ratelimit_entries=64)
    seg.activate()
    yield seg
    seg.close()


def test_algorithms_admit_their_limit(small_table):
    gcra = Policy("gcra", 5, 1.0)
    assert [gcra.check(b"k")[0] for _ in range(7)] == [True] * 5 + [False] * 2
    admitted, remaining, reset, retry_after = gcra.check(b"k")
    assert not admitted and 0.15 < retry_after <= 0.2 and remaining == 0
    bursty = Policy("gcra", 10, 1.0, burst=2)                 # 10/s, at most 2 at once
    assert [bursty.check(b"b")[0] for _ in range(3)] == [True, True, False]
    fixed = Policy("fixed_window", 3, 60.0)
    assert [fixed.check(b"f")[:2] for _ in range(4)] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    sliding = Policy("sliding_window", 4, 60.0)
    assert sum(sliding.check(b"s")[0] for _ in range(10)) == 4
    conc = Policy("concurrency", 2, 1.0)
    assert [conc.check(b"c")[0] for _ in range(3)] == [True, True, False]
    conc.done(b"c")
    assert conc.check(b"c")[0] is True
    assert Policy("gcra", 5, 1.0).check(b"other")[0] is True    # another key, another bucket


def test_sliding_window_weights_the_previous_window(small_table):
    window = 0.2
    policy = Policy("sliding_window", 10, window)
    number = time.monotonic_ns() // int(window * 1e9)
    while time.monotonic_ns() // int(window * 1e9) == number:    # start at a window's beginning
        time.sleep(0.001)
    assert sum(policy.check(b"k")[0] for _ in range(20)) == 10
    next_start = (time.monotonic_ns() // int(window * 1e9) + 1) * window
    time.sleep(next_start - time.monotonic_ns() / 1e9 + window / 2)   # half-way into the next window
    admitted = sum(policy.check(b"k")[0] for _ in range(20))
    assert 4 <= admitted <= 6                                      # 10 x 0.5 of the previous still counts


def inside_one_window(window: float, needed: float) -> None:
    """Fixed windows are multiples of `window` on CLOCK_MONOTONIC, which this process shares:
    return when at least `needed` seconds of the current one are left, so a test's requests
    all fall in one window (at a boundary every quota starts afresh)."""
    left = window - time.monotonic() % window
    if left < needed:
        time.sleep(left + 0.05)


def test_the_table_is_bounded_and_eviction_spares_active_keys(small_table):
    inside_one_window(30.0, 10.0)         # a fresh quota for "hot" at a boundary is not eviction
    hot = Policy("fixed_window", 3, 30.0)
    assert sum(hot.check(b"hot")[0] for _ in range(5)) == 3
    churn = Policy("gcra", 1, 0.01)                               # idle again 10 ms after each use
    for i in range(2000):                                         # 2,000 keys through 64 entries
        assert churn.check(f"key-{i}".encode())[0] is True
        if i % 16 == 0:                                           # (a full probe window refuses)
            time.sleep(0.011)
    assert hot.check(b"hot")[0] is False                          # still exhausted: never evicted


# --- through the gateway -------------------------------------------------------------------------

def limited_config(upstream, plugins, workers=1, consumers=()):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("api", ["/api/**"], "up"), route("open", ["/open/**"], "up")])
    config["routes"][0]["plugins"] = plugins
    config["workers"] = workers
    config["consumers"] = list(consumers)
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    return config


def hammer(port, path, seconds, threads=8, headers=None):
    """Statuses (with their monotonic time) of requests sent as fast as `threads` clients can."""
    results, stop = [], threading.Event()

    def client():
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        while not stop.is_set():
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            resp.read()
            results.append((time.monotonic(), resp.status))
            if resp.getheader("connection") == "close":
                conn = http.client.HTTPConnection(HOST, port, timeout=10)
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join(10)
    return results


@pytest.mark.parametrize("workers", [2, 4])
def test_a_fixed_window_limit_holds_for_all_workers_together(gateway, upstream, workers):
    window = 3.0
    gw = gateway(limited_config(upstream, [{"rate_limit": {"limit": 60, "window": f"{window}s",
                                                           "algorithm": "fixed_window", "key": ["route"]}}], workers))
    assert len(set(gw.worker_pids())) == workers
    # Windows are numbered on CLOCK_MONOTONIC, which this process shares: run inside one window.
    number = time.monotonic_ns() // int(window * 1e9)
    while time.monotonic_ns() // int(window * 1e9) == number:
        time.sleep(0.005)
    results = hammer(gw.port, "/api/x", 2.0)
    statuses = collections.Counter(status for _, status in results)
    assert statuses[200] == 60, statuses                         # exactly the limit, not workers x 60
    assert statuses[429] > 100
    # Every worker counted its decisions into the same shared-memory words.
    metrics = gw.admin("GET", "/metrics").body.decode()
    assert f'fastgw_ratelimit_decisions_total{{route="api",result="allowed"}} 60' in metrics
    assert f'fastgw_ratelimit_decisions_total{{route="api",result="rejected"}} {statuses[429]}' in metrics


def test_gcra_admits_the_rate_over_a_sustained_run_with_four_workers(gateway, upstream):
    gw = gateway(limited_config(upstream, [{"rate_limit": {"limit": 100, "window": "1s", "burst": 10,
                                                           "key": ["route"]}}], workers=4))
    results = hammer(gw.port, "/api/x", 3.0)
    admitted = [t for t, status in results if status == 200]
    span = admitted[-1] - admitted[0]
    expected = 100 * span + 10                                    # the rate over the span, plus the burst
    assert abs(len(admitted) - expected) <= 0.03 * expected, (len(admitted), expected)
    print(f"\ngcra 100/s, 4 workers: {len(admitted)} admitted over {span:.2f} s (expected {expected:.0f}), "
          f"{sum(1 for _, s in results if s == 429)} refused")


def test_headers_429_and_retry_after(gateway, upstream):
    gw = gateway(limited_config(upstream, [{"rate_limit": {"limit": 2, "window": "10s", "algorithm": "fixed_window",
                                                           "key": ["ip"]}}]))
    inside_one_window(10.0, 3.0)
    first = gw.request("GET", "/api/x")
    assert first.status == 200
    assert first.header("ratelimit-policy") == '"api";q=2;w=10'
    assert first.header("ratelimit").startswith('"api";r=1;t=')
    assert gw.request("GET", "/api/x").header("ratelimit").startswith('"api";r=0;')
    refused = gw.request("GET", "/api/x")
    assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.header("retry-after")) <= 10
    assert refused.header("ratelimit").startswith('"api";r=0;')
    assert gw.request("GET", "/open/x").header("ratelimit") is None       # an unlimited route
    assert gw.access_log_lines(4)[2]["flags"] == "RL"
    assert len(upstream.requests) == 3
    legacy = gateway(limited_config(upstream, [{"rate_limit": {"limit": 5, "headers": "legacy", "key": ["ip"]}}])
                     | {"listeners": [{"name": "l", "bind": f"{HOST}:{free_port()}"}]})
    resp = legacy.request("GET", "/api/x")
    assert resp.header("x-ratelimit-limit") == "5" and resp.header("x-ratelimit-remaining") == "4"
    assert resp.header("ratelimit") is None


def test_keys_and_consumer_plans(gateway, upstream):
    consumers = [{"name": "gold", "credentials": {"api_keys": [hash_key("gold-key")]}, "rate_limit": {"limit": 5, "window": "1m"}},
                 {"name": "free", "credentials": {"api_keys": [hash_key("free-key")]}}]
    gw = gateway(limited_config(upstream, [{"key_auth": {}}, {"rate_limit": {"limit": 2, "window": "1m",
                                                                             "algorithm": "fixed_window"}}],
                                consumers=consumers))

    def admitted(key, n=8):
        return sum(gw.request("GET", "/api/x", headers={"x-api-key": key}).status == 200 for _ in range(n))
    inside_one_window(60.0, 15.0)
    assert admitted("free-key") == 2                              # the plugin's limit
    assert admitted("gold-key") == 5                              # the consumer's plan
    by_header = gateway(limited_config(upstream, [{"rate_limit": {"limit": 1, "window": "1m", "algorithm": "fixed_window",
                                                                  "key": ["header:x-user", "route"]}}])
                        | {"listeners": [{"name": "h", "bind": f"{HOST}:{free_port()}"}]})
    statuses = [by_header.request("GET", "/api/x", headers={"x-user": user}).status
                for user in ("a", "b", "a", "c", "b")]
    assert statuses == [200, 200, 429, 200, 429]


def test_concurrency_limit_counts_requests_in_flight(gateway, start_upstream):
    slow = start_upstream(RecordingUpstream(handler=lambda req: (time.sleep(0.5), describe_request(req, "s"))[1]))
    gw = gateway(limited_config(slow, [{"rate_limit": {"limit": 2, "algorithm": "concurrency", "key": ["route"]}}],
                                workers=2))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(lambda i: gw.request("GET", f"/api/{i}").status, range(4)))
    assert statuses == [200, 200, 429, 429]
    assert wait_for(lambda: gw.request("GET", "/api/again").status == 200, timeout=3)   # released


def test_rate_limit_config_errors(tmp_path, upstream):
    import subprocess
    import sys

    import yaml
    config = limited_config(upstream, [{"rate_limit": {"limit": 0}}, {"rate_limit": {"limit": 5, "key": ["cookie:x"]}},
                                       {"rate_limit": {"limit": 5, "algorithm": "leaky"}}])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert out.returncode == 1
    assert "routes[0].plugins[0].rate_limit" in text and "limit must be at least 1" in text
    assert "routes[0].plugins[1].rate_limit" in text and "cookie:x" in text
    assert "routes[0].plugins[2].rate_limit" in text and "leaky" in text


def test_claim_key_counts_per_token_subject(gateway, upstream):
    import jwt

    def token(sub):
        return jwt.encode({"sub": sub, "exp": int(time.time()) + 300}, "k" * 32, algorithm="HS256")
    gw = gateway(limited_config(upstream, [{"jwt": {"algorithms": ["HS256"], "secret": "k" * 32}},
                                           {"rate_limit": {"limit": 2, "window": "1m", "algorithm": "fixed_window",
                                                           "key": ["claim:sub"]}}]))
    inside_one_window(60.0, 10.0)
    statuses = [gw.request("GET", "/api/x", headers={"authorization": f"Bearer {token(sub)}"}).status
                for sub in ("alice", "alice", "bob", "alice", "bob", "bob")]
    assert statuses == [200, 200, 200, 429, 200, 429]
