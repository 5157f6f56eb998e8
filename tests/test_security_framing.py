"""What the backend receives is exactly what the edge checked: the PROXY protocol only from trusted
peers and strictly parsed, request bodies that always end (or time out), upstream responses that
never spill into the next exchange, header names that alias framing fields, and an access log
that cannot be forged through the request."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from fastgw._core.proxyproto import ProxyHeaderError, build_proxy_header, parse_proxy_header
from test_l4 import LineServer, exchange, tcp_config
from upstreams import (HOST, RecordingUpstream, ScriptedUpstream, assert_error, describe_request,
                       gateway_config, get_request, parse_responses, proxy_config, route, wait_for)

INJECTION = b"PROXY TCP6 ::1%a\nX-Injected:yes ::1 1234 80\r\n"
SMUGGLING = b"PROXY TCP6 ::1%a\r\n\r\nGET\t/smuggled ::1 1234 80\r\n"
GET_CLOSE = b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def read_all(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send `payload` and read until the gateway closes (or resets: a refused connection)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        data = b""
        try:
            sock.sendall(payload)
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return data


def http_proxy_gateway(gateway, start_upstream, proxy_protocol):
    upstream = start_upstream(RecordingUpstream(handler=lambda req: describe_request(req, "u")))
    config = gateway_config({"u": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("all", ["/**"], "u")])
    config["listeners"][0]["proxy_protocol"] = proxy_protocol
    return gateway(config), upstream


# --- PROXY protocol: strict parsing --------------------------------------------------------------

@pytest.mark.parametrize("line", [
    INJECTION, SMUGGLING,
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",                 # zone ids are not in the spec
    b"PROXY TCP4 1.2.3.4%1 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",                 # exactly single spaces
    b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",                 # ports: decimal, no sign
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",           # a non-ASCII digit int() would take
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                    # CRLF, not LF
    b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n",                      # family mismatch
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n",
    b"PROXY UNKNOWN" + b" x" * 50 + b"\r\n",                 # over 107 bytes
])
def test_proxy_v1_lines_outside_the_spec_are_refused(line):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(line + b"GET / HTTP/1.1\r\n\r\n")


def test_proxy_addresses_come_back_in_canonical_form():
    line = b"PROXY TCP6 2001:DB8:0:0::1 ::1 65535 0\r\n"
    assert parse_proxy_header(line) == (len(line), ("2001:db8::1", 65535))
    assert parse_proxy_header(b"PROXY UNKNOWN whatever here\r\n") == (29, None)
    v2 = build_proxy_header(2, ("2001:db8::7", 9), ("2001:db8::1", 443))
    tlv = b"\x04\x00\x03abc"                                  # a TLV after the addresses: skipped
    with_tlv = v2[:14] + (len(v2) - 16 + len(tlv)).to_bytes(2, "big") + v2[16:] + tlv
    assert parse_proxy_header(with_tlv + b"GET") == (len(with_tlv), ("2001:db8::7", 9))


def test_http_listener_refuses_an_injecting_proxy_line(gateway, start_upstream):
    gw, upstream = http_proxy_gateway(gateway, start_upstream, True)
    for line in (INJECTION, SMUGGLING):
        assert read_all(gw.port, line + GET_CLOSE) == b""
    time.sleep(0.2)
    assert upstream.requests == []
    # A valid header still works, and its address is what the upstream sees.
    answer = read_all(gw.port, b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 80\r\n" + GET_CLOSE)
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].header("x-forwarded-for") == "203.0.113.9"
    assert "x-injected" not in upstream.requests[0].header_names()


def test_tcp_listener_refuses_an_injecting_proxy_line(gateway):
    server = LineServer(reply=lambda data: b"ok")
    try:
        config, port = tcp_config([server.port], listener={"proxy_protocol": True}, send_proxy_protocol="v1")
        gateway(config)
        assert read_all(port, INJECTION + b"hello") == b""
        time.sleep(0.2)
        assert server.received == []
    finally:
        server.close()


# --- PROXY protocol: trusted peers ---------------------------------------------------------------

def test_http_listener_refuses_proxy_headers_from_untrusted_peers(gateway, start_upstream):
    gw, upstream = http_proxy_gateway(gateway, start_upstream, {"trusted": ["10.0.0.0/8"]})
    assert read_all(gw.port, b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 80\r\n" + GET_CLOSE) == b""
    assert read_all(gw.port, GET_CLOSE) == b""
    time.sleep(0.2)
    assert upstream.requests == []


def test_http_listener_takes_proxy_headers_from_trusted_peers(gateway, start_upstream):
    gw, upstream = http_proxy_gateway(gateway, start_upstream, {"trusted": ["10.0.0.0/8", "127.0.0.1/32"]})
    answer = read_all(gw.port, b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 80\r\n" + GET_CLOSE)
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].header("x-forwarded-for") == "203.0.113.9"


def test_http_listener_reads_untrusted_peers_as_plain_http(gateway, start_upstream):
    gw, upstream = http_proxy_gateway(gateway, start_upstream,
                                      {"trusted": ["10.0.0.0/8"], "untrusted": "plain"})
    answer = read_all(gw.port, GET_CLOSE)
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].header("x-forwarded-for") == "127.0.0.1"
    # From an untrusted peer a PROXY line is not a header: it is a (bad) request line.
    answer = read_all(gw.port, b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 80\r\n" + GET_CLOSE)
    assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5")
    time.sleep(0.2)
    assert len(upstream.requests) == 1


def test_tcp_listener_trusted_peers_and_plain_option(gateway):
    server = LineServer(reply=lambda data: b"ok")
    try:
        config, port = tcp_config([server.port], listener={"proxy_protocol": {"trusted": ["10.0.0.0/8"]}})
        gw = gateway(config)
        assert read_all(port, b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 80\r\nhello") == b""
        assert read_all(port, b"hello") == b""
        time.sleep(0.2)
        assert server.received == []
        gw.stop()
        config, port = tcp_config([server.port], send_proxy_protocol="v1",
                                  listener={"proxy_protocol": {"trusted": ["10.0.0.0/8"], "untrusted": "plain"}})
        gateway(config)
        assert exchange(port, b"hello") == b"ok"
        assert wait_for(lambda: server.received)
        assert server.received[0].startswith(b"PROXY TCP4 127.0.0.1 ") and server.received[0].endswith(b"\r\nhello")
    finally:
        server.close()


def test_proxy_protocol_config_errors_name_the_key(tmp_path):
    config, _ = tcp_config([1], listener={"proxy_protocol": {"trusted": ["10.0.0.0/33"]}})
    import yaml
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "listeners[0].proxy_protocol.trusted[0]" in out.stdout + out.stderr
    config["listeners"][0]["proxy_protocol"] = {"trusted": ["10.0.0.0/8"], "untrusted": "maybe"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "untrusted" in out.stdout + out.stderr


# --- request bodies ------------------------------------------------------------------------------

def test_empty_chunked_body_reaches_the_upstream_complete(gateway, upstream):
    gw = gateway(proxy_config(upstream.port))
    with gw.connect() as c:
        started = time.monotonic()
        resp = c.request(b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert resp.status == 200 and time.monotonic() - started < 2
        # The terminator in a later read than the head: the same.
        c.send(b"POST /e2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.1)
        c.send(b"0\r\n\r\n")
        assert c.read_final().status == 200
    assert [r.complete for r in upstream.requests] == [True, True]
    assert upstream.requests[0].raw.endswith(b"0\r\n\r\n")


BODY_LIMITS = {"body_timeout": "1s"}


def stalled_body(c, path="/slow"):
    c.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc".encode())
    started = time.monotonic()
    resp = c.read_final(timeout=5)
    return resp, time.monotonic() - started


def test_stalled_body_on_a_proxied_route_gets_408(gateway, upstream):
    gw = gateway(proxy_config(upstream.port, limits=BODY_LIMITS))
    with gw.connect() as c:
        resp, elapsed = stalled_body(c)
        assert_error(resp, 408, "request_timeout")
        assert 0.8 <= elapsed < 3
        assert c.wait_closed()
    assert wait_for(lambda: upstream.requests and upstream.requests[0].done.is_set())
    assert upstream.requests[0].body == b"abc" and not upstream.requests[0].complete
    assert gw.request("GET", "/next").status == 200
    assert upstream.connections_accepted == 2              # the cut connection was not reused


def test_a_body_that_keeps_coming_is_not_cut(gateway, upstream):
    gw = gateway(proxy_config(upstream.port, limits=BODY_LIMITS))
    with gw.connect() as c:
        c.send(b"POST /trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        for byte in b"abcd":
            time.sleep(0.5)
            c.send(bytes([byte]))
        assert c.read_final().status == 200
    assert upstream.requests[0].body == b"abcd"


def test_stalled_body_on_an_echo_route_gets_408(gateway):
    gw = gateway(gateway_config({"echo": {"kind": "echo"}}, [route("echo", ["/**"], "echo")], BODY_LIMITS))
    with gw.connect() as c:
        resp, elapsed = stalled_body(c)
        assert_error(resp, 408, "request_timeout")
        assert 0.8 <= elapsed < 3
        assert c.wait_closed()
    assert gw.request("POST", "/ok", body=b"x").status == 200


def test_stalled_body_on_an_aggregate_route_gets_408(gateway, upstream):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("agg", ["/agg"], aggregate={"backends": [
                                {"service": "up", "path": "/part", "into": "part"}]})], BODY_LIMITS)
    gw = gateway(config)
    with gw.connect() as c:
        resp, elapsed = stalled_body(c, "/agg")
        assert_error(resp, 408, "request_timeout")
        assert 0.8 <= elapsed < 3
    assert upstream.requests == []


# --- upstream framing ----------------------------------------------------------------------------

INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
LEGIT = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlegit"


@pytest.mark.parametrize("method,first", [
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + INJECTED),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok" + INJECTED),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n" + INJECTED),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + INJECTED),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 8\r\n\r\n" + INJECTED),
    ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\nnot http at all"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + INJECTED),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n" + INJECTED),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + INJECTED),
], ids=["length", "length-parsed", "204-length", "204", "304-length", "304-garbage", "head-0",
        "head-8", "chunked"])
def test_bytes_after_an_upstream_response_are_never_the_next_answer(gateway, start_upstream, method, first):
    upstream = start_upstream(ScriptedUpstream([first, LEGIT]))
    gw = gateway(proxy_config(upstream.port))
    with gw.connect() as c:
        resp = c.request(get_request("/one", method=method), head_request=method == "HEAD")
        assert resp.status in (200, 204, 304)
        assert b"injected" not in resp.body
    resp = gw.request("GET", "/two")
    assert resp.status == 200 and resp.body == b"legit"
    assert upstream.connections_accepted == 2


def test_invalid_upstream_chunk_size_first_read_gives_502(gateway, start_upstream):
    upstream = start_upstream(ScriptedUpstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"))
    gw = gateway(proxy_config(upstream.port))
    with gw.connect() as c:
        assert_error(c.request(get_request("/bad-chunk")), 502)


class PacedUpstream:
    """Answers each request with `parts`, written one by one 0.2 s apart (so that they arrive
    in separate reads), then waits for the gateway to close."""

    def __init__(self, parts):
        self.parts, self.requests = parts, 0
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                self.requests += 1
                for part in self.parts:
                    conn.sendall(part)
                    time.sleep(0.2)
                while conn.recv(65536):
                    pass

    def close(self):
        self.sock.close()


def test_invalid_upstream_chunk_size_mid_body_aborts_the_client(gateway):
    upstream = PacedUpstream([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                              b"zz\r\nworld\r\n0\r\n\r\n"])
    try:
        gw = gateway(proxy_config(upstream.port))
        with gw.connect() as c:
            c.send(get_request("/bad-chunk"))
            try:
                data = c.read_until_close()
            except ConnectionResetError:
                data = bytes(c.reader.buf)
    finally:
        upstream.close()
    assert data.startswith(b"HTTP/1.1 200") and b"hello" in data
    assert not data.endswith(b"0\r\n\r\n") and b"world" not in data


# --- header names that alias framing fields ------------------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"GET /u HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nContent_Length: 5\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\ntransfer_encoding: chunked\r\n"
    b"CONTENT_LENGTH: 5\r\nX_Forwarded_For: 6.6.6.6\r\n\r\nok",
], ids=["simple-head", "parsed-head"])
def test_header_names_with_underscores_are_dropped(gateway, upstream, request_bytes):
    gw = gateway(proxy_config(upstream.port))
    with gw.connect() as c:
        assert c.request(request_bytes).status == 200
    names = {n.lower() for n in upstream.requests[0].header_names()}
    assert not any("_" in n for n in names), names
    assert upstream.requests[0].complete and not upstream.requests[0].problems


# --- access log ----------------------------------------------------------------------------------

def test_combined_access_log_escapes_quotes_and_control_bytes(gateway, upstream, tmp_path):
    config = proxy_config(upstream.port)
    log_path = tmp_path / "combined.log"
    config["log"] = {"access": {"format": "combined", "path": str(log_path)}}
    gw = gateway(config)
    with gw.connect() as c:
        c.request(b'GET /a"b\\c HTTP/1.1\r\nHost: x\r\nUser-Agent: ua" 200 "forged\t\xe9\r\n\r\n')
    assert wait_for(lambda: log_path.exists() and log_path.read_text())
    line = log_path.read_text()
    assert line.count("\n") == 1
    assert '"GET /a\\x22b\\x5Cc HTTP/1.1"' in line, line
    assert '"ua\\x22 200 \\x22forged\\x09\\xE9"' in line, line
    # Six quoted fields, each opened and closed once: request, referer, user agent (nginx's),
    # then request id, upstream target and rate limit: no quote of the request ended one early.
    assert line.count('"') == 12, line
