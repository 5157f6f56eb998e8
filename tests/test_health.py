"""Target health through the gateway: active checks run by the supervisor (state in shared memory,
so every worker agrees), passive ejection by the data plane, and 503 when nothing is up."""
from __future__ import annotations

import collections
import time

from upstreams import HOST, RecordingUpstream, describe_request, free_port, gateway_config, route, wait_for


def named(name, port=0):
    return RecordingUpstream(name=name, handler=lambda req: describe_request(req, name), port=port)


def config_for(ups, **service):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{u.port}"} for u in ups],
                                    **service}}, [route("all", ["/**"], "up")])
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    config["workers"] = 2
    return config


def servers(gw, n):
    out = collections.Counter()
    for i in range(n):
        resp = gw.request("GET", f"/x/{i}")
        out[resp.json()["server"] if resp.status == 200 else resp.status] += 1
    return out


def health(gw):
    return {t["address"]: t for t in gw.admin("GET", "/services/up/health").json()["targets"]}


def test_active_checks_take_a_dead_target_out_and_bring_it_back(gateway, start_upstream):
    a, b, c = (start_upstream(named(n)) for n in "abc")
    gw = gateway(config_for([a, b, c], balance={"algorithm": "round_robin"}, health={"active": {
        "type": "http", "path": "/healthz", "interval": "100ms", "timeout": "100ms",
        "healthy_threshold": 2, "unhealthy_threshold": 2}}))
    assert set(servers(gw, 30)) == {"a", "b", "c"}
    assert all(r.path == "/healthz" for r in a.requests if r.header("user-agent") == "fastgw-health")
    port_b = b.port
    b.stop()
    stopped = time.monotonic()
    assert wait_for(lambda: not health(gw)[f"{HOST}:{port_b}"]["healthy"], timeout=5)
    detected = time.monotonic() - stopped
    assert detected < 1.0                           # interval x unhealthy_threshold (+ a probe)
    after = servers(gw, 60)                         # every worker skips it, no failed request
    assert set(after) == {"a", "c"} and sum(after.values()) == 60
    assert "is down" in gw.stderr_text()
    back = start_upstream(named("b", port_b))
    assert wait_for(lambda: health(gw)[f"{HOST}:{port_b}"]["healthy"], timeout=5)
    assert set(servers(gw, 30)) == {"a", "b", "c"}
    assert any(r.header("user-agent") != "fastgw-health" for r in back.requests)


def test_passive_ejection_after_consecutive_failures(gateway, start_upstream):
    a, c = start_upstream(named("a")), start_upstream(named("c"))
    dead = free_port()                              # nothing listens: connect fails
    config = config_for([a, c], balance={"algorithm": "round_robin"},
                        health={"passive": {"consecutive_failures": 2, "ejection_time": "2s"}})
    config["services"]["up"]["targets"].insert(1, {"address": f"{HOST}:{dead}"})
    config["workers"] = 1
    gw = gateway(config)
    # Each failed connect is retried on another target (nothing reached the dead one), so no
    # request fails; after two failures in a row the dead target is ejected and not tried again.
    assert set(servers(gw, 12)) == {"a", "c"}
    assert health(gw)[f"{HOST}:{dead}"]["ejected"] is True
    assert "ejected up target" in gw.stderr_text()
    lines = gw.access_log_lines(12)
    assert sorted(line["attempts"] for line in lines).count(2) == 2
    assert servers(gw, 30) == {"a": 15, "c": 15}


def test_connect_failure_is_retried_on_another_target_for_any_method(gateway, start_upstream):
    a = start_upstream(named("a"))
    dead = free_port()
    config = config_for([a], balance={"algorithm": "round_robin"})
    config["services"]["up"]["targets"].append({"address": f"{HOST}:{dead}"})
    config["workers"] = 1
    gw = gateway(config)
    for i in range(6):
        resp = gw.request("POST", "/submit", body=b"payload-%d" % i)
        assert resp.status == 200 and resp.json()["body"] == "payload-%d" % i
    assert [r.body for r in a.requests] == [b"payload-%d" % i for i in range(6)]  # each once
    config["services"]["up"]["retries"] = {"attempts": 0}
    config["listeners"][0]["bind"] = f"{HOST}:{free_port()}"     # (SO_REUSEPORT would share it)
    config["admin"]["bind"] = f"{HOST}:{free_port()}"
    gw2 = gateway(config)
    statuses = [gw2.request("POST", "/submit", body=b"x").status for _ in range(4)]
    assert sorted(statuses) == [200, 200, 502, 502]


def test_every_target_down_is_503_with_retry_after(gateway, start_upstream):
    a = start_upstream(named("a"))
    gw = gateway(config_for([a], health={"active": {"type": "tcp", "interval": "100ms",
                                                    "timeout": "100ms", "unhealthy_threshold": 1}}))
    assert gw.request("GET", "/x").status == 200
    a.stop()
    assert wait_for(lambda: gw.request("GET", "/x").status == 503, timeout=5)
    resp = gw.request("GET", "/x")
    assert resp.json()["error"]["code"] == "no_healthy_upstream" and resp.header("retry-after") == "1"
    assert wait_for(lambda: [l["flags"] for l in gw.access_log_lines()][-1:] == ["UH"])


def test_backup_takes_traffic_only_while_no_primary_is_up(gateway, start_upstream):
    a, b = start_upstream(named("a")), start_upstream(named("b"))
    config = config_for([a], health={"active": {"type": "tcp", "interval": "100ms", "timeout": "100ms",
                                                "unhealthy_threshold": 1, "healthy_threshold": 1}})
    config["services"]["up"]["targets"].append({"address": f"{HOST}:{b.port}", "backup": True})
    gw = gateway(config)
    assert servers(gw, 20) == {"a": 20}
    port_a = a.port
    a.stop()
    assert wait_for(lambda: set(servers(gw, 5)) == {"b"}, timeout=5)
    assert servers(gw, 20) == {"b": 20}
    start_upstream(named("a", port_a))
    assert wait_for(lambda: set(servers(gw, 5)) == {"a"}, timeout=5)


def test_killing_a_target_under_load_fails_no_idempotent_request(gateway, start_upstream):
    import threading

    def slow(name):
        return RecordingUpstream(name=name, handler=lambda req: (time.sleep(0.01), describe_request(req, name))[1])
    ups = [start_upstream(slow(n)) for n in "abc"]
    cfg = config_for(ups, health={"active": {"type": "tcp", "interval": "100ms", "timeout": "100ms",
                                             "unhealthy_threshold": 2}})
    gw = gateway(cfg)
    results, stop = collections.Counter(), threading.Event()

    def client():
        import http.client
        conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/item")
                resp = conn.getresponse()
                body = resp.read()
                server = __import__("json").loads(body)["server"] if resp.status == 200 else None
                results[(resp.status, server)] += 1
            except Exception as exc:                      # noqa: BLE001 - counted, asserted below
                results[("error", type(exc).__name__)] += 1
                conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    ups[1].stop()                                         # in-flight requests to b are reset
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    failed = {k: v for k, v in results.items() if k[0] != 200}
    assert failed == {}, failed
    assert results[(200, "b")] > 0 and results[(200, "a")] > 0 and results[(200, "c")] > 0
    assert sum(results.values()) > 200
