"""Resilience through the gateway: retries on listed statuses, per-try timeouts and the retry
budget; the circuit breaker; slow start; `nearest` and zone preference with spill-over."""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

from upstreams import HOST, RecordingUpstream, Reply, describe_request, free_port, gateway_config, route, wait_for


class Backend(RecordingUpstream):
    """An upstream whose answers can be changed while it runs: `status` for requests (200 means
    the describe_request JSON), `health` for /healthz, `delay` before every answer."""

    def __init__(self, name: str, *, delay: float = 0.0, port: int = 0):
        self.status, self.health, self.delay = 200, 200, delay
        super().__init__(name=name, handler=self._answer, port=port)

    def _answer(self, req):
        if req.path == "/healthz":
            return Reply(self.health, [("Content-Length", "0")])
        if self.delay:
            time.sleep(self.delay)
        if self.status != 200:
            return Reply(self.status, [("Content-Type", "text/plain")], b"sick")
        return describe_request(req, self.name)

    def served(self) -> int:
        return sum(1 for r in self.requests if r.path != "/healthz")


def config_for(backends, workers=1, zones=None, **service):
    targets = [{"address": f"{HOST}:{b.port}"} for b in backends]
    for target, zone in zip(targets, zones or ()):
        target["zone"] = zone
    config = gateway_config({"up": {"targets": targets, **service}}, [route("all", ["/**"], "up")])
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    config["workers"] = workers
    return config


def servers(gw, n, method="GET"):
    out = collections.Counter()
    for i in range(n):
        resp = gw.request(method, f"/x/{i}")
        out[resp.json()["server"] if resp.status == 200 else resp.status] += 1
    return out


def targets(gw):
    return {t["address"]: t for t in gw.admin("GET", "/services/up/health").json()["targets"]}


# Probes every 100 ms: a test flips a backend's health status and sees it within a few probes.
# Two failures in a row mark a target down, so one slow answer on a busy machine does not.
FAST_CHECKS = {"active": {"type": "http", "path": "/healthz", "interval": "100ms", "timeout": "100ms",
                          "healthy_threshold": 1, "unhealthy_threshold": 2}}


# --- retries -------------------------------------------------------------------------------------

def test_listed_status_is_retried_on_another_target_for_idempotent_methods_only(gateway, start_upstream):
    sick, good = start_upstream(Backend("sick")), start_upstream(Backend("good"))
    sick.status = 503
    gw = gateway(config_for([sick, good], balance={"algorithm": "round_robin"},
                            retries={"attempts": 1, "retry_on": ["connect_failure", 503]}))
    assert servers(gw, 20) == {"good": 20}
    # Round robin: the retry takes the next target, so almost every request starts on sick.
    assert sick.served() >= 10
    lines = gw.access_log_lines(20)
    assert sum(line["attempts"] for line in lines) == 20 + sick.served()
    # POST is not idempotent: the target may have acted on it, so its 503 is the answer.
    assert servers(gw, 10, "POST") == {"good": 5, 503: 5}


def test_listed_status_is_not_retried_when_attempts_are_used_up(gateway, start_upstream):
    a, b = start_upstream(Backend("a")), start_upstream(Backend("b"))
    a.status = b.status = 502
    gw = gateway(config_for([a, b], balance={"algorithm": "round_robin"},
                            retries={"attempts": 1, "retry_on": [502]}))
    resp = gw.request("GET", "/x")
    assert resp.status == 502 and resp.body == b"sick"     # the last try's own answer
    assert a.served() + b.served() == 2


def test_per_try_timeout_moves_on_to_another_target(gateway, start_upstream):
    slow, fast = start_upstream(Backend("slow", delay=1.5)), start_upstream(Backend("fast"))
    gw = gateway(config_for([slow, fast], balance={"algorithm": "round_robin"},
                            retries={"attempts": 1, "retry_on": [504], "per_try_timeout": "200ms"}))
    started = time.monotonic()
    assert servers(gw, 4) == {"fast": 4}
    assert time.monotonic() - started < 1.5        # those that tried slow waited 200 ms, not 1.5 s
    assert slow.served() >= 2
    # Without 504 in retry_on the per-try timeout is the answer.
    gw2 = gateway(config_for([slow, fast], balance={"algorithm": "round_robin"},
                             retries={"attempts": 1, "retry_on": ["reset"], "per_try_timeout": "200ms"}))
    statuses = collections.Counter(gw2.request("GET", f"/y/{i}").status for i in range(4))
    assert statuses == {200: 2, 504: 2}


def test_retry_budget_keeps_a_sick_service_from_getting_twice_its_traffic(gateway, start_upstream):
    def storm(budget):
        a, b = (start_upstream(Backend(n, delay=0.3)) for n in "ab")
        a.status = b.status = 503
        retries = {"attempts": 1, "retry_on": [503]}
        if budget is not None:
            retries["budget_ratio"] = budget
        gw = gateway(config_for([a, b], balance={"algorithm": "round_robin"}, retries=retries))
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda i: gw.request("GET", f"/z/{i}").status, range(20)))
        assert statuses == [503] * 20
        sent = a.served() + b.served()
        gw.stop()
        return sent
    assert storm(None) == 40                       # every request tried twice
    capped = storm(0.2)                            # retries in flight <= max(3, 0.2 x 20) = 4
    assert 20 < capped <= 26, capped


# --- circuit breaker -----------------------------------------------------------------------------

def test_circuit_opens_on_failure_ratio_then_half_open_trials_close_it(gateway, start_upstream):
    a, b = start_upstream(Backend("a")), start_upstream(Backend("b"))
    gw = gateway(config_for([a, b], workers=2, balance={"algorithm": "round_robin"}, retries={"attempts": 0},
                            circuit_breaker={"window": "10s", "min_requests": 6, "failure_ratio": 0.5,
                                             "open_for": "1s", "half_open_requests": 2}))
    address_a = f"{HOST}:{a.port}"
    assert set(servers(gw, 10)) == {"a", "b"}
    a.status = 500
    assert wait_for(lambda: servers(gw, 4) and targets(gw)[address_a]["circuit"] == "open", timeout=5)
    assert "circuit of up target" in gw.stderr_text()
    before = a.served()
    assert servers(gw, 20) == {"b": 20}            # open: a gets nothing, in either worker
    assert a.served() == before
    a.status = 200
    time.sleep(1.1)                                # open_for is over: trials go to a
    assert wait_for(lambda: servers(gw, 4) and targets(gw)[address_a]["circuit"] == "closed", timeout=5)
    assert set(servers(gw, 10)) == {"a", "b"}
    assert "closed again" in gw.stderr_text()


def test_single_target_with_open_circuit_answers_503_circuit_open(gateway, start_upstream):
    a = start_upstream(Backend("a"))
    a.status = 502
    gw = gateway(config_for([a], retries={"attempts": 0},
                            circuit_breaker={"min_requests": 3, "failure_ratio": 1.0, "open_for": "30s"}))
    assert [gw.request("GET", "/x").status for _ in range(3)] == [502] * 3
    resp = gw.request("GET", "/x")
    assert resp.status == 503 and resp.json()["error"]["code"] == "circuit_open"
    assert resp.header("retry-after") == "1"
    assert a.served() == 3


def test_half_open_failure_opens_the_circuit_again(gateway, start_upstream):
    a = start_upstream(Backend("a"))
    a.status = 500
    gw = gateway(config_for([a], retries={"attempts": 0},
                            circuit_breaker={"min_requests": 2, "failure_ratio": 0.5, "open_for": "500ms",
                                             "half_open_requests": 1}))
    assert [gw.request("GET", "/x").status for _ in range(2)] == [500, 500]
    assert gw.request("GET", "/x").status == 503
    time.sleep(0.6)
    assert gw.request("GET", "/x").status == 500   # the one trial fails: open again
    assert gw.request("GET", "/x").status == 503
    assert a.served() == 3


# --- slow start ----------------------------------------------------------------------------------

def test_slow_start_ramps_up_a_target_that_comes_back(gateway, start_upstream):
    a, b = start_upstream(Backend("a")), start_upstream(Backend("b"))
    gw = gateway(config_for([a, b], balance={"algorithm": "round_robin"}, slow_start="4s", health=FAST_CHECKS))
    assert servers(gw, 20) == {"a": 10, "b": 10}   # up from the start: no ramp
    b.health = 503
    assert wait_for(lambda: not targets(gw)[f"{HOST}:{b.port}"]["healthy"], timeout=5)
    b.health = 200
    assert wait_for(lambda: targets(gw)[f"{HOST}:{b.port}"]["healthy"], timeout=5)
    early = servers(gw, 200)["b"] / 200            # first ~second: 10-35% of its weight
    time.sleep(max(0.0, 4.2 - 1.0))
    late = servers(gw, 200)["b"] / 200             # ramp over: its full half
    assert early < 0.3 and late > 0.4, (early, late)


# --- nearest and locality ------------------------------------------------------------------------

def test_nearest_sends_traffic_to_the_fastest_healthy_target(gateway, start_upstream):
    far, near, middle = (start_upstream(Backend(n, delay=d)) for n, d in
                         (("far", 0.040), ("near", 0.002), ("middle", 0.015)))
    gw = gateway(config_for([far, near, middle], balance={"algorithm": "nearest"}, health=FAST_CHECKS))
    servers(gw, 20)                                # every target gets measured
    counts = servers(gw, 100)
    assert counts["near"] >= 85, counts
    near.health = 503
    assert wait_for(lambda: not targets(gw)[f"{HOST}:{near.port}"]["healthy"], timeout=5)
    counts = servers(gw, 100)
    assert counts["middle"] >= 85 and "near" not in counts, counts
    near.health = 200
    assert wait_for(lambda: targets(gw)[f"{HOST}:{near.port}"]["healthy"], timeout=5)
    servers(gw, 40)                                # near is measured again by the probes
    assert servers(gw, 100)["near"] >= 85


def test_locality_prefers_own_zone_and_spills_over_below_the_threshold(gateway, start_upstream):
    a1, a2, b1, b2 = (start_upstream(Backend(n)) for n in ("a1", "a2", "b1", "b2"))
    gw = gateway(config_for([a1, a2, b1, b2], zones=["eu-1a", "eu-1a", "eu-1b", "eu-1b"],
                            balance={"algorithm": "round_robin"}, health=FAST_CHECKS,
                            locality={"zone": "eu-1a", "spill_over_below": 0.7}))
    assert servers(gw, 40) == {"a1": 20, "a2": 20}
    a1.health = 503                                # half of our zone is up: below 70%
    assert wait_for(lambda: not targets(gw)[f"{HOST}:{a1.port}"]["healthy"], timeout=5)
    spilled = servers(gw, 60)
    assert set(spilled) == {"a2", "b1", "b2"}, spilled
    a1.health = 200
    assert wait_for(lambda: targets(gw)[f"{HOST}:{a1.port}"]["healthy"], timeout=5)
    assert servers(gw, 40) == {"a1": 20, "a2": 20}


def test_locality_zone_must_name_a_target_zone(gateway, start_upstream, tmp_path):
    import subprocess
    import sys

    import yaml
    a = start_upstream(Backend("a"))
    config = config_for([a], zones=["eu-1a"], locality={"zone": "us-2"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "services.up.locality.zone" in out.stderr + out.stdout
    assert "us-2" in out.stderr + out.stdout


# --- failover under load -------------------------------------------------------------------------

def test_failover_under_load_out_fast_back_fast_ramping_up(gateway, start_upstream):
    """Steady load from 4 clients; one of three upstream processes dies and comes back. No request
    fails; the dead target is out within interval x unhealthy_threshold, back within interval x
    healthy_threshold, and its share ramps up during slow start."""
    import http.client
    import json

    ups = [start_upstream(Backend(n, delay=0.003)) for n in "abc"]
    checks = {"active": {"type": "http", "path": "/healthz", "interval": "200ms", "timeout": "150ms",
                         "healthy_threshold": 2, "unhealthy_threshold": 2}}
    gw = gateway(config_for(ups, workers=2, balance={"algorithm": "round_robin"}, slow_start="3s",
                            health=checks))
    b_address, b_port = f"{HOST}:{ups[1].port}", ups[1].port
    served, stop = [], threading.Event()             # (time, server or status)
    transitions = []                                 # (time, healthy) of b

    def client():
        conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/item")
                resp = conn.getresponse()
                body = resp.read()
                served.append((time.monotonic(), json.loads(body)["server"] if resp.status == 200 else resp.status))
            except Exception as exc:                  # noqa: BLE001 - counted as a failure below
                served.append((time.monotonic(), type(exc).__name__))
                conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)

    def monitor():
        last = True
        while not stop.is_set():
            healthy = targets(gw)[b_address]["healthy"]
            if healthy != last:
                transitions.append((time.monotonic(), healthy))
                last = healthy
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(4)] + [threading.Thread(target=monitor)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed = time.monotonic()
    ups[1].stop()
    time.sleep(2.0)
    restarted = time.monotonic()
    start_upstream(Backend("b", delay=0.003, port=b_port))
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(15)
    failed = [s for _, s in served if s not in ("a", "b", "c")]
    assert failed == [], collections.Counter(failed)
    (down_at, down), (up_at, up) = transitions[:2]
    assert (down, up) == (False, True)
    out_after, back_after = down_at - killed, up_at - restarted
    # 2 x 200 ms, plus a probe timeout, the monitor's polling and a loaded CI machine's delays
    assert out_after < 0.4 + 0.8, out_after
    assert back_after < 0.4 + 0.8, back_after
    assert not any(s == "b" for t, s in served if killed + 0.05 < t < restarted)
    first_b = min(t for t, s in served if s == "b" and t > restarted)

    def share(start, end):
        window = [s for t, s in served if start <= t < end]
        return window.count("b") / max(len(window), 1), len(window)
    early, early_n = share(first_b, first_b + 0.75)
    late, late_n = share(first_b + 3.0, first_b + 3.9)
    print(f"\nfailover: {len(served)} requests, 0 failed; b out after {out_after * 1000:.0f} ms, "
          f"back after {back_after * 1000:.0f} ms; b's share in its first 0.75 s {early:.1%} "
          f"({early_n} requests), after the 3 s ramp {late:.1%} ({late_n})")
    assert early < 0.25 and late > 0.27, (early, late)


# --- gRPC health checks --------------------------------------------------------------------------

def test_grpc_health_check_follows_the_servers_serving_status(gateway):
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        servicer.set("inventory.Inventory", health_pb2.HealthCheckResponse.SERVING)
        config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{port}"}], "health": {"active": {
            "type": "grpc", "grpc_service": "inventory.Inventory", "interval": "100ms", "timeout": "100ms",
            "healthy_threshold": 1, "unhealthy_threshold": 1}}}}, [route("all", ["/**"], "up")])
        config["admin"] = {"bind": f"{HOST}:{free_port()}"}
        gw = gateway(config)
        address = f"{HOST}:{port}"
        time.sleep(0.3)
        assert targets(gw)[address]["healthy"]
        servicer.set("inventory.Inventory", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert wait_for(lambda: not targets(gw)[address]["healthy"], timeout=5)
        resp = gw.request("GET", "/x")                 # through the gateway: nothing is up
        assert resp.status == 503 and resp.json()["error"]["code"] == "no_healthy_upstream"
        assert "gRPC health status 2" in gw.stderr_text()
        servicer.set("inventory.Inventory", health_pb2.HealthCheckResponse.SERVING)
        assert wait_for(lambda: targets(gw)[address]["healthy"], timeout=5)
        server.stop(0)                                 # gone altogether: UNAVAILABLE
        assert wait_for(lambda: not targets(gw)[address]["healthy"], timeout=5)
        assert "gRPC UNAVAILABLE" in gw.stderr_text()
    finally:
        server.stop(0)


# --- runtime target changes under load -----------------------------------------------------------

def test_targets_added_reweighted_drained_and_removed_under_load_fail_nothing(gateway, start_upstream):
    import http.client
    import json

    a, b, c = (start_upstream(Backend(n, delay=0.005)) for n in "abc")
    gw = gateway(config_for([a, b], workers=2, balance={"algorithm": "weighted_round_robin"}))
    served, stop = [], threading.Event()

    def client():
        conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/item")
                resp = conn.getresponse()
                body = resp.read()
                served.append(json.loads(body)["server"] if resp.status == 200 else resp.status)
            except Exception as exc:                  # noqa: BLE001 - counted as a failure below
                served.append(type(exc).__name__)
                conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)

    def change(method, path, body=None):
        resp = gw.admin(method, path, body)
        assert resp.status < 300, resp.body
        time.sleep(0.4)
        return len(served)
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    marks = [len(served)]
    marks.append(change("POST", "/services/up/targets", {"address": f"{HOST}:{c.port}", "weight": 1}))
    marks.append(change("PATCH", f"/services/up/targets/{HOST}:{c.port}", {"weight": 4}))
    marks.append(change("PATCH", f"/services/up/targets/{HOST}:{a.port}", {"drain": True}))
    marks.append(change("DELETE", f"/services/up/targets/{HOST}:{a.port}"))
    stop.set()
    for t in threads:
        t.join(15)
    failed = [s for s in served if s not in ("a", "b", "c")]
    assert failed == [], collections.Counter(failed)
    last = collections.Counter(served[marks[-2] + 50:])            # after the drain settled
    assert set(last) == {"b", "c"} and last["c"] > 2.5 * last["b"], last
    print(f"\nruntime changes: {len(served)} requests, 0 failed; after drain+remove: {dict(last)}")


def test_half_open_trial_whose_client_left_does_not_wedge_the_circuit(gateway, start_upstream):
    import socket as _socket

    a = start_upstream(Backend("a"))
    a.status = 500
    gw = gateway(config_for([a], retries={"attempts": 0},
                            circuit_breaker={"min_requests": 2, "failure_ratio": 0.5, "open_for": "500ms",
                                             "half_open_requests": 1}))
    assert [gw.request("GET", "/x").status for _ in range(2)] == [500, 500]
    a.status, a.delay = 200, 1.0
    time.sleep(0.6)
    with _socket.create_connection((HOST, gw.port)) as sock:      # the one trial; its client leaves
        sock.sendall(b"GET /trial HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: any(r.path == "/trial" for r in a.requests))
    a.delay = 0.0
    assert gw.request("GET", "/x").json()["error"]["code"] == "circuit_open"   # its trial is out
    # After another open_for without the trial's result, a new trial goes through and closes it.
    assert wait_for(lambda: gw.request("GET", "/x").status == 200, timeout=3)
    assert wait_for(lambda: targets(gw)[f"{HOST}:{a.port}"]["circuit"] == "closed", timeout=3)
