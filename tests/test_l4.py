"""Layer 4 through the gateway: `protocol: tcp` listeners in front of real redis-server processes
and small TCP servers; connect failover, TCP health checks, idle timeout, half-close, and the
PROXY protocol accepted from clients (tcp and http listeners) and sent to targets."""
from __future__ import annotations

import collections
import socket
import struct
import subprocess
import threading
import time

import pytest
import redis

from fastgw._core.proxyproto import ProxyHeaderError, build_proxy_header, parse_proxy_header
from certs import make_ca_and_certs
from upstreams import HOST, RecordingUpstream, describe_request, free_port, gateway_config, route, wait_for

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class LineServer:
    """A TCP server that records what each connection sent and answers with `reply(data)` once
    the client has half-closed (read to EOF, then write, then close)."""

    def __init__(self, reply=lambda data: b"got %d bytes" % len(data)):
        self.reply = reply
        self.received: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.received.append(data)
            conn.sendall(self.reply(data))

    def close(self):
        self.sock.close()


def tcp_config(targets, *, listener=None, **service):
    config = gateway_config({"db": {"targets": [{"address": f"{HOST}:{p}"} for p in targets], **service}}, [])
    port = free_port()
    config["listeners"] = [{"name": "db", "bind": f"{HOST}:{port}", "protocol": "tcp", "service": "db",
                            **(listener or {})}]
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    return config, port


def served_by(port: int) -> int:
    """Which redis-server answered: its TCP port, asked through the gateway."""
    client = redis.Redis(host=HOST, port=port, socket_timeout=5)
    try:
        return int(client.config_get("port")["port"])
    finally:
        client.close()


def exchange(port: int, payload: bytes, *, half_close: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


# --- redis behind a tcp listener -----------------------------------------------------------------

def test_redis_commands_through_a_tcp_listener_balanced_per_connection(gateway, redis_servers):
    a, b = redis_servers(), redis_servers()
    config, port = tcp_config([a.port, b.port], balance={"algorithm": "round_robin"})
    config["workers"] = 1
    gateway(config)
    client = redis.Redis(host=HOST, port=port, socket_timeout=5)
    assert client.set("greeting", "hello") is True
    assert client.get("greeting") == b"hello"           # the same connection: the same target
    pipe = client.pipeline()
    for i in range(100):
        pipe.incr("counter")
    assert pipe.execute()[-1] == 100
    client.close()
    assert collections.Counter(served_by(port) for _ in range(10)) == {a.port: 5, b.port: 5}


def test_least_conn_spreads_open_connections(gateway, redis_servers):
    a, b = redis_servers(), redis_servers()
    config, port = tcp_config([a.port, b.port], balance={"algorithm": "least_conn"})
    gw = gateway(config)
    held = [socket.create_connection((HOST, port)) for _ in range(6)]
    for sock in held:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
    health = {t["address"]: t for t in gw.admin("GET", "/services/db/health").json()["targets"]}
    assert [health[f"{HOST}:{s.port}"]["active"] for s in (a, b)] == [3, 3]
    for sock in held:
        sock.close()
    assert wait_for(lambda: all(t["active"] == 0 for t in
                                gw.admin("GET", "/services/db/health").json()["targets"]), timeout=5)


def test_connect_failure_fails_over_to_another_target(gateway, redis_servers):
    live = redis_servers()
    dead = free_port()
    config, port = tcp_config([dead, live.port], balance={"algorithm": "round_robin"})
    config["workers"] = 1
    gw = gateway(config)
    assert [served_by(port) for _ in range(6)] == [live.port] * 6
    retries_off, port2 = tcp_config([dead, live.port], balance={"algorithm": "round_robin"},
                                    retries={"attempts": 0})
    retries_off["workers"] = 1
    gateway(retries_off)
    outcomes = collections.Counter()
    for _ in range(6):                                  # raw sockets: redis-py would reconnect
        with socket.create_connection((HOST, port2), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            outcomes[sock.recv(64) or "closed"] += 1
    assert outcomes == {b"+PONG\r\n": 3, "closed": 3}
    assert gw.tracebacks() == 0


def test_tcp_health_check_takes_a_dead_redis_out_and_back(gateway, redis_servers):
    a, b = redis_servers(), redis_servers()
    config, port = tcp_config([a.port, b.port], balance={"algorithm": "round_robin"}, retries={"attempts": 0},
                              health={"active": {"type": "tcp", "interval": "100ms", "timeout": "100ms",
                                                 "healthy_threshold": 1, "unhealthy_threshold": 1}})
    gw = gateway(config)
    b_port = b.port
    b.stop()
    assert wait_for(lambda: not {t["address"]: t for t in gw.admin("GET", "/services/db/health").json()
                                 ["targets"]}[f"{HOST}:{b_port}"]["healthy"], timeout=5)
    assert {served_by(port) for _ in range(8)} == {a.port}     # no connection tried on the dead one
    redis_servers(b_port)
    assert wait_for(lambda: {served_by(port) for _ in range(6)} == {a.port, b_port}, timeout=5)


# --- byte stream behaviour -----------------------------------------------------------------------

def test_half_close_reaches_the_target_and_the_answer_still_comes_back(gateway):
    server = LineServer()
    try:
        config, port = tcp_config([server.port])
        gateway(config)
        payload = bytes(range(256)) * 4096                  # 1 MiB, binary
        assert exchange(port, payload) == b"got 1048576 bytes"
        assert server.received == [payload]
    finally:
        server.close()


def test_idle_connection_is_closed_after_the_listener_idle_timeout(gateway, redis_servers):
    a = redis_servers()
    config, port = tcp_config([a.port], listener={"limits": {"idle_timeout": "300ms"}})
    gateway(config)
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        started = time.monotonic()
        assert sock.recv(64) == b""                          # closed by the gateway, not by redis
        assert 0.25 < time.monotonic() - started < 2.0


def test_a_closed_target_closes_the_client(gateway):
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(4)
    try:
        config, port = tcp_config([sock.getsockname()[1]])
        gateway(config)
        with socket.create_connection((HOST, port), timeout=5) as client:
            conn, _ = sock.accept()
            conn.sendall(b"bye")
            conn.close()
            assert client.recv(64) == b"bye"
            assert client.recv(64) == b""
    finally:
        sock.close()


# --- PROXY protocol ------------------------------------------------------------------------------

def read_v2(data: bytes) -> tuple[str, int, bytes]:
    """Decode a PROXY v2 TCP4 header by the spec (independently of the gateway's parser)."""
    assert data[:12] == V2_SIGNATURE and data[12] == 0x21 and data[13] == 0x11
    length = struct.unpack(">H", data[14:16])[0]
    block = data[16:16 + length]
    return socket.inet_ntoa(block[:4]), struct.unpack(">H", block[8:10])[0], data[16 + length:]


def test_proxy_header_accepted_from_the_client_and_sent_to_the_target_as_v2(gateway):
    server = LineServer(reply=lambda data: b"ok")
    try:
        config, port = tcp_config([server.port], listener={"proxy_protocol": True}, send_proxy_protocol="v2")
        gateway(config)
        assert exchange(port, b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\nhello") == b"ok"
        source, source_port, rest = read_v2(server.received[0])
        assert (source, source_port, rest) == ("203.0.113.7", 5555, b"hello")
        # Sent in pieces, v2 in: the same.
        v2 = build_proxy_header(2, ("198.51.100.4", 4000), ("10.0.0.1", 443))
        with socket.create_connection((HOST, port), timeout=5) as sock:
            for piece in (v2[:5], v2[5:20], v2[20:] + b"wor", b"ld"):
                sock.sendall(piece)
                time.sleep(0.02)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(16) == b"ok"
        assert wait_for(lambda: len(server.received) == 2)
        assert read_v2(server.received[1]) == ("198.51.100.4", 4000, b"world")
    finally:
        server.close()


def test_proxy_v1_sent_to_the_target_names_the_real_peer(gateway):
    server = LineServer(reply=lambda data: b"ok")
    try:
        config, port = tcp_config([server.port], send_proxy_protocol="v1")
        gateway(config)
        with socket.create_connection((HOST, port), timeout=5) as sock:
            own_port = sock.getsockname()[1]
            sock.sendall(b"data")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(16) == b"ok"
        assert server.received == [f"PROXY TCP4 127.0.0.1 127.0.0.1 {own_port} {port}\r\n".encode() + b"data"]
    finally:
        server.close()


def test_a_listener_that_expects_proxy_closes_connections_without_it(gateway):
    server = LineServer()
    try:
        config, port = tcp_config([server.port], listener={"proxy_protocol": True})
        gateway(config)
        assert exchange(port, b"GET / HTTP/1.1\r\n\r\n") == b""
        time.sleep(0.1)
        assert server.received == []                          # nothing reached the target
    finally:
        server.close()


def test_http_listener_takes_the_client_address_from_the_proxy_header(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(handler=lambda req: describe_request(req, "u")))
    config = gateway_config({"u": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("all", ["/**"], "u")])
    config["listeners"][0]["proxy_protocol"] = True
    gw = gateway(config)
    header = build_proxy_header(2, ("203.0.113.9", 40000), ("10.0.0.1", 80))
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:
        sock.sendall(header + b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].header("x-forwarded-for") == "203.0.113.9"
    assert gw.access_log_lines(1)[0]["client_ip"] == "203.0.113.9"
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:   # no header: closed
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(64) == b""
    assert len(upstream.requests) == 1


def test_proxy_header_parser_edge_cases():
    line = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
    assert parse_proxy_header(line + b"rest") == (len(line), ("2001:db8::1", 1))
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, None)
    assert parse_proxy_header(b"PROXY TCP4 1.2.3.4") == (0, None)        # incomplete
    assert parse_proxy_header(b"PRO") == (0, None)
    assert parse_proxy_header(V2_SIGNATURE[:7]) == (0, None)
    local = V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    assert parse_proxy_header(local + b"x") == (16, None)                # LOCAL: the real peer
    v6 = build_proxy_header(2, ("2001:db8::7", 9), ("2001:db8::1", 443))
    assert parse_proxy_header(v6) == (len(v6), ("2001:db8::7", 9))
    mixed = build_proxy_header(1, ("10.1.2.3", 9), ("::1", 443))
    assert mixed == b"PROXY TCP6 ::ffff:a01:203 ::1 9 443\r\n"       # v4 said as v4-mapped v6
    for bad in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
                b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
                b"PROXY " + b"x" * 120, V2_SIGNATURE[:11] + b"X",
                V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12),
                V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4)):
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(bad)


def test_tcp_listener_config_errors(tmp_path):
    import sys

    import yaml

    def check(config):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                             capture_output=True, text=True)
        return out.returncode, out.stdout + out.stderr
    config, _ = tcp_config([free_port()])
    del config["listeners"][0]["service"]
    code, text = check(config)
    assert code != 0 and "listeners[0].service" in text and "needs the service" in text
    config, _ = tcp_config([free_port()])
    config["listeners"][0]["service"] = "nope"
    code, text = check(config)
    assert code != 0 and "unknown service 'nope'" in text
    routed = gateway_config({"u": {"targets": [{"address": f"{HOST}:1"}], "send_proxy_protocol": "v2"}},
                            [route("all", ["/**"], "u")])
    code, text = check(routed)
    assert code != 0 and "services.u.send_proxy_protocol" in text
    config, _ = tcp_config([free_port()])
    config["listeners"][0]["protocol"] = "https"
    code, text = check(config)
    assert code != 0 and "listeners[0].tls.certificates" in text and "needs at least one certificate" in text
    config["listeners"][0]["tls"] = {"passthrough": True, "sni_routes": {"Bad_Name": "db", "ok.test": "nope"}}
    code, text = check(config)
    assert "listeners[0].tls.sni_routes.Bad_Name" in text and "unknown service 'nope'" in text


# --- TLS passthrough by SNI ----------------------------------------------------------------------

class TlsServer:
    """A TLS server (Python ssl) that answers every connection with its own name."""

    def __init__(self, name, cert_file, key_file):
        import ssl
        self.name = name
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(f"this is {self.name}".encode())
            except OSError:
                pass                                  # the client refused our certificate
            finally:
                conn.close()

    def close(self):
        self.sock.close()


def tls_hello(port, ca_file, server_name):
    """Connect with TLS through the gateway: (what the server said, the CN of its certificate)."""
    import ssl
    context = ssl.create_default_context(cafile=str(ca_file))
    if server_name is None:
        context.check_hostname = False
    with socket.create_connection((HOST, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
            return tls.recv(64).decode(), subject["commonName"]


def test_tls_passthrough_routes_by_sni_without_terminating(gateway, tmp_path):
    ca_file, certs = make_ca_and_certs(tmp_path, ["api.test", "shop.test", "default.test"])
    servers = {name: TlsServer(name, *certs[name]) for name in certs}
    try:
        services = {name.split(".")[0]: {"targets": [{"address": f"{HOST}:{s.port}"}]}
                    for name, s in servers.items()}
        config = gateway_config(services, [])
        port = free_port()
        config["listeners"] = [{"name": "tls", "bind": f"{HOST}:{port}", "protocol": "https", "service": "default",
                                "tls": {"passthrough": True,
                                        "sni_routes": {"api.test": "api", "*.shop.test": "shop"}}}]
        gateway(config)
        # The certificate the client verifies is the backend's own: TLS went through untouched.
        assert tls_hello(port, ca_file, "api.test") == ("this is api.test", "api.test")
        # A name no route knows, and no SNI at all, go to the default service.
        assert tls_hello(port, ca_file, None) == ("this is default.test", "default.test")
        import ssl
        with pytest.raises(ssl.SSLCertVerificationError):      # www.shop.test -> shop, whose cert is for shop.test
            tls_hello(port, ca_file, "www.shop.test")
        assert exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""   # not TLS: closed
    finally:
        for s in servers.values():
            s.close()


def test_sni_reader_on_split_and_broken_hellos():
    import ssl

    from fastgw._core.sni import SniError, read_sni
    hello = client_hello("api.example.com")
    assert read_sni(hello) == (True, "api.example.com")
    # One spelling of a name, as for Host: lower-cased, without the trailing dot
    assert read_sni(client_hello("API.Example.COM.")) == (True, "api.example.com")
    for cut in (0, 3, 5, 40, len(hello) - 1):
        assert read_sni(hello[:cut]) == (False, None)
    # The same ClientHello split over two handshake records.
    body = hello[5:]
    two = b"\x16\x03\x01" + struct.pack(">H", 10) + body[:10] + b"\x16\x03\x01" + struct.pack(">H", len(body) - 10) + body[10:]
    assert read_sni(two) == (True, "api.example.com")
    assert read_sni(client_hello(None)) == (True, None)
    for bad in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", b"\x17\x03\x03\x00\x01x"):
        with pytest.raises(SniError):
            read_sni(bad)
    assert ssl  # the hellos above come from Python's own TLS stack


def client_hello(server_name):
    """A real ClientHello from Python's ssl module, captured with memory BIOs."""
    import ssl
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()
