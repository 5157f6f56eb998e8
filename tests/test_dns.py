"""Targets named by DNS, against a real dnsmasq on loopback (fastgw/server/dns.py).

The fixture starts `/usr/sbin/dnsmasq` on 127.0.0.1 and a free port, answering only from a hosts
file it rereads on SIGHUP (with a 1 s TTL); every name the tests ask about is under `.test`,
which dnsmasq answers itself (NXDOMAIN for unknown ones), so no query leaves the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from upstreams import RecordingUpstream, Reply, assert_error, free_port, gateway_config, route, wait_for

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not os.path.exists(DNSMASQ), reason="dnsmasq is not installed")

# Bounds the tests put on re-resolution: the record TTL is 1 s, re-resolved at most every second.
FAST_DNS = {"min_ttl": "200ms", "max_ttl": "1s", "timeout": "1s"}


class Dnsmasq:
    """dnsmasq answering for `.test` from a hosts file: `set(name, [ip, ...])` rewrites it."""

    def __init__(self, workdir: Path, srv: list[str] = ()):
        self.hosts_path = workdir / "dns-hosts"
        self.records: dict[str, list[str]] = {}
        self.hosts_path.write_text("")
        self.port = _free_udp_and_tcp_port()
        self.log_path = workdir / "dnsmasq.log"
        args = [DNSMASQ, "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", "--local=/test/",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                f"--addn-hosts={self.hosts_path}", "--local-ttl=1", "--pid-file=", "--user=root",
                "--log-facility=-", *(f"--srv-host={s}" for s in srv)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if not wait_for(lambda: "started" in self.log_path.read_text() or self.proc.poll() is not None, 5):
            self.stop()
            raise RuntimeError("dnsmasq did not start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {self.log_path.read_text()}")

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, ips: list[str]) -> None:
        self.records[name] = list(ips)
        self.hosts_path.write_text("".join(f"{ip} {n}\n" for n, addrs in self.records.items() for ip in addrs))
        self.proc.send_signal(signal.SIGHUP)          # dnsmasq rereads --addn-hosts files
        time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_udp_and_tcp_port() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


@pytest.fixture
def dnsmasq(tmp_path):
    servers = []

    def start(srv: list[str] = ()) -> Dnsmasq:
        servers.append(Dnsmasq(tmp_path, srv))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()


def loopback_upstreams(start_upstream, hosts: list[str], handler=None) -> list[RecordingUpstream]:
    """One upstream per loopback address, all on the same port."""
    for _ in range(20):
        first = RecordingUpstream(handler, name=hosts[0], host=hosts[0])
        servers = [first]
        try:
            servers += [RecordingUpstream(handler, name=h, host=h, port=first.port) for h in hosts[1:]]
        except OSError:                   # the port is taken on another address: try another
            for s in servers:
                s._listener.close()
            continue
        return [start_upstream(s) for s in servers]
    raise RuntimeError("no port free on every loopback address")


def dns_config(service: dict, resolver: str, *, admin: bool = True, **dns) -> dict:
    config = gateway_config({"up": service}, [route("all", ["/**"], "up")])
    config["dns"] = {"resolvers": [resolver], **FAST_DNS, **dns}
    if admin:
        config["admin"] = {"bind": f"127.0.0.1:{free_port()}"}
    return config


def served_by(gw, n: int, method: str = "GET") -> Counter:
    seen = Counter()
    for _ in range(n):
        resp = gw.request(method, "/x")
        assert resp.status == 200, (resp.status, resp.body[:200])
        seen[json.loads(resp.body)["server"] if method == "GET" else "?"] += 1
    return seen


def health_rows(gw) -> list[dict]:
    resp = gw.admin("GET", "/services/up/health")
    assert resp.status == 200, resp.body
    return resp.json()["targets"]


def test_a_name_with_three_a_records_spreads_over_all_three(gateway, start_upstream, dnsmasq):
    server = dnsmasq()
    ups = loopback_upstreams(start_upstream, ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    server.set("multi.test", ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    gw = gateway(dns_config({"targets": [{"address": f"multi.test:{ups[0].port}", "weight": 3}],
                             "balance": {"algorithm": "round_robin"}}, server.resolver))
    # Round robin over one target per address: each address gets exactly its share.
    assert served_by(gw, 30) == {"127.0.0.1": 10, "127.0.0.2": 10, "127.0.0.3": 10}
    rows = health_rows(gw)
    assert [r["address"] for r in rows] == [f"127.0.0.{i}:{ups[0].port}" for i in (1, 2, 3)]
    # Kong's choice: the configured weight is each address's weight, not split between them.
    assert {(r["name"], r["dns"], r["weight"], r["healthy"]) for r in rows} == \
        {(f"multi.test:{ups[0].port}", "resolved", 3, True)}


def test_the_dns_form_and_a_hosts_file_name_side_by_side(gateway, start_upstream, dnsmasq):
    """`dns: {name, port}` resolves through the resolvers; `localhost` (not known to dnsmasq,
    which refuses it) comes from /etc/hosts first, like glibc's "files dns"."""
    server = dnsmasq()
    ups = loopback_upstreams(start_upstream, ["127.0.0.1", "127.0.0.2"])
    server.set("two.test", ["127.0.0.2"])
    gw = gateway(dns_config({"targets": [{"dns": {"name": "two.test", "port": ups[0].port}},
                                         {"address": f"localhost:{ups[0].port}"}],
                             "balance": {"algorithm": "round_robin"}}, server.resolver))
    assert served_by(gw, 10) == {"127.0.0.1": 5, "127.0.0.2": 5}
    assert served_by(gw, 4, "HEAD") == {"?": 4}
    assert {(r["name"], r["address"]) for r in health_rows(gw)} == \
        {(f"two.test:{ups[0].port}", f"127.0.0.2:{ups[0].port}"),
         (f"localhost:{ups[0].port}", f"127.0.0.1:{ups[0].port}")}


def test_changed_records_move_traffic_with_no_failed_request(gateway, start_upstream, dnsmasq):
    def slow(req):                      # so that requests are in flight on the address dropped
        time.sleep(0.05)
        return Reply(200, [("Content-Type", "application/json")],
                     json.dumps({"server": req.conn_id}).encode())

    server = dnsmasq()
    ups = loopback_upstreams(start_upstream, ["127.0.0.1", "127.0.0.2", "127.0.0.3"], slow)
    one, two, three = ups
    server.set("moving.test", ["127.0.0.1", "127.0.0.2"])
    config = dns_config({"targets": [{"address": f"moving.test:{one.port}"}],
                         "balance": {"algorithm": "round_robin"}}, server.resolver)
    config["workers"] = 2               # both switch, from the one resolution in the supervisor
    gw = gateway(config)
    statuses: list[int] = []
    stop = threading.Event()

    def load(keep_alive: bool):
        import http.client
        conn = None
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
            try:
                conn.request("GET", "/load")
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
            except OSError as exc:
                statuses.append(repr(exc))
                conn.close()
                conn = None
                continue
            if not keep_alive:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    clients = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(4)]
    for c in clients:
        c.start()
    try:
        assert wait_for(lambda: one.requests and two.requests, 5)
        server.set("moving.test", ["127.0.0.2", "127.0.0.3"])      # drop one, add one
        changed = time.monotonic()
        assert wait_for(lambda: three.complete_requests, 5), "the added address got no traffic"
        moved_after = time.monotonic() - changed
        time.sleep(0.3)                 # requests in flight on the dropped address finish
        dropped_count = len(one.requests)
        time.sleep(1.0)
        assert len(one.requests) == dropped_count, "the dropped address still gets requests"
        assert len(three.requests) > 5 and len(two.requests) > 5
    finally:
        stop.set()
        for c in clients:
            c.join(10)
    assert moved_after < 3.0            # TTL 1 s, max_ttl 1 s: within the bound plus one apply
    failed = [s for s in statuses if s != 200]
    assert statuses and not failed, f"{len(failed)} of {len(statuses)} requests failed: {failed[:5]}"
    assert {r["address"] for r in health_rows(gw)} == {f"127.0.0.{i}:{one.port}" for i in (2, 3)}


def test_an_unresolvable_name_is_503_df_unresolved_and_a_check_warning(gateway, start_upstream, dnsmasq,
                                                                       tmp_path):
    server = dnsmasq()
    up = start_upstream(RecordingUpstream(host="127.0.0.1"))
    gw = gateway(dns_config({"targets": [{"dns": {"name": "missing.test", "port": up.port}}]},
                            server.resolver))
    for method in ("GET", "HEAD"):
        resp = gw.request(method, "/x")
        if method == "GET":
            err = assert_error(resp, 503, "upstream_unresolved")
            assert "DNS" in err["message"]
        else:
            assert resp.status == 503
    lines = gw.access_log_lines(2)
    assert [line["flags"] for line in lines[:2]] == ["DF", "DF"]
    assert up.requests == []
    assert health_rows(gw) == [{"address": None, "name": f"missing.test:{up.port}", "dns": "unresolved",
                                "healthy": False, "ejected": False, "circuit": "closed", "active": 0,
                                "ewma_ms": None, "weight": 1, "draining": False}]
    assert "missing.test (A) does not resolve" in gw.stderr_text()

    # `fastgw check` warns (exit 0), naming the file, the line and the key.
    check = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(gw.config_path)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    line = next(n for n, text in enumerate(gw.config_path.read_text().splitlines(), 1) if "missing.test" in text)
    assert f"{gw.config_path}:{line}: services.up.targets[0].dns.name: warning: missing.test (A) does not " \
           f"resolve (no such name (NXDOMAIN))" in check.stdout, check.stdout
    assert check.stdout.rstrip().endswith(": ok")

    # Once the name resolves, the target comes to life without a reload.
    server.set("missing.test", ["127.0.0.1"])
    assert wait_for(lambda: gw.request("GET", "/x").status == 200, 5)
    assert [r["dns"] for r in health_rows(gw)] == ["resolved"]
    assert len(up.complete_requests) >= 1


def test_a_failed_re_resolution_keeps_the_last_addresses(gateway, start_upstream, dnsmasq):
    server = dnsmasq()
    up = start_upstream(RecordingUpstream(host="127.0.0.1"))
    server.set("flaky.test", ["127.0.0.1"])
    gw = gateway(dns_config({"targets": [{"address": f"flaky.test:{up.port}"}]}, server.resolver))
    assert gw.request("GET", "/x").status == 200
    server.stop()                                   # the resolver goes away: stale, still served
    assert wait_for(lambda: [r["dns"] for r in health_rows(gw)] == ["stale"], 5)
    assert [gw.request("GET", "/x").status for _ in range(5)] == [200] * 5
    assert "keeping its last addresses" in gw.stderr_text()


def test_srv_records_give_the_port(gateway, start_upstream, dnsmasq):
    up = start_upstream(RecordingUpstream(host="127.0.0.1"))
    other = start_upstream(RecordingUpstream(host="127.0.0.1"))
    # Two records at priority 0 (used) and one at priority 10 (a fallback, not used).
    server = dnsmasq([f"_http._tcp.svc.test,a.test,{up.port},0,5", f"_http._tcp.svc.test,a.test,{other.port},0,5",
                      f"_http._tcp.svc.test,a.test,{free_port()},10,5"])
    server.set("a.test", ["127.0.0.1"])
    gw = gateway(dns_config({"targets": [{"dns": {"name": "_http._tcp.svc.test", "type": "SRV"}}],
                             "balance": {"algorithm": "round_robin"}}, server.resolver))
    for _ in range(6):
        assert gw.request("GET", "/x").status == 200
    assert len(up.complete_requests) == 3 and len(other.complete_requests) == 3
    assert sorted(r["address"] for r in health_rows(gw)) == sorted(f"127.0.0.1:{p}" for p in (up.port, other.port))


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_aaaa_records_over_ipv6_loopback(gateway, start_upstream, dnsmasq):
    server = dnsmasq()
    up = start_upstream(RecordingUpstream(host="::1"))
    server.set("six.test", ["::1"])
    gw = gateway(dns_config({"targets": [{"dns": {"name": "six.test", "port": up.port, "type": "AAAA"}}]},
                            server.resolver))
    assert gw.request("GET", "/x").status == 200
    assert len(up.complete_requests) == 1
    assert [r["address"] for r in health_rows(gw)] == [f"[::1]:{up.port}"]


@pytest.mark.parametrize("target, dns, key, message", [
    ({"dns": {"name": "a.test"}}, {}, "services.up.targets[0].dns.port", "type A needs a port"),
    ({"dns": {"name": "_x._tcp.a.test", "type": "SRV", "port": 80}}, {}, "services.up.targets[0].dns.port",
     "an SRV record gives the port"),
    ({"address": "a.test:80", "dns": {"name": "a.test", "port": 80}}, {}, "services.up.targets[0]",
     "either an address"),
    ({"dns": {"name": "bad name", "port": 80}}, {}, "services.up.targets[0].dns.name", "is not a host name"),
    ({"address": "127.0.0.1:80"}, {"resolvers": ["dns.example:53"]}, "dns.resolvers[0]",
     "a resolver cannot be a name"),
    ({"address": "127.0.0.1:80"}, {"min_ttl": "10s", "max_ttl": "1s"}, "dns.max_ttl", "not be less than"),
])
def test_dns_keys_are_checked(tmp_path, target, dns, key, message):
    config = gateway_config({"up": {"targets": [target]}}, [route("all", ["/**"], "up")])
    if dns:
        config["dns"] = dns
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    check = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert check.returncode == 1
    assert any(line.startswith(f"{path}:") and f" {key}: " in line and message in line
               for line in check.stdout.splitlines()), check.stdout


def test_an_https_target_named_by_dns_is_verified_under_its_name(gateway, dnsmasq, tmp_path):
    """SNI and certificate verification (proxy and active health check) use the DNS name, not
    the resolved address the connection goes to."""
    from certs import make_ca_and_certs
    from test_tls import TlsHttpUpstream

    ca, certs = make_ca_and_certs(tmp_path, ["backend.test"])
    backend = TlsHttpUpstream(*certs["backend.test"])
    try:
        server = dnsmasq()
        server.set("backend.test", ["127.0.0.1"])
        gw = gateway(dns_config({"scheme": "https", "tls": {"ca": str(ca)},
                                 "targets": [{"address": f"backend.test:{backend.port}"}],
                                 "health": {"active": {"path": "/healthz", "interval": "200ms", "timeout": "200ms",
                                                       "unhealthy_threshold": 1}}},
                                server.resolver))
        resp = gw.request("GET", "/x")
        assert resp.status == 200 and resp.json()["path"] == "/x"
        time.sleep(1.0)                 # several checks: a failing one would mark it down
        assert [(r["address"], r["healthy"]) for r in health_rows(gw)] == \
            [(f"127.0.0.1:{backend.port}", True)]
    finally:
        backend.close()


def test_a_name_added_through_the_admin_api_is_resolved_before_it_applies(gateway, start_upstream, dnsmasq):
    server = dnsmasq()
    one, two = loopback_upstreams(start_upstream, ["127.0.0.1", "127.0.0.2"])
    server.set("late.test", ["127.0.0.2"])
    gw = gateway(dns_config({"targets": [{"address": f"127.0.0.1:{one.port}"}],
                             "balance": {"algorithm": "round_robin"}}, server.resolver))
    assert served_by(gw, 2) == {"127.0.0.1": 2}
    resp = gw.admin("POST", "/services/up/targets", {"address": f"late.test:{one.port}"})
    assert resp.status == 200, resp.body
    assert served_by(gw, 4) == {"127.0.0.1": 2, "127.0.0.2": 2}      # at once: resolved first
    resp = gw.admin("DELETE", f"/services/up/targets/late.test:{one.port}")
    assert resp.status == 200, resp.body
    assert served_by(gw, 4) == {"127.0.0.1": 4}
    assert [r["address"] for r in health_rows(gw)] == [f"127.0.0.1:{one.port}"]
