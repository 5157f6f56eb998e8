"""The process model: a supervisor with N workers, shared-memory counters, restarts, reloads under
load, graceful drain and systemd notifications — all through real processes and sockets."""
from __future__ import annotations

import http.client
import os
import resource
import signal
import socket
import sys
import threading
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from upstreams import (HOST, RecordingUpstream, describe_request, free_port, proxy_config,
                       route, target_service, wait_for)


def with_admin(config: dict, **admin) -> dict:
    config["admin"] = {"bind": f"{HOST}:{free_port()}", **admin}
    return config


def metrics(gw) -> dict:
    """{(name, frozenset(labels.items())): value} from GET /metrics, parsed by prometheus_client."""
    resp = gw.admin("GET", "/metrics")
    assert resp.status == 200, resp.body
    samples = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_four_workers_share_counters_exactly(gateway, upstream):
    gw = gateway(with_admin({**proxy_config(upstream.port), "workers": 4}))
    pids = gw.worker_pids()
    assert len(set(pids)) == 4 and gw.pid not in pids
    # New connections spread over the workers' SO_REUSEPORT sockets; keep-alive ones stay put.
    for _ in range(400):
        assert gw.request("GET", "/a").status == 200
    conns = [http.client.HTTPConnection(HOST, gw.port, timeout=5) for _ in range(8)]
    for i in range(800):
        c = conns[i % 8]
        c.request("POST", "/b", body=b"x")
        assert c.getresponse().read() is not None
    for c in conns:
        c.close()
    assert gw.request("GET", "/nowhere", headers={"Host": "x"}).status == 200   # `all` is /**
    # Each worker counts what it served in its own slot: all four took a share.
    # A worker records a request after its answer is written: wait for the last one to land.
    def per_worker():
        return [w["requests"] for w in gw.admin("GET", "/status").json()["workers"]]
    assert wait_for(lambda: sum(per_worker()) == 1201), per_worker()
    assert all(n > 0 for n in per_worker()), per_worker()

    m = metrics(gw)
    assert sample(m, "fastgw_http_requests_total", route="all", service="up", method="GET", code="200") == 401
    assert sample(m, "fastgw_http_requests_total", route="all", service="up", method="POST", code="200") == 800
    assert sample(m, "fastgw_http_request_duration_seconds_count", route="all", service="up") == 1201
    assert sample(m, "fastgw_http_request_duration_seconds_bucket", route="all", service="up", le="+Inf") == 1201
    target = f"{HOST}:{upstream.port}"
    assert sample(m, "fastgw_upstream_requests_total", service="up", target=target, result="ok") == 1201
    assert sample(m, "fastgw_upstream_request_duration_seconds_count", service="up", target=target) == 1201
    assert sample(m, "fastgw_workers") == 4
    assert len(upstream.requests) == 1201
    # Every connection is closed now: the gauge, summed over workers, returns to zero.
    assert wait_for(lambda: sample(metrics(gw), "fastgw_open_connections", listener="public") == 0)


def test_a_killed_worker_is_restarted(gateway, upstream):
    gw = gateway(with_admin({**proxy_config(upstream.port), "workers": 2}))
    victim = gw.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        status = gw.admin("GET", "/status").json()
        pids = [w["pid"] for w in status["workers"]]
        return status["ready"] and victim not in pids and None not in pids
    assert wait_for(replaced, timeout=15)
    assert gw.alive
    assert all(gw.request("GET", "/x").status == 200 for _ in range(20))
    assert "exited with signal SIGKILL; restarting" in gw.stderr_text()
    assert gw.admin("GET", "/status").json()["workers"][0]["restarts"] == 1


def _reload_config(base: dict, k: int, ports: tuple[int, int]) -> dict:
    """Version k of the config: route `api` goes to upstream A (even k) or B (odd k) and stamps
    x-config: k on the request; a route `extra-k` comes and goes; target lists change."""
    config = dict(base)
    config["services"] = {"a": target_service(ports[0]), "b": target_service(ports[1])}
    if k % 3 == 0:
        config["services"]["spare"] = target_service(ports[0], ports[1])
    config["routes"] = [
        route("api", ["/api/**"], "a" if k % 2 == 0 else "b",
              request_headers={"set": {"x-config": str(k)}}),
        *([route(f"extra-{k}", [f"/extra/{k}"], "a")] if k % 2 else []),
    ]
    return config


@pytest.mark.slow
def test_twenty_reloads_under_load_drop_nothing(gateway, start_upstream):
    a = start_upstream(RecordingUpstream(name="A"))
    b = start_upstream(RecordingUpstream(name="B"))
    base = with_admin({**proxy_config(a.port), "workers": 2})
    gw = gateway(_reload_config(base, 0, (a.port, b.port)))
    results, failures = [], []
    stop = threading.Event()

    def client(keep_alive: bool):
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
                conn.request("GET", "/api/item")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    failures.append(f"status {resp.status}: {body[:200]!r}")
                else:
                    doc = __import__("json").loads(body)
                    headers = {k.lower(): v for k, v in doc["headers"]}
                    results.append((doc["server"], int(headers["x-config"])))
                if not keep_alive or resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                conn = None

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for k in range(1, 21):
            gw.config_path.write_text(yaml.safe_dump(_reload_config(base, k, (a.port, b.port))))
            if k % 2:
                os.kill(gw.pid, signal.SIGHUP)
            else:
                assert gw.admin("POST", "/reload").status == 200
            assert wait_for(lambda: gw.admin("GET", "/status").json()["config_version"] == k + 1
                            and gw.admin("GET", "/status/ready").status == 200, timeout=10), k
            time.sleep(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert failures == []
    assert len(results) > 500
    # Each request saw one config whole: the stamp and the upstream belong to the same version.
    mixed = [(server, k) for server, k in results if server != ("A" if k % 2 == 0 else "B")]
    assert mixed == []
    assert {k for _, k in results} >= {0, 20}
    assert gw.request("GET", "/extra/19").status == 404
    assert gw.admin("GET", "/status").json()["reload"]["ok"] is True


def test_an_invalid_reload_keeps_the_running_config(gateway, upstream):
    gw = gateway(with_admin({**proxy_config(upstream.port), "workers": 2}))
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + "bogus_key: 1\n")
    os.kill(gw.pid, signal.SIGHUP)
    assert wait_for(lambda: "reload rejected" in gw.stderr_text(), timeout=10)
    assert f"{gw.config_path}:" in gw.stderr_text() and "bogus_key" in gw.stderr_text()
    assert gw.request("GET", "/x").status == 200
    status = gw.admin("GET", "/status").json()
    assert status["config_version"] == 1 and status["reload"]["ok"] is False and status["ready"]
    answer = gw.admin("POST", "/reload")
    assert answer.status == 400 and "bogus_key" in answer.json()["error"]["message"]


def test_sigterm_drains_in_flight_requests(gateway, start_upstream):
    slow = start_upstream(RecordingUpstream(handler=lambda req: (time.sleep(1.5), describe_request(req, "slow"))[1]))
    config = with_admin({**proxy_config(slow.port), "workers": 2, "drain": {"delay": "500ms", "timeout": "10s"}})
    gw = gateway(config)
    answers: list = []

    def one():
        c = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        try:
            c.request("GET", "/slow")                  # keep-alive request
            r = c.getresponse()
            answers.append((r.status, r.getheader("connection"), len(r.read())))
        except Exception as exc:                         # noqa: BLE001 - recorded, asserted below
            answers.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(slow.requests) == 4, timeout=5)
    sent = time.monotonic()
    os.kill(gw.pid, signal.SIGTERM)
    # Not ready at once (the signal is handled asynchronously), while still accepting for the
    # 500 ms drain.delay so that a load balancer's health check sees it first.
    ready = wait_for(lambda: (r := gw.admin("GET", "/status/ready")).status == 503 and r, timeout=0.4)
    assert ready and ready.json()["draining"] is True
    assert gw.request("GET", "/new").status == 200
    for t in threads:
        t.join(10)
    assert answers == [(200, "close", answers[0][2])] * 4
    assert gw.wait_exit(10) == 0
    assert time.monotonic() - sent < 5
    with pytest.raises(OSError):
        socket.create_connection((HOST, gw.port), timeout=1).close()


def test_systemd_notify_ready_reloading_stopping(gateway, upstream, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        gw = gateway(with_admin(proxy_config(upstream.port)), env={"NOTIFY_SOCKET": path})
        assert sock.recv(4096).decode().split("\n")[0] == "READY=1"
        os.kill(gw.pid, signal.SIGHUP)
        reloading = sock.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert sock.recv(4096).decode().split("\n")[0] == "READY=1"
        os.kill(gw.pid, signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert gw.wait_exit(10) == 0
    finally:
        sock.close()


def test_workers_auto_and_cli_override(gateway, upstream):
    gw = gateway(with_admin({**proxy_config(upstream.port), "workers": "auto"}))
    assert len(gw.worker_pids()) == len(os.sched_getaffinity(0))


def test_access_log_from_several_workers(gateway, upstream):
    """Every worker writes whole JSON lines (to stdout here); SIGUSR1 reaches all of them."""
    config = with_admin({**proxy_config(upstream.port), "workers": 2})
    config["log"] = {"access": {"path": "-"}}
    gw = gateway(config)
    for i in range(300):
        gw.request("GET", f"/line/{i}", headers={"User-Agent": "x" * 200})
    lines = wait_for(lambda: (t := gw.stdout_path.read_text()).count("\n") >= 300 and t, timeout=5)
    parsed = [__import__("json").loads(line) for line in lines.splitlines()]
    assert sorted(int(p["path"].rsplit("/", 1)[1]) for p in parsed) == list(range(300))


def test_access_log_reopen_sampling_and_flags(gateway, upstream, tmp_path):
    log = tmp_path / "access.log"
    config = with_admin({**proxy_config(upstream.port), "workers": 2})
    config["routes"].insert(0, route("dead", ["/dead"], "dead"))
    config["services"]["dead"] = target_service(free_port())
    config["log"] = {"access": {"path": str(log)}}
    gw = gateway(config)
    gw.request("GET", "/dead")
    gw.request("GET", "/ok")
    assert wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2)
    entries = [__import__("json").loads(line) for line in log.read_text().splitlines()]
    assert {e["path"]: e["flags"] for e in entries} == {"/dead": "UF", "/ok": "-"}
    # Rotation: move the file away, SIGUSR1, new lines land in a new file (from both workers).
    log.rename(tmp_path / "access.log.1")
    os.kill(gw.pid, signal.SIGUSR1)
    time.sleep(0.3)
    for _ in range(40):
        gw.request("GET", "/after")
    assert wait_for(lambda: log.exists() and log.read_text().count("\n") == 40)
    assert (tmp_path / "access.log.1").read_text().count("\n") == 2

    # Sampling: about half the lines are written.
    config["log"] = {"access": {"path": str(log), "sample": 0.5}}
    gw.config_path.write_text(yaml.safe_dump(config))
    log.unlink()
    assert gw.admin("POST", "/reload").status == 200      # a changed access log is reopened
    for _ in range(400):
        gw.request("GET", "/sampled")
    time.sleep(0.5)
    written = log.read_text().count("\n")
    assert 120 < written < 280, written


def test_max_connections_holds_across_workers(gateway, upstream):
    config = with_admin({**proxy_config(upstream.port, limits={"max_connections": 3}), "workers": 2})
    gw = gateway(config)
    held = [http.client.HTTPConnection(HOST, gw.port, timeout=5) for _ in range(3)]
    for c in held:                                  # spread over both workers, kept open
        c.request("GET", "/x")
        assert c.getresponse().read()
    for _ in range(4):                              # whichever worker accepts it: closed at once
        s = socket.create_connection((HOST, gw.port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()
    m = metrics(gw)
    assert sample(m, "fastgw_connections_rejected_total", listener="public") == 4
    assert sample(m, "fastgw_open_connections", listener="public") == 3
    for c in held:
        c.close()
    assert wait_for(lambda: gw.request("GET", "/x").status == 200)


def test_reload_adds_and_removes_listeners_all_or_nothing(gateway, upstream):
    gw = gateway(with_admin({**proxy_config(upstream.port), "workers": 2}))
    config = yaml.safe_load(gw.config_path.read_text())
    extra_port = free_port()
    config["listeners"].append({"name": "second", "bind": f"{HOST}:{extra_port}"})
    gw.config_path.write_text(yaml.safe_dump(config))
    assert gw.admin("POST", "/reload").status == 200
    assert wait_for(lambda: _get(extra_port) == 200)

    # A port someone else holds: every worker's prepare fails, nothing changes anywhere.
    blocker = socket.socket()
    blocker.bind((HOST, 0))
    blocker.listen()
    try:
        config["listeners"].append({"name": "third", "bind": f"{HOST}:{blocker.getsockname()[1]}"})
        config["routes"].insert(0, route("new", ["/new"], None, respond={"status": 204}))
        gw.config_path.write_text(yaml.safe_dump(config))
        answer = gw.admin("POST", "/reload")
        assert answer.status == 400 and "address already in use" in answer.json()["error"]["message"].lower()
        assert gw.request("GET", "/new").status == 200          # still the old routes (`all`)
        assert gw.admin("GET", "/status").json()["config_version"] == 2
    finally:
        blocker.close()

    config["listeners"] = config["listeners"][:1]
    config["routes"] = config["routes"][1:]
    gw.config_path.write_text(yaml.safe_dump(config))
    assert gw.admin("POST", "/reload").status == 200
    assert wait_for(lambda: _get(extra_port) is None)
    assert gw.request("GET", "/x").status == 200


def test_a_second_gateway_cannot_share_a_served_port(gateway, upstream):
    """SO_REUSEPORT would let it bind and split the traffic between two configs: it is refused at
    start, and a reload that adds another gateway's address is refused too."""
    first = gateway(with_admin({**proxy_config(upstream.port), "workers": 2}))
    with pytest.raises(RuntimeError, match=rf"{HOST}:{first.port}: address already in use"):
        gateway(with_admin(proxy_config(upstream.port) | {"listeners": [{"name": "same", "bind": f"{HOST}:{first.port}"}]}))
    assert first.request("GET", "/x").status == 200 and first.alive

    second = gateway(with_admin(proxy_config(upstream.port)))
    config = yaml.safe_load(second.config_path.read_text())
    config["listeners"].append({"name": "taken", "bind": f"{HOST}:{first.port}"})
    second.config_path.write_text(yaml.safe_dump(config))
    answer = second.admin("POST", "/reload")
    assert answer.status == 400
    assert f"{HOST}:{first.port}: address already in use" in answer.json()["error"]["message"]
    # every request on the first gateway's port still reaches the first gateway's workers
    pids = set(first.worker_pids())
    for _ in range(20):
        with first.connect() as conn:
            conn.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.read_response().status == 200
    assert set(first.worker_pids()) == pids and second.alive


def _get(port: int) -> int | None:
    try:
        c = http.client.HTTPConnection(HOST, port, timeout=2)
        c.request("GET", "/x")
        status = c.getresponse().status
        c.close()
        return status
    except OSError:
        return None


def test_reload_keeps_pooled_upstream_connections(gateway, upstream):
    gw = gateway(with_admin(proxy_config(upstream.port)))
    conn = http.client.HTTPConnection(HOST, gw.port, timeout=5)

    def get(path="/x"):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    assert [get() for _ in range(3)] == [200] * 3
    assert upstream.connections_accepted == 1
    # A route change keeps the service's targets and their pooled connection...
    assert gw.admin("PUT", "/routes/extra", route("extra", ["/extra"], "up", priority=1)).status == 200
    time.sleep(1.2)                                  # past the old tables' retirement
    assert [get(), get("/extra")] == [200, 200]
    assert upstream.connections_accepted == 1
    # ...new connection settings build a new pool (the old connection is closed).
    service = gw.admin("GET", "/services/up").json()
    service["timeouts"] = {"read": "20s"}
    assert gw.admin("PUT", "/services/up", service).status == 200
    assert get() == 200
    assert upstream.connections_accepted == 2
    conn.close()


def _open_files_limits(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_get_the_hard_open_files_limit(gateway, upstream):
    """Started with a low soft limit (a shell's usual 1,024), the workers may still hold as many
    connections as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024 or hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit above the usual soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        gw = gateway(with_admin({**proxy_config(upstream.port), "workers": 2}))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [_open_files_limits(pid) for pid in gw.worker_pids()] == [(hard, hard)] * 2
    assert gw.request("GET", "/x").status == 200
